"""Import Nunchaku FLUX checkpoints (and DeepCompressor's raw folder) into our runtime.

Two entry points share one block-by-block conversion:

* :func:`load_foreign` (what ``load_quantized`` calls for a foreign path): a diffusers
  ``FluxTransformer2DModel`` whose block linears are our :class:`~dcgen_quant.nn.SVDQLinear` /
  :class:`~dcgen_quant.nn.SVDQSplitLinear` / :class:`~dcgen_quant.nn.W4A16Linear`, ready for
  every backend and for q/k/v fusion (``fuse=True``);
* :func:`convert_to_dcgen_quant` (``python -m dcgen_quant convert IN OUT --to dcgen_quant``): the
  same model written as a dcgen_quant checkpoint, streamed one block at a time (peak memory: one
  block plus the 16-bit top-level tensors), atomically (nothing is left at OUT on error).

The model is first built as a skeleton on the meta device (layers, ranks, and tensor scales are
decided from a cheap pass over the low-rank branches), so that the checkpoint's header and
metadata are known before the first tensor is written.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import checkpoint
from ...atomic import atomic_path
from ...nn import SVDQLinear, SVDQSplitLinear, W4A16Linear
from ..safetensors_io import ForeignFormatError, StreamWriter, finite
from . import flux
from .detect import foreign_kind
from .layers import W4A4, mergeable, merged_svdq_tensors, svdq_tensors, w4a16_tensors


def open_source(path: str | Path, config: Any = None):
    """The reader for ``path`` (Nunchaku file or folder, or DeepCompressor folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    kind = foreign_kind(path, strict=True)
    if kind == "deepcompressor":
        from ..deepcompressor import DeepCompressorSource

        return DeepCompressorSource(path, config)
    if kind in ("nunchaku", "nunchaku-legacy"):
        from .reader import NunchakuSource

        return NunchakuSource(path, config)
    if checkpoint.is_checkpoint(path):
        with contextlib.suppress(checkpoint.CheckpointError, FileNotFoundError):
            checkpoint.read_metadata(path)
            raise ForeignFormatError(f"{path} is already a dcgen_quant checkpoint")
    raise ForeignFormatError(
        f"{path} is not a Nunchaku FLUX checkpoint (.safetensors file or folder with "
        "transformer_blocks.safetensors) nor a DeepCompressor output folder (model.pt, scale.pt)"
    )


# --------------------------------------------------------------------------------------------
# plan: the skeleton model and what each block's conversion produces


@dataclass
class _Entry:
    kind: str  # "w4a4" | "parts" | "awq" | "norm"
    specs: list
    shape: tuple = ()
    ranks: list[int] = field(default_factory=list)
    wtscales: list = field(default_factory=list)
    merged: bool = False


@dataclass
class Plan:
    model: nn.Module
    blocks: list[tuple[str, list[_Entry]]]
    fmt: str
    dtype: torch.dtype

    @property
    def rank(self) -> int:
        return max((r for _, es in self.blocks for e in es for r in e.ranks), default=0)


def _skeleton(config: dict) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    try:
        with checkpoint._parameters_on_meta():
            return FluxTransformer2DModel.from_config(config)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ForeignFormatError(f"the FLUX config is not valid: {exc}") from None


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    # diffusers warns on .to(dtype) of a model without fp32-pinned modules; nothing to pin
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def _materialize_markers(model: nn.Module) -> None:
    """Give the empty non-persistent buffers of layers built on meta (W4A16Linear's dtype
    marker) real storage; anything else still on meta was not loaded."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta and buf.numel() == 0:
                module._buffers[name] = torch.empty(0, dtype=buf.dtype)
    if on_meta := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise ForeignFormatError(f"tensor {on_meta[0]!r} was not loaded")


def _svdq(k, n, rank, fmt, dtype, unsigned) -> SVDQLinear:
    return SVDQLinear(k, n, rank, fmt, True, dtype, "meta", unsigned)


def build_plan(source, model: nn.Module | None = None) -> Plan:
    """Install our layers (on the meta device) into ``model`` (default: a skeleton built from
    ``source.config``) and record how every block is converted."""
    model = model if model is not None else _skeleton(source.config)
    fmt, dtype = source.fmt, source.dtype
    _cast(model, dtype)  # the 16-bit modules kept as they are take the checkpoint's dtype
    plan_blocks = []
    for block_name, spec in flux.blocks(model):
        block = model.get_submodule(block_name)
        entries, parts = [], []
        for s in spec.w4a4:
            n, k, sizes = flux.layer_shape(block, s)
            light = source.w4a4(block_name, s, n, k, light=True)
            rank, wts = light.rank, light.member_wtscales(sizes)
            if s.part_of is not None:
                parts.append((s, light, n, k, rank, wts[0]))
                continue
            for member, size in zip(s.members, sizes):
                block.set_submodule(member, _svdq(k, size, rank, fmt, dtype, light.act_unsigned))
            entries.append(_Entry("w4a4", [s], (n, k, sizes), [rank], wts))
        if parts:
            specs = [p[0] for p in parts]
            n = parts[0][2]
            ranks, wts = [p[4] for p in parts], [p[5] for p in parts]
            merged = mergeable([p[1] for p in parts], wts)
            if merged:
                k = sum(p[3] for p in parts)
                layer = _svdq(k, n, max(ranks), fmt, dtype, False)
                ranks = [max(ranks)]
            else:
                layer = SVDQSplitLinear(
                    [_svdq(p[3], n, p[4], fmt, dtype, p[1].act_unsigned) for p in parts]
                )
            block.set_submodule(specs[0].part_of, layer)
            entries.append(_Entry("parts", specs, (n, [p[3] for p in parts]), ranks, wts, merged))
        for a in spec.awq:
            linear = block.get_submodule(a.name)
            o, i = linear.out_features, linear.in_features
            block.set_submodule(a.name, W4A16Linear(i, o, "int4", True, dtype, "meta"))
            entries.append(_Entry("awq", [a], (o, i)))
        for nname, dname in spec.norms:
            size = block.get_submodule(dname).weight.shape[0]
            entries.append(_Entry("norm", [(nname, dname)], (size,)))
        plan_blocks.append((block_name, entries))
    return Plan(model, plan_blocks, fmt, dtype)


def expected_source_keys(source, plan: Plan) -> list[str]:
    """Every tensor of a Nunchaku source the plan reads (block tensors + top level)."""
    keys = list(source.top_level_info())
    for block, entries in plan.blocks:
        for e in entries:
            for s in e.specs:
                if e.kind in ("w4a4", "parts"):
                    keys += source.w4a4_keys(block, s)
                elif e.kind == "awq":
                    keys += source.awq_keys(block, s)
                else:
                    keys.append(f"{block}.{s[0]}.weight")
    return keys


def _check_source_keys(source, plan: Plan) -> None:
    if not hasattr(source, "w4a4_keys"):
        return  # DeepCompressor: checked after the conversion (unused_block_keys)
    expected = set(expected_source_keys(source, plan))
    if extra := [k for k in source.index if k not in expected]:
        raise ForeignFormatError(
            f"{source.path}: unexpected tensor {extra[0]!r} ({len(extra)} not in the FLUX "
            f"{source.fmt} schema)"
        )


def _check_unused(source) -> None:
    if hasattr(source, "unused_block_keys") and (unused := source.unused_block_keys()):
        raise ForeignFormatError(
            f"{source.path}/model.pt: tensor {unused[0]!r} belongs to no known layer "
            f"({len(unused)} unused)"
        )


# --------------------------------------------------------------------------------------------
# conversion


def block_tensors(source, block: str, entries: list[_Entry]) -> dict[str, Tensor]:
    """Our tensors (full state_dict keys) of one block."""
    out: dict[str, Tensor] = {}
    for e in entries:
        if e.kind == "w4a4":
            s = e.specs[0]
            n, k, sizes = e.shape
            rec = source.w4a4(block, s, n, k)
            _same_rank(rec, e.ranks[0])
            start = 0
            for member, size, wt in zip(s.members, sizes, e.wtscales):
                for name, t in svdq_tensors(rec, start, start + size, e.ranks[0], wt).items():
                    out[f"{block}.{member}.{name}"] = t
                start += size
        elif e.kind == "parts":
            n, ks = e.shape
            linear = e.specs[0].part_of
            recs = [source.w4a4(block, s, n, k) for s, k in zip(e.specs, ks)]
            if e.merged:
                _same_rank(max(recs, key=lambda r: r.rank), e.ranks[0])
                for name, t in merged_svdq_tensors(recs, e.ranks[0], e.wtscales[0]).items():
                    out[f"{block}.{linear}.{name}"] = t
            else:
                for i, (rec, rank, wt) in enumerate(zip(recs, e.ranks, e.wtscales)):
                    _same_rank(rec, rank)
                    for name, t in svdq_tensors(rec, 0, n, rank, wt).items():
                        out[f"{block}.{linear}.parts.{i}.{name}"] = t
        elif e.kind == "awq":
            a = e.specs[0]
            o, i = e.shape
            for name, t in w4a16_tensors(source.awq(block, a, o, i)).items():
                out[f"{block}.{a.name}.{name}"] = t
        else:
            nname, dname = e.specs[0]
            out[f"{block}.{dname}.weight"] = source.norm(block, nname, e.shape[0])
    return out


def _same_rank(rec: W4A4, rank: int) -> None:
    if rec.rank > rank:  # the light pass saw other low-rank tensors: the file changed under us
        raise ForeignFormatError(f"{rec.name}: low-rank branch changed while reading")


def _check_tensors(tensors: dict[str, Tensor], reference: dict[str, Tensor], where: str) -> None:
    for key, t in tensors.items():
        ref = reference.get(key)
        if ref is None:
            raise ForeignFormatError(f"{where}: produced tensor {key!r} that the model lacks")
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            raise ForeignFormatError(
                f"tensor {key!r} is {t.dtype} {list(t.shape)}, the model expects {ref.dtype} "
                f"{list(ref.shape)}"
            )


def _top_level(source, reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """The 16-bit tensors outside the blocks, checked against the model's own."""
    blocks = (flux.DOUBLE + ".", flux.SINGLE + ".")
    wanted = [k for k in reference if not k.startswith(blocks)]
    info = source.top_level_info()
    if missing := [k for k in wanted if k not in info]:
        raise ForeignFormatError(
            f"{source.path}: tensor {missing[0]!r} is missing ({len(missing)} top-level tensors "
            "missing)"
        )
    if extra := [k for k in info if k not in reference]:
        raise ForeignFormatError(
            f"{source.path}: unexpected top-level tensor {extra[0]!r} (not in the FLUX model)"
        )
    tensors = source.top_level()
    for key, t in tensors.items():
        ref = reference[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise ForeignFormatError(
                f"tensor {key!r} is {list(t.shape)}, the FLUX config implies {list(ref.shape)}"
            )
        if t.dtype != source.dtype:
            raise ForeignFormatError(
                f"tensor {key!r} is {t.dtype}; the checkpoint's 16-bit dtype is {source.dtype}"
            )
        if not finite(t):
            raise ForeignFormatError(f"tensor {key!r} holds NaN or Inf values")
    return {k: tensors[k] for k in wanted}


def _quant_config(plan: Plan):
    from ...quantize.config import QuantConfig

    return QuantConfig(
        format=plan.fmt, rank=plan.rank, dtype=plan.dtype, unsigned_gelu=plan.fmt == "int4"
    )


def _report(source, plan: Plan) -> dict[str, Any]:
    return {
        "imported_from": {
            "format": source.kind,
            "path": Path(source.path).name,
            "precision": plan.fmt,
        },
        "layers": [],
        "skipped": [],
    }


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="block", leave=False)


def load_foreign(
    path: str | Path,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    layout: str = "auto",
    fuse: bool = False,
    config: Any = None,
    progress: bool = False,
) -> nn.Module:
    """Load a Nunchaku FLUX checkpoint or DeepCompressor folder as a model of our layers.

    Parameters
    ----------
    path : Nunchaku v1.0 ``.safetensors``, legacy Nunchaku folder, or DeepCompressor folder
    model : optional FluxTransformer2DModel of the same config to load into
    device, layout, fuse : as :func:`dcgen_quant.load_quantized`
    config : diffusers config overriding the file's (dict, JSON string or file path)

    Returns
    -------
    The model in eval mode with ``dcgen_quant_config`` / ``dcgen_quant_report`` attached.
    Raises ForeignFormatError (a CheckpointError) naming the first tensor that cannot be read
    exactly.
    """
    source = open_source(path, config)
    try:
        return _load(source, path, model, device, layout, fuse, progress)
    finally:
        _close(source)


def _close(source) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def _load(source, path, model, device, layout, fuse, progress) -> nn.Module:
    if model is not None:
        checkpoint._check_model_matches(
            model, {"class": "FluxTransformer2DModel", "config": source.config}
        )
    plan = build_plan(source, model)
    model = plan.model
    _check_source_keys(source, plan)
    reference = model.state_dict()
    state = _top_level(source, reference)
    for block, entries in _progress(plan.blocks, progress, "import"):
        tensors = block_tensors(source, block, entries)
        _check_tensors(tensors, reference, str(path))
        state.update(tensors)
    _check_unused(source)
    if missing := [k for k in reference if k not in state]:
        raise ForeignFormatError(f"{path}: no tensor for {missing[0]!r} ({len(missing)} missing)")
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_markers(model)
    model.to(device)
    if layout != "canonical":
        checkpoint._set_layouts(model, layout, torch.device(device))
    if fuse:
        from ...fusion import fuse_projections

        fuse_projections(model)
    model.dcgen_quant_config = _quant_config(plan)
    model.dcgen_quant_report = _report(source, plan)
    return model.eval()


def convert_to_dcgen_quant(
    in_path: str | Path,
    out_path: str | Path,
    config: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a Nunchaku FLUX checkpoint (or DeepCompressor folder) to a dcgen_quant one.

    Parameters
    ----------
    in_path : Nunchaku v1.0 ``.safetensors``, legacy folder, or DeepCompressor folder
    out_path : ``*.safetensors``: the dcgen_quant checkpoint, written atomically (an existing
        dcgen_quant checkpoint there is replaced; anything else is refused)
    config : diffusers config overriding the input's (dict, JSON string or file path); needed
        when the input has none and the head dim is not FLUX.1's 128
    progress : a progress bar per block on stderr

    Returns
    -------
    A summary: input kind, precision, blocks, layers by kind, tensors, bytes, seconds.
    """
    t0 = time.perf_counter()
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"output {out_path} must be a .safetensors file")
    if Path(in_path).resolve() == out_path.resolve():
        raise ValueError("input and output are the same file")
    checkpoint.check_output(out_path)
    source = open_source(in_path, config)
    try:
        return _convert(source, in_path, out_path, progress, t0)
    finally:
        _close(source)


def _convert(source, in_path, out_path: Path, progress: bool, t0: float) -> dict[str, Any]:
    plan = build_plan(source)
    _check_source_keys(source, plan)
    model = plan.model
    reference = model.state_dict()
    blocks = (flux.DOUBLE + ".", flux.SINGLE + ".")
    top = [k for k in reference if not k.startswith(blocks)]
    order = list(top)
    for block, _ in plan.blocks:
        order += [k for k in reference if k.startswith(block + ".")]
    layout = [(k, reference[k].dtype, tuple(reference[k].shape)) for k in order]
    placeholder = dict.fromkeys(order, StreamWriter.PLACEHOLDER)
    metadata = checkpoint._build_metadata(
        model, _quant_config(plan), _report(source, plan), placeholder
    )
    with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
        writer = StreamWriter(fh, layout, metadata)
        for key, t in _top_level(source, reference).items():
            writer.write(key, t)
        for block, entries in _progress(plan.blocks, progress, "convert"):
            tensors = block_tensors(source, block, entries)
            _check_tensors(tensors, reference, str(in_path))
            for key in (k for k in order if k.startswith(block + ".")):
                if key not in tensors:
                    raise ForeignFormatError(f"{in_path}: no tensor for {key!r}")
                writer.write(key, tensors[key])
            del tensors
        _check_unused(source)
        writer.finish()
    kinds: dict[str, int] = {}
    for info in checkpoint.quantized_layers(model).values():
        if "part_of" not in info:
            kinds[info["kind"]] = kinds.get(info["kind"], 0) + 1
    return {
        "input": str(in_path),
        "input_format": source.kind,
        "output": str(out_path),
        "precision": plan.fmt,
        "dtype": str(plan.dtype).replace("torch.", ""),
        "rank": plan.rank,
        "blocks": len(plan.blocks),
        "layers": kinds,
        "tensors": len(order),
        "bytes": writer.total,
        "seconds": round(time.perf_counter() - t0, 2),
    }
