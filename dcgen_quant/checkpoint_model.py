"""The model a checkpoint describes: config sanity, a shape-only skeleton, its tensor layout.

Run by ``load_quantized`` and ``inspect`` alike, after the metadata schema
(:mod:`dcgen_quant.checkpoint_schema`) and before any tensor is read:

1. :func:`check_model_config`: for the model families the quantizer supports (FLUX, SANA), the
   config must agree with the tensors present: block counts with the block indices of the tensor
   names, widths and head dims with the weight shapes, rope axes with the head dim. A config
   that would build a million blocks is refused here, in microseconds.
2. :func:`skeleton`: the model built from its class and config with every parameter on the meta
   device (no memory, no init; construction is stopped as soon as it registers more parameters
   than the file has tensors, whatever the class), the 4-bit layers installed, also on meta.
3. :func:`check_structure`: the skeleton's state dict against the tensor table: no tensor
   missing or extra, every shape as the model needs it, 16-bit dtypes consistent.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .checkpoint_schema import (
    LAYER_KINDS,
    CheckpointError,
    TensorSpec,
    _dtype_from_name,
    _is_int,
    _need,
    show,
)
from .nn import SVDQLinear, SVDQSplitLinear

Table = dict[str, tuple[torch.dtype, tuple[int, ...]]]
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------------------------
# 1. config sanity per family


def _blocks(table: Table, layers: dict, prefix: str) -> int:
    """How many blocks ``prefix.<i>.`` the tensors hold (indices must be 0..n-1)."""
    found = set()
    for name in [*table, *layers]:
        if name.startswith(prefix + "."):
            index = name[len(prefix) + 1 :].split(".", 1)[0]
            if index.isdigit():
                found.add(int(index))
    if found and found != set(range(max(found) + 1)):
        missing = min(set(range(max(found) + 1)) - found)
        raise CheckpointError(f"the checkpoint has no tensor of block {prefix}.{missing}")
    return len(found)


def _weight(table: Table, layers: dict, name: str) -> tuple[int, ...] | None:
    """Shape of ``name``'s weight: its tensor's, or (N, K) of its 4-bit layer; None if absent."""
    if f"{name}.weight" in table:
        return tuple(table[f"{name}.weight"][1])
    info = layers.get(name)
    if isinstance(info, dict):
        return (info["out_features"], info["in_features"])
    return None


def _pos_int(config: dict, key: str, lo: int = 1) -> int:
    value = config.get(key)
    return _int_field(value, key, lo)


def _int_field(value: Any, key: str, lo: int) -> int:
    _need(
        _is_int(value) and lo <= value <= 1 << 20,
        f"model.config.{key}",
        value,
        f"an integer in [{lo}, {1 << 20}]",
    )
    return value


def _agree(key: str, value: Any, tensor: str, actual: Any, want: tuple) -> None:
    if actual is not None and tuple(actual) != tuple(want):
        raise CheckpointError(
            f"metadata 'model.config.{key}' is {show(value)}, but tensor {tensor!r} has shape "
            f"{list(actual)} (expected {list(want)})"
        )


def _check_flux(config: dict, table: Table, layers: dict) -> None:
    for key, lo in (("num_layers", 0), ("num_single_layers", 0)):
        n = _pos_int(config, key, lo)
        prefix = "transformer_blocks" if key == "num_layers" else "single_transformer_blocks"
        held = _blocks(table, layers, prefix)
        if n != held:
            raise CheckpointError(
                f"metadata 'model.config.{key}' is {n}, but the checkpoint holds {held} "
                f"{prefix} (block indices in the tensor names)"
            )
    heads, head_dim = (
        _pos_int(config, "num_attention_heads"),
        _pos_int(config, "attention_head_dim"),
    )
    inner = heads * head_dim
    channels, patch = _pos_int(config, "in_channels"), _pos_int(config, "patch_size")
    out = config.get("out_channels")
    if out is not None:
        out = _int_field(out, "out_channels", 1)
    axes = config.get("axes_dims_rope")
    _need(
        isinstance(axes, list)
        and len(axes) == 3
        and all(_is_int(a) and a > 0 and a % 2 == 0 for a in axes)
        and sum(axes) == head_dim,
        "model.config.axes_dims_rope",
        axes,
        f"three positive even sizes summing to attention_head_dim={head_dim}",
    )
    _need(
        isinstance(config.get("guidance_embeds"), bool),
        "model.config.guidance_embeds",
        config.get("guidance_embeds"),
        "true or false",
    )
    joint, pooled = (
        _pos_int(config, "joint_attention_dim"),
        _pos_int(config, "pooled_projection_dim"),
    )
    shape = lambda name: _weight(table, layers, name)  # noqa: E731
    _agree("in_channels", channels, "x_embedder.weight", shape("x_embedder"), (inner, channels))
    _agree(
        "joint_attention_dim",
        joint,
        "context_embedder.weight",
        shape("context_embedder"),
        (inner, joint),
    )
    _agree(
        "pooled_projection_dim",
        pooled,
        "time_text_embed.text_embedder.linear_1.weight",
        shape("time_text_embed.text_embedder.linear_1"),
        (inner, pooled),
    )
    _agree(
        "out_channels",
        out,
        "proj_out.weight",
        shape("proj_out"),
        (patch * patch * (out or channels), inner),
    )
    for name in (
        "transformer_blocks.0.attn.norm_q.weight",
        "single_transformer_blocks.0.attn.norm_q.weight",
    ):
        if name in table:
            _agree("attention_head_dim", head_dim, name, tuple(table[name][1]), (head_dim,))
    guided = "time_text_embed.guidance_embedder.linear_1.weight" in table
    if config["guidance_embeds"] != guided:
        raise CheckpointError(
            f"metadata 'model.config.guidance_embeds' is {config['guidance_embeds']}, but the "
            f"checkpoint {'holds' if guided else 'has no'} guidance embedder tensors"
        )


def _check_sana(config: dict, table: Table, layers: dict) -> None:
    n, held = _pos_int(config, "num_layers", 0), _blocks(table, layers, "transformer_blocks")
    if n != held:
        raise CheckpointError(
            f"metadata 'model.config.num_layers' is {n}, but the checkpoint holds {held} "
            "transformer_blocks (block indices in the tensor names)"
        )
    heads, head_dim = (
        _pos_int(config, "num_attention_heads"),
        _pos_int(config, "attention_head_dim"),
    )
    inner = heads * head_dim
    channels, patch = _pos_int(config, "in_channels"), _pos_int(config, "patch_size")
    caption = _pos_int(config, "caption_channels")
    out = config.get("out_channels")
    if out is not None:
        out = _int_field(out, "out_channels", 1)
    ratio = config.get("mlp_ratio")
    _need(
        isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= 64,
        "model.config.mlp_ratio",
        ratio,
        "a number in (0, 64]",
    )
    sample = _pos_int(config, "sample_size")
    if config.get("interpolation_scale") is not None:
        # a real (non-persistent) sin-cos table of (sample_size / patch)^2 x inner floats
        _need(
            (sample // patch) ** 2 * inner <= 1 << 28,
            "model.config.sample_size",
            sample,
            "a size whose positional table stays under 2^28 values",
        )
    shape = lambda name: _weight(table, layers, name)  # noqa: E731
    _agree(
        "in_channels",
        channels,
        "patch_embed.proj.weight",
        shape("patch_embed.proj"),
        (inner, channels, patch, patch),
    )
    _agree(
        "caption_channels",
        caption,
        "caption_projection.linear_1.weight",
        shape("caption_projection.linear_1"),
        (inner, caption),
    )
    _agree(
        "out_channels",
        out,
        "proj_out.weight",
        shape("proj_out"),
        (patch * patch * (out or channels), inner),
    )
    if held:
        hidden = int(ratio * inner)
        _agree(
            "mlp_ratio",
            ratio,
            "transformer_blocks.0.ff.conv_inverted.weight",
            _flat(shape("transformer_blocks.0.ff.conv_inverted")),
            (2 * hidden, inner),
        )
    if config.get("cross_attention_dim") is not None and held:
        cross = _pos_int(config, "cross_attention_dim")
        cheads = _pos_int(config, "num_cross_attention_heads")
        chead_dim = _pos_int(config, "cross_attention_head_dim")
        _agree(
            "cross_attention_dim",
            cross,
            "transformer_blocks.0.attn2.to_k.weight",
            shape("transformer_blocks.0.attn2.to_k"),
            (cheads * chead_dim, cross),
        )


def _flat(shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """A 1x1 convolution's weight shape as a linear's (N, K)."""
    return None if shape is None else tuple(shape[:2])


FAMILY_CHECKS = {"FluxTransformer2DModel": _check_flux, "SanaTransformer2DModel": _check_sana}


def check_model_config(description: dict[str, Any], table: Table, layers: dict) -> None:
    """The config of a supported model family against the tensors present (no-op otherwise)."""
    check = FAMILY_CHECKS.get(description.get("class"))
    if check is not None:
        check(description.get("config", {}), table, layers)


# --------------------------------------------------------------------------------------------
# 2. the skeleton


@contextlib.contextmanager
def parameters_on_meta(limit: int | None = None) -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real. Stop with a
    CheckpointError once more than ``limit`` parameters are registered (None: no limit)."""
    original = nn.Module.register_parameter
    count = 0

    def register(module, name, param):
        nonlocal count
        if param is not None:
            count += 1
            if limit is not None and count > limit:
                raise CheckpointError(
                    f"metadata 'model.config' describes a model with more parameters than the "
                    f"checkpoint's {limit // 2} tensors (a block count or size was edited?)"
                )
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def model_class(description: dict[str, Any]):
    import diffusers
    from diffusers.configuration_utils import ConfigMixin

    name = description.get("class")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and issubclass(cls, ConfigMixin)):
        raise CheckpointError(f"metadata 'model.class' {show(name)} is not a diffusers model class")
    return cls


