"""FLUX.1 in Nunchaku's family-A names (NUNCHAKU_FORMAT.md section 1.4), mapped onto diffusers'
``FluxTransformer2DModel`` and our layers.

A double block ``transformer_blocks.{i}`` and a single block ``single_transformer_blocks.{i}``
each hold W4A4 layers (a fused q/k/v becomes our three member layers, fusable again at run time
by :mod:`dcgen_quant.fusion`), AWQ adaLN layers and the per-head RMSNorm weights. A single
block's ``out_proj`` and ``mlp_fc2`` are the column parts of diffusers' ``proj_out``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..safetensors_io import ForeignFormatError

DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"


@dataclass(frozen=True)
class W4A4Spec:
    """A Nunchaku W4A4 layer: the diffusers linears whose rows it stacks, or one column part."""

    name: str  # Nunchaku name inside the block, e.g. "qkv_proj"
    members: tuple[str, ...]  # diffusers modules (row blocks, in order); () for a column part
    gelu_input: bool = False  # reads a GELU output: INT4 quantizes it unsigned (+0.171875)
    part_of: str | None = None  # diffusers linear this layer is column part `part` of
    part: int = 0


@dataclass(frozen=True)
class AWQSpec:
    name: str  # Nunchaku name == diffusers name, e.g. "norm1.linear"
    chunks: int  # 6 (AdaLayerNormZero) or 3 (AdaLayerNormZeroSingle)


@dataclass(frozen=True)
class BlockSpec:
    w4a4: tuple[W4A4Spec, ...]
    awq: tuple[AWQSpec, ...]
    norms: tuple[tuple[str, str], ...]  # (Nunchaku "norm_q", diffusers "attn.norm_q")


DOUBLE_BLOCK = BlockSpec(
    w4a4=(
        W4A4Spec("qkv_proj", ("attn.to_q", "attn.to_k", "attn.to_v")),
        W4A4Spec("qkv_proj_context", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        W4A4Spec("out_proj", ("attn.to_out.0",)),
        W4A4Spec("out_proj_context", ("attn.to_add_out",)),
        W4A4Spec("mlp_fc1", ("ff.net.0.proj",)),
        W4A4Spec("mlp_fc2", ("ff.net.2",), gelu_input=True),
        W4A4Spec("mlp_context_fc1", ("ff_context.net.0.proj",)),
        W4A4Spec("mlp_context_fc2", ("ff_context.net.2",), gelu_input=True),
    ),
    awq=(AWQSpec("norm1.linear", 6), AWQSpec("norm1_context.linear", 6)),
    norms=(
        ("norm_q", "attn.norm_q"),
        ("norm_k", "attn.norm_k"),
        ("norm_added_q", "attn.norm_added_q"),
        ("norm_added_k", "attn.norm_added_k"),
    ),
)

SINGLE_BLOCK = BlockSpec(
    w4a4=(
        W4A4Spec("qkv_proj", ("attn.to_q", "attn.to_k", "attn.to_v")),
        W4A4Spec("mlp_fc1", ("proj_mlp",)),
        W4A4Spec("out_proj", (), part_of="proj_out", part=0),
        W4A4Spec("mlp_fc2", (), gelu_input=True, part_of="proj_out", part=1),
    ),
    awq=(AWQSpec("norm.linear", 3),),
    norms=(("norm_q", "attn.norm_q"), ("norm_k", "attn.norm_k")),
)

SPECS = {DOUBLE: DOUBLE_BLOCK, SINGLE: SINGLE_BLOCK}


def blocks(model: nn.Module) -> list[tuple[str, BlockSpec]]:
    """(qualified block name, its spec) of a FluxTransformer2DModel, in execution order."""
    out = []
    for attr in (DOUBLE, SINGLE):
        out += [(f"{attr}.{i}", SPECS[attr]) for i in range(len(getattr(model, attr)))]
    return out


def layer_shape(block: nn.Module, spec: W4A4Spec) -> tuple[int, int, list[int]]:
    """(N, K, member output sizes) of ``spec`` in a diffusers block (meta modules are fine)."""
    if spec.part_of is None:
        linears = [block.get_submodule(m) for m in spec.members]
        return (
            sum(m.out_features for m in linears),
            linears[0].in_features,
            [m.out_features for m in linears],
        )
    splits = part_splits(block, spec.part_of)
    n = block.get_submodule(spec.part_of).out_features
    return n, splits[spec.part], [n]


def part_splits(block: nn.Module, linear: str) -> list[int]:
    """Input columns of the parts of a single block's ``proj_out``: [attention, MLP]."""
    mlp = block.get_submodule("proj_mlp").out_features
    total = block.get_submodule(linear).in_features
    return [total - mlp, mlp]


# --------------------------------------------------------------------------------------------
# config


FLUX1_AXES = {128: [16, 56, 56]}  # rotary axes of FLUX.1's head dim 128


def infer_config(shapes: dict[str, tuple[int, ...]], names: list[str]) -> dict[str, Any]:
    """A FluxTransformer2DModel config from diffusers-named tensor shapes (no config given).

    ``shapes`` holds at least the top-level tensors and one head-norm weight; ``names`` every
    block tensor name (to count blocks). The rotary axes are not in the weights: FLUX.1's
    ``[16, 56, 56]`` is taken for head dim 128, anything else needs an explicit config.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ForeignFormatError(
                f"cannot infer the FLUX config: tensor {key!r} is missing (pass a config)"
            )
        return shapes[key]

    def count(prefix: str) -> int:
        ids = {int(n.split(".")[1]) for n in names if n.startswith(prefix + ".")}
        if ids != set(range(len(ids))):
            raise ForeignFormatError(f"{prefix} indices are not 0..n-1: {sorted(ids)[:8]}")
        return len(ids)

    hidden, in_channels = shape("x_embedder.weight")
    head_dim = next(
        (s[0] for k, s in shapes.items() if k.endswith("norm_q.weight") and len(s) == 1), None
    )
    if head_dim is None:
        raise ForeignFormatError("cannot infer the FLUX head dim: no norm_q weight (pass a config)")
    if head_dim not in FLUX1_AXES:
        raise ForeignFormatError(
            f"cannot infer the rotary axes for head dim {head_dim} (FLUX.1 has 128): pass a config"
        )
    out = shape("proj_out.weight")[0]
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": None if out == in_channels else out,
        "num_layers": count(DOUBLE),
        "num_single_layers": count(SINGLE),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shape("context_embedder.weight")[1],
        "pooled_projection_dim": shape("time_text_embed.text_embedder.linear_1.weight")[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        "axes_dims_rope": FLUX1_AXES[head_dim],
    }


def parse_config(value: Any, where: str) -> dict[str, Any]:
    """A diffusers config from a dict, a JSON string or a JSON file path; FLUX class checked."""
    from pathlib import Path

    if isinstance(value, (str, Path)) and not str(value).lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist")
        value = path.read_text()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ForeignFormatError(f"{where}: config is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ForeignFormatError(f"{where}: config is not a JSON object")
    cls = value.get("_class_name", "FluxTransformer2DModel")
    if cls not in ("FluxTransformer2DModel", "NunchakuFluxTransformer2dModel"):
        raise ForeignFormatError(
            f"{where}: config is for {cls!r}; only FLUX (FluxTransformer2DModel) is supported yet"
        )
    return {k: v for k, v in value.items() if not k.startswith("_")}
