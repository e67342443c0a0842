"""``convert --to nunchaku``: a dcgen_quant FLUX checkpoint -> Nunchaku's v1.0 single file.

Two phases:

1. :func:`plan_export` reads only metadata and tensor shapes (a full-size model on the meta
   device plans too) and decides every output tensor: name (Nunchaku's engine / "family A"
   names, NUNCHAKU_FORMAT.md section 1.4), dtype and shape, and which of our tensors feed it.
   Structural problems (a layer kept in 16 bits where Nunchaku needs 4 bits, an unexpected
   tensor inside a block, SANA) are refused here, before anything is written.
2. :func:`convert_to_nunchaku` streams block by block: read one block's tensors (each checked
   against its CRC-32), convert (:mod:`.export_layers`), write each at its planned offset
   (:class:`~dcgen_quant.interop.safetensors_stream.StreamingWriter`), drop them. Peak memory is
   about one block plus the 16-bit top-level tensors. The file appears atomically, only complete.

Mapping (per double block ``transformer_blocks.i`` / single block ``single_transformer_blocks.i``):
``qkv_proj`` = rows of ``attn.to_q|to_k|to_v``; ``qkv_proj_context`` = ``attn.add_q|k|v_proj``;
``out_proj`` = ``attn.to_out.0``; ``out_proj_context`` = ``attn.to_add_out``; ``mlp_fc1/2`` =
``ff.net.0.proj`` / ``ff.net.2`` (``mlp_context_*`` the same on ``ff_context``); single blocks:
``mlp_fc1`` = ``proj_mlp``, ``out_proj`` / ``mlp_fc2`` = the attention / MLP columns of
``proj_out`` (our INT4 ``proj_out`` is already split there: parts 0 and 1, each keeping its own
bias, which Nunchaku adds in both layers; an unsplit ``proj_out`` is cut at the attention width,
its bias going to ``mlp_fc2`` as DeepCompressor does); adaLN ``norm1(_context).linear`` /
``norm.linear`` as AWQ W4A16; ``attn.norm_*`` as ``norm_*``; everything outside the blocks
unchanged in the file's 16-bit dtype.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import __version__
from ...atomic import TargetExistsError, atomic_path, check_target
from ...checkpoint import CheckpointError, _expected_layer_tensors
from ..safetensors_stream import StreamingWriter
from ..source import CheckpointSource
from . import metadata as M
from . import packing as P
from .export_layers import (
    Changes,
    DenseWeight,
    NotRepresentable,
    W4A4Layer,
    W4A16Layer,
    awq_specs,
    awq_tensors,
    cast,
    dense_of_w4a4,
    w4a4_specs,
    w4a4_tensors,
)

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
# (Nunchaku name, our member layers, unsigned activations in INT4); DeepCompressor's order
DOUBLE_W4A4 = (
    ("qkv_proj", ("attn.to_q", "attn.to_k", "attn.to_v"), False),
    ("qkv_proj_context", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    ("out_proj", ("attn.to_out.0",), False),
    ("out_proj_context", ("attn.to_add_out",), False),
    ("mlp_fc1", ("ff.net.0.proj",), False),
    ("mlp_fc2", ("ff.net.2",), True),
    ("mlp_context_fc1", ("ff_context.net.0.proj",), False),
    ("mlp_context_fc2", ("ff_context.net.2",), True),
)
SINGLE_W4A4 = (
    ("qkv_proj", ("attn.to_q", "attn.to_k", "attn.to_v"), False),
    ("mlp_fc1", ("proj_mlp",), False),
)
DOUBLE_AWQ = (("norm1.linear", 6), ("norm1_context.linear", 6))
SINGLE_AWQ = (("norm.linear", 3),)
DOUBLE_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
SINGLE_NORMS = ("norm_q", "norm_k")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Member:
    """One source of a W4A4 output: our layer ``layer``, optionally its input columns
    ``cols``; ``bias``: whether its bias goes into this output."""

    layer: str
    cols: tuple[int, int] | None = None
    bias: bool = True


@dataclass
class W4A4Item:
    out: str
    members: list[Member]
    unsigned: bool
    n: int
    k: int


@dataclass
class AwqItem:
    out: str
    src: str
    chunks: int
    o: int
    i: int


@dataclass
class CopyItem:
    out: str
    src: str


@dataclass
class BlockPlan:
    name: str
    items: list = field(default_factory=list)


@dataclass
class ExportPlan:
    """Everything about the output that is known before reading a value."""

    fmt: str
    rank: int
    dtype: torch.dtype
    patch_size: int
    blocks: list[BlockPlan]
    top: list[CopyItem]
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # output tensor -> (dtype, shape)

    def tensors(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(name, dtype, shape) for name, (dtype, shape) in self.specs.items()]


# --------------------------------------------------------------------------------------------
# planning


class _Planner:
    def __init__(self, source, dtype: torch.dtype, patch_size: int | None):
        self.src, self.dtype = source, dtype
        if source.model_class != M.DIFFUSERS_CLASS:
            if "Sana" in source.model_class:
                raise NotRepresentable(
                    "SANA export to Nunchaku is not supported yet: its Nunchaku layout "
                    "(q/k/v padding, GLU channel order, out_proj bias) is not verified against a "
                    "real file (docs/INTEROP.md)"
                )
            raise NotRepresentable(
                f"cannot export {source.model_class} to Nunchaku: only {M.DIFFUSERS_CLASS} is "
                "supported"
            )
        self.config = source.config
        self.patch_size = patch_size or M.default_latent_patch_size(self.config)
        M.comfy_config(self.config, self.patch_size)  # validates the patch size early
        self.consumed: set[str] = set()
        self.fmts: set[str] = set()
        self.ranks: list[int] = []

    def layer(self, name: str, out: str, want: str) -> dict:
        info = self.src.layers.get(name)
        if info is None:
            if f"{name}.weight" in self.src:
                raise NotRepresentable(
                    f"layer {name} is kept in 16 bits, but Nunchaku's {out} is a 4-bit "
                    f"{want} layer: quantize it (without --skip for it)"
                )
            raise CheckpointError(f"{self.src.name}: layer {name} is missing")
        self.consumed.update(_expected_layer_tensors(name, info))
        return info

    def w4a4(self, block: str, out: str, rels, unsigned: bool) -> W4A4Item:
        members, n, k = [], 0, None
        for rel in rels:
            name = f"{block}.{rel}"
            info = self.layer(name, f"{block}.{out}", "W4A4")
            if info["kind"] != "svdq":
                raise NotRepresentable(
                    f"layer {name} is {info['kind']}, but Nunchaku's {block}.{out} is W4A4"
                )
            if k is not None and int(info["in_features"]) != k:
                raise NotRepresentable(f"{block}.{out}: members read different input widths")
            k = int(info["in_features"])
            n += int(info["out_features"])
            self.fmts.add(info["fmt"])
            self.ranks.append(int(info.get("rank", 0)))
            members.append(Member(name))
        return W4A4Item(f"{block}.{out}", members, unsigned, n, k)

    def proj_out(self, block: str, inner: int) -> list[W4A4Item]:
        name = f"{block}.proj_out"
        info = self.layer(name, f"{block}.out_proj", "W4A4")
        n, k = int(info["out_features"]), int(info["in_features"])
        if info["kind"] == "svdq_split":
            if info.get("splits") != [inner, k - inner]:
                raise NotRepresentable(
                    f"layer {name} is split at {info.get('splits')}, but Nunchaku splits it into "
                    f"out_proj ({inner} columns) and mlp_fc2 ({k - inner})"
                )
            items = []
            for i, (out, unsigned) in enumerate((("out_proj", False), ("mlp_fc2", True))):
                part = self.w4a4(block, out, [f"proj_out.parts.{i}"], unsigned)
                items.append(part)
            return items
        if info["kind"] != "svdq":
            raise NotRepresentable(f"layer {name} is {info['kind']}, but Nunchaku's is W4A4")
        self.fmts.add(info["fmt"])
        self.ranks.append(int(info.get("rank", 0)))
        return [
            W4A4Item(f"{block}.out_proj", [Member(name, (0, inner), False)], False, n, inner),
            W4A4Item(f"{block}.mlp_fc2", [Member(name, (inner, k), True)], True, n, k - inner),
        ]

    def awq(self, block: str, rel: str, chunks: int) -> AwqItem:
        name, out = f"{block}.{rel}", f"{block}.{rel}"
        info = self.src.layers.get(name)
        if info is None and f"{name}.weight" in self.src:  # kept 16-bit: re-quantized if allowed
            o, i = self.src.shape(f"{name}.weight")
            self.consumed.update(k for k in (f"{name}.weight", f"{name}.bias") if k in self.src)
        else:
            info = self.layer(name, out, "AWQ W4A16")
            if info["kind"] not in ("w4a16", "svdq"):
                raise NotRepresentable(f"layer {name} is {info['kind']}, Nunchaku's is AWQ W4A16")
            o, i = int(info["out_features"]), int(info["in_features"])
        if o % (4 * chunks) or i % P.AWQ_GROUP:
            raise NotRepresentable(
                f"{out}: a {o} x {i} AWQ layer needs out_features divisible by {4 * chunks} and "
                f"in_features by {P.AWQ_GROUP}"
            )
        return AwqItem(out, name, chunks, o, i)

    def copy(self, key: str, out: str) -> CopyItem:
        if key not in self.src:
            raise CheckpointError(f"{self.src.name}: tensor {key!r} is missing")
        self.consumed.add(key)
        return CopyItem(out, key)

    def block(self, kind: str, i: int) -> BlockPlan:
        name = f"{kind}.{i}"
        plan = BlockPlan(name)
        if kind == "transformer_blocks":
            plan.items += [self.awq(name, rel, c) for rel, c in DOUBLE_AWQ]
            plan.items += [self.w4a4(name, out, rels, u) for out, rels, u in DOUBLE_W4A4]
            norms = DOUBLE_NORMS
        else:
            plan.items += [self.awq(name, rel, c) for rel, c in SINGLE_AWQ]
            plan.items += [self.w4a4(name, out, rels, u) for out, rels, u in SINGLE_W4A4]
            inner = plan.items[1].n // 3  # qkv_proj rows = 3 x attention width
            plan.items += self.proj_out(name, inner)
            norms = SINGLE_NORMS
        plan.items += [self.copy(f"{name}.attn.{m}.weight", f"{name}.{m}.weight") for m in norms]
        return plan


def plan_export(
    source, dtype: str | torch.dtype = "bfloat16", latent_patch_size: int | None = None
) -> ExportPlan:
    """Decide every tensor of the Nunchaku file from ``source``'s metadata and shapes alone.

    Parameters
    ----------
    source : :class:`~dcgen_quant.interop.source.CheckpointSource` or ``StateDictSource``
    dtype : the file's 16-bit dtype, "bfloat16" (Nunchaku's published files) or "float16"
    latent_patch_size : ComfyUI ``patch_size`` (default: 2 for FLUX.1's 64 output channels,
        else 1)

    Raises NotRepresentable / CheckpointError (ValueErrors) naming the layer.
    """
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be bfloat16 or float16, got {dtype}")
    pl = _Planner(source, dtype, latent_patch_size)
    blocks = []
    for kind, count_key in zip(BLOCK_LISTS, ("num_layers", "num_single_layers")):
        blocks += [pl.block(kind, i) for i in range(int(pl.config.get(count_key, 0)))]
    if len(pl.fmts) != 1:
        raise NotRepresentable(
            f"Nunchaku files hold one 4-bit format; the W4A4 layers use {sorted(pl.fmts)}"
        )
    fmt = pl.fmts.pop()
    rank = max(P.RANK_TILE, P.padded(max(pl.ranks), P.RANK_TILE))
    top = []
    for key in source.keys():  # noqa: SIM118 (a source is not a dict)
        if key.split(".", 1)[0] in BLOCK_LISTS:
            if key not in pl.consumed:
                raise NotRepresentable(
                    f"tensor {key} has no place in Nunchaku's FLUX blocks (only the layers of "
                    "diffusers' FLUX blocks are)"
                )
            continue
        if key.rsplit(".", 1)[0] in source.layers:
            raise NotRepresentable(
                f"layer {key.rsplit('.', 1)[0]} is quantized, but Nunchaku keeps it in 16 bits"
            )
        top.append(CopyItem(key, key))
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for block in blocks:
        for item in block.items:
            specs.update(_item_specs(item, source, fmt, rank, dtype))
    for item in top:
        specs.update(_item_specs(item, source, fmt, rank, dtype))
    return ExportPlan(fmt, rank, dtype, pl.patch_size, blocks, top, specs)


def _item_specs(item, source, fmt, rank, dtype) -> dict[str, tuple]:
    if isinstance(item, W4A4Item):
        sub = w4a4_specs(item.n, item.k, fmt, rank, dtype)
    elif isinstance(item, AwqItem):
        sub = awq_specs(item.o, item.i, dtype)
    else:
        src_dtype = source.dtype(item.src)
        out_dtype = dtype if src_dtype.is_floating_point else src_dtype
        return {item.out: (out_dtype, source.shape(item.src))}
    return {f"{item.out}.{suffix}": spec for suffix, spec in sub.items()}


# --------------------------------------------------------------------------------------------
# conversion


class _Reader:
    """Per-block cache of our layers as logical tensors."""

    def __init__(self, source):
        self.src = source
        self.cache: dict[str, object] = {}

    def _opt(self, key):
        return self.src.get(key) if key in self.src else None

    def w4a4(self, name: str) -> W4A4Layer:
        if name not in self.cache:
            info, g = self.src.layers[name], self.src.get
            self.cache[name] = W4A4Layer(
                name, info["fmt"], g(f"{name}.qweight"), g(f"{name}.wscales"),
                self._opt(f"{name}.wtscale"), self._opt(f"{name}.bias"),
                g(f"{name}.smooth_factor"), g(f"{name}.proj_down"), g(f"{name}.proj_up"),
                bool(info.get("act_unsigned", False)),
            )  # fmt: skip
        return self.cache[name]

    def member(self, m: Member) -> W4A4Layer:
        layer = self.w4a4(m.layer)
        if m.cols is not None:
            return layer.columns(*m.cols, keep_bias=m.bias)
        return layer

    def adaln(self, name: str) -> W4A16Layer | DenseWeight:
        info = self.src.layers.get(name)
        if info is None:
            return DenseWeight(name, self.src.get(f"{name}.weight").float(),
                               self._opt(f"{name}.bias"), "kept in 16 bits")  # fmt: skip
        if info["kind"] == "svdq":
            layer = self.w4a4(name)
            return DenseWeight(name, dense_of_w4a4(layer), layer.bias, "W4A4 (SVDQLinear)")
        packed, wscales = self.src.get(f"{name}.qweight"), self.src.get(f"{name}.wscales")
        bias = self._opt(f"{name}.bias")
        if info["fmt"] == "int4":
            return W4A16Layer(name, packed, wscales, bias)
        from ...formats import QuantizedWeight, dequantize_weight

        qw = QuantizedWeight(packed, wscales, self._opt(f"{name}.wtscale"), info["fmt"])
        return DenseWeight(name, dequantize_weight(qw), bias, f"{info['fmt']} W4A16")


def _convert_block(block: BlockPlan, plan: ExportPlan, source, changes, writer) -> None:
    reader = _Reader(source)
    for item in block.items:
        if isinstance(item, W4A4Item):
            members = [reader.member(m) for m in item.members]
            tensors = w4a4_tensors(members, item.out, unsigned=item.unsigned, rank=plan.rank,
                                   dtype=plan.dtype, changes=changes)  # fmt: skip
        elif isinstance(item, AwqItem):
            tensors = awq_tensors(reader.adaln(item.src), item.out, chunks=item.chunks,
                                  dtype=plan.dtype, changes=changes)  # fmt: skip
        else:
            writer.write(item.out, _copy(item, plan, source, changes))
            continue
        for suffix, t in tensors.items():
            writer.write(f"{item.out}.{suffix}", t)


def _copy(item: CopyItem, plan: ExportPlan, source, changes) -> torch.Tensor:
    t = source.get(item.src)
    return cast(t, plan.dtype, item.out, changes) if t.is_floating_point() else t


def _check_output(out: Path, inputs: Path) -> None:
    if out.suffix != ".safetensors":
        raise ValueError(f"output {out} must be a .safetensors file (Nunchaku's single file)")
    if out.exists() and inputs.exists() and out.resolve() == inputs.resolve():
        raise ValueError(f"output {out} is the input checkpoint")
    check_target(out)
    if out.is_file():
        from safetensors import safe_open

        try:
            ours = M.EXPORT_KEY in (safe_open(str(out), framework="pt").metadata() or {})
        except Exception:  # unreadable: certainly not ours
            ours = False
        if not ours:
            raise TargetExistsError(
                f"{out} exists and is not a Nunchaku export of dcgen_quant; refusing to "
                "overwrite it"
            )


def convert_to_nunchaku(
    in_path: str | Path,
    out_path: str | Path,
    *,
    dtype: str = "bfloat16",
    requantize: bool = False,
    latent_patch_size: int | None = None,
    verify: bool = True,
    progress: bool = False,
) -> dict:
    """Export a dcgen_quant FLUX checkpoint as a Nunchaku v1.0 single file (atomically).

    Parameters
    ----------
    in_path : our checkpoint (``*.safetensors`` or sharded directory)
    out_path : the ``.safetensors`` file to write
    dtype : 16-bit dtype of the file ("bfloat16", as Nunchaku's published files, or "float16")
    requantize : allow the lossy changes Nunchaku's format forces (counted in the result);
        without it they raise NotRepresentable naming the layer
    latent_patch_size : ComfyUI ``patch_size`` (see :func:`plan_export`)
    verify : check every input tensor against its CRC-32
    progress : a tqdm bar over blocks

    Returns
    -------
    {"output", "format", "rank", "dtype", "tensors", "bytes", "seconds", "changes": [...]}
    """
    start = time.perf_counter()
    in_path, out_path = Path(in_path), Path(out_path)
    source = CheckpointSource(in_path, verify=verify)
    try:
        return _export(source, in_path, out_path, dtype, requantize, latent_patch_size,
                       progress, start)  # fmt: skip
    finally:
        source.close()


def _export(source, in_path, out_path, dtype, requantize, latent_patch_size, progress, start):
    _check_output(out_path, in_path)
    plan = plan_export(source, dtype, latent_patch_size)
    changes = Changes(allow_lossy=requantize)
    from tqdm import tqdm

    with atomic_path(out_path) as tmp:
        writer = StreamingWriter(tmp, plan.tensors())
        try:
            for block in tqdm(plan.blocks, desc="convert", unit="block", disable=not progress):
                _convert_block(block, plan, source, changes, writer)
            for item in plan.top:
                writer.write(item.out, _copy(item, plan, source, changes))
            export = {
                "tool_version": __version__,
                "source": in_path.name,
                "requantize": requantize,
                "changes": changes.summary(),
            }
            writer.close(M.build_metadata(source.config, plan.fmt, plan.rank, plan.patch_size,
                                          export))  # fmt: skip
        except BaseException:
            writer.abort()
            raise
        size = tmp.stat().st_size
    return {
        "output": str(out_path),
        "format": plan.fmt,
        "rank": plan.rank,
        "dtype": str(plan.dtype).replace("torch.", ""),
        "latent_patch_size": plan.patch_size,
        "tensors": len(plan.specs),
        "bytes": size,
        "seconds": time.perf_counter() - start,
        "changes": changes.summary(),
        "config": json.loads(json.dumps(source.config, default=str)),
    }