def skeleton(description: dict[str, Any], n_tensors: int) -> nn.Module:
    """The model of ``description`` with its parameters on the meta device."""
    cls = model_class(description)
    config = {k: v for k, v in description.get("config", {}).items() if not k.startswith("_")}
    try:
        with parameters_on_meta(2 * n_tensors + 64):
            return cls.from_config(config)
    except CheckpointError:
        raise
    except Exception as exc:  # a config the class rejects: report it as the file's problem
        raise CheckpointError(
            f"metadata 'model.config' does not build a {cls.__name__}: {type(exc).__name__}: "
            f"{show(str(exc), 160)}"
        ) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def check_model_matches(model: nn.Module, description: dict[str, Any]) -> None:
    """A given model must be of the checkpoint's class and config."""
    if type(model).__name__ != description.get("class"):
        raise CheckpointError(
            f"checkpoint is for {description.get('class')}, "
            f"the given model is {type(model).__name__}"
        )
    mine = json.loads(json.dumps(dict(getattr(model, "config", {})), default=_jsonable))
    for key, value in description.get("config", {}).items():
        if not key.startswith("_") and key in mine and mine[key] != value:
            raise CheckpointError(
                f"checkpoint comes from another model: config {key!r} is {show(value)} in the "
                f"checkpoint but {show(mine[key])} in the given model"
            )


def install_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace the modules ``layers`` names by empty 4-bit layers on the meta device (entries
    already validated by :func:`dcgen_quant.checkpoint_schema.layer_tensors`)."""
    parts = {n: i for n, i in layers.items() if "part_of" in i}
    for name, info in layers.items():
        if name in parts:
            continue
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, (nn.Linear, nn.Conv2d, *LAYER_KINDS.values())):
            raise CheckpointError(
                f"layer {show(name)} of the checkpoint does not exist in the model"
                if old is None
                else f"layer {show(name)} of the checkpoint is a {type(old).__name__} in the "
                "model, not a linear layer"
            )
        conv = info["kind"].endswith("conv1x1")
        if (
            old is not None
            and not isinstance(old, LAYER_KINDS[info["kind"]])
            and (isinstance(old, nn.Conv2d) != conv)
        ):
            raise CheckpointError(
                f"metadata 'layers.{name}.kind' is {info['kind']!r}, but the model's layer is a "
                f"{type(old).__name__}"
            )
        if info["kind"] == "svdq_split":
            i = 0
            members = []
            while f"{name}.parts.{i}" in layers:
                members.append(_make(layers[f"{name}.parts.{i}"], SVDQLinear))
                i += 1
            layer = SVDQSplitLinear(members)
        else:
            layer = _make(info, LAYER_KINDS[info["kind"]])
        _need(
            _features(old) in (None, (layer.out_features, layer.in_features)),
            f"layers.{name}",
            info,
            f"out/in features {_features(old)} of the model's layer",
        )
        model.set_submodule(name, layer)


def _features(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        if tuple(module.kernel_size) != (1, 1) or module.groups != 1:
            return (-1, -1)  # no 4-bit layer replaces this convolution
        return (module.out_channels, module.in_channels)
    return None


def _make(info: dict[str, Any], cls) -> nn.Module:
    kwargs = {"fmt": info["fmt"], "bias": info["bias"], "device": "meta"}
    kwargs["dtype"] = _dtype_from_name(info["dtype"], "layers.dtype")
    if info["kind"].startswith("svdq"):
        kwargs["rank"] = info["rank"]
        kwargs["act_unsigned"] = info.get("act_unsigned", False)
    return cls(info["in_features"], info["out_features"], **kwargs)


# --------------------------------------------------------------------------------------------
# 3. structure


def check_structure(model: nn.Module, table: Table, specs: dict[str, TensorSpec]) -> None:
    """The model's state dict (shapes) against the file's tensor table."""
    reference = model.state_dict()
    if missing := sorted(set(reference) - set(table)):
        raise CheckpointError(
            f"checkpoint is missing tensor {show(missing[0])} ({len(missing)} missing)"
        )
    if extra := sorted(set(table) - set(reference)):
        raise CheckpointError(
            f"checkpoint has tensor {show(extra[0])} that the model does not ({len(extra)} extra)"
        )
    sixteen: dict[torch.dtype, str] = {}
    for key, ref in reference.items():
        if key in specs:
            continue  # checked against its layer entry
        dtype, shape = table[key]
        want_float = ref.dtype.is_floating_point
        if tuple(shape) != tuple(ref.shape):
            raise CheckpointError(
                f"tensor {show(key)} is {dtype} {tuple(shape)}, expected shape {tuple(ref.shape)}"
            )
        if dtype not in _FLOAT_DTYPES if want_float else dtype != ref.dtype:
            expected = "a 16- or 32-bit float" if want_float else str(ref.dtype)
            raise CheckpointError(f"tensor {show(key)} is {dtype}, expected {expected}")
        if want_float and dtype != torch.float32:
            sixteen.setdefault(dtype, key)
    if len(sixteen) > 1:
        (a, ka), (b, kb) = list(sixteen.items())[:2]
        raise CheckpointError(
            f"tensor {show(kb)} is {b} but tensor {show(ka)} is {a}: the 16-bit tensors of a "
            "model share one dtype (a header dtype was edited?)"
        )
