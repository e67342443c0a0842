"""4-bit checkpoints: save, load, validate (docs/FORMAT.md is the specification).

A checkpoint is a safetensors file, or a directory of shards plus ``dcgen_quant.index.json``
when large. Tensors: every entry of the quantized model's ``state_dict`` (quantized layers under
their diffusers names: ``<name>.qweight``, ``.wscales``, ``.wtscale``, ``.smooth_factor``,
``.proj_down``, ``.proj_up``, ``.bias``; everything else unchanged). Metadata (JSON strings):
format and version, quantization config, model class + config, the quantized layers, per-layer
calibration error stats, a CRC-32 per tensor, tool version, and the header checksum over all of
it and the tensor table.

Writes are atomic. Reading is one pipeline for ``load_quantized`` and ``inspect``
(:func:`open_checkpoint`, :func:`read_tensors`): the files (:mod:`.checkpoint_files`), the
metadata and header checksum (:mod:`.checkpoint_schema`), the model the config describes and
its structure (:mod:`.checkpoint_model`), then the tensors' CRCs and values. Every failure is a
CheckpointError naming the key, tensor or file.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .atomic import TargetExistsError, atomic_path, atomic_write_text, check_target, check_writable
from .checkpoint_files import (
    SAFETENSORS_NAMES,
    CheckpointFiles,
    check_values,
    read_header,
    save_safetensors,
)
from .checkpoint_files import crc32 as _crc32
from .checkpoint_model import (
    _jsonable,
    check_model_config,
    check_model_matches,
    check_structure,
    install_layers,
    parameters_on_meta,  # noqa: F401  (for the interop importer's skeletons)
    skeleton,
)
from .checkpoint_schema import (  # noqa: F401  (re-exported: the public checkpoint API)
    _KIND_OF,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    INTEGRITY_KEY,
    LAYER_KINDS,
    READABLE_VERSIONS,
    CheckpointError,
    TensorSpec,
    _dtype_name,
    check_integrity,
    decode_metadata,
    entry_tensors,
    format_version_for,
    integrity_record,
    validate,
)
from .nn import SVDQSplitLinear

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# --------------------------------------------------------------------------------------------
# metadata


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Describe every 4-bit layer of ``model``: name -> kind, features, rank, format, dtype."""
    layers = {}
    containers: set[str] = set()
    for name, module in model.named_modules():
        kind = _KIND_OF.get(type(module))
        if kind is None:
            continue
        if isinstance(module, SVDQSplitLinear):
            containers.add(name)
            layers[name] = {  # listed before its parts, which loading installs into it
                "kind": kind,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "splits": module.splits,
                "rank": max(p.rank for p in module.parts),
                "fmt": module.fmt,
                "bias": module.parts[0].bias is not None,  # the layer's own bias, in part 0
                "dtype": _dtype_name(module.dtype),
            }
            continue
        layers[name] = {
            "kind": kind,
            "in_features": module.in_features,
            "out_features": module.out_features,
            "rank": getattr(module, "rank", 0),
            "fmt": module.fmt,
            "bias": module.bias is not None,
            "dtype": _dtype_name(module.dtype),
        }
        if getattr(module, "act_unsigned", False):
            layers[name]["act_unsigned"] = True  # absent means signed activation codes
        if (parent := name.rpartition(".parts.")[0]) in containers:
            layers[name]["part_of"] = parent
    return layers


def _model_description(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError(
            f"{type(model).__name__} has no diffusers config; save_quantized needs a diffusers "
            "model (ModelMixin + ConfigMixin) so that load_quantized can rebuild it"
        )
    # Private keys (_name_or_path is a local path, _use_default_values bookkeeping) are not part
    # of the architecture; the diffusers version is kept for reference.
    kept = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    kept["_diffusers_version"] = dict(config).get("_diffusers_version")
    return {
        "library": type(model).__module__.split(".")[0],
        "class": type(model).__name__,
        "config": json.loads(json.dumps(kept, default=_jsonable)),
    }


def _build_metadata(
    model: nn.Module,
    config,
    report,
    checksums: dict[str, str],
    table: dict[str, list] | None = None,
) -> dict[str, str]:
    """The safetensors metadata of a checkpoint of ``model``, sealed with its header checksum.

    Parameters
    ----------
    model : the quantized model (its layers may live on the meta device)
    config, report : QuantConfig / QuantReport or their dicts
    checksums : ``{tensor: CRC-32}`` of every tensor the file holds (placeholders are fine for
        a streaming writer that calls :func:`seal_metadata` again once they are known)
    table : the file's tensor table (:func:`tensor_table`); default: ``model.state_dict()``'s,
        which is what a checkpoint of ``model`` holds
    """
    layers = quantized_layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers; run quantize_model first")
    qconfig = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    qconfig.setdefault("method", "svdquant")
    report_dict = report.to_dict() if hasattr(report, "to_dict") else (report or {})
    fields = {
        "format": FORMAT_NAME,
        "format_version": format_version_for(layers),
        "tool_version": __version__,
        "quantization_config": qconfig,
        "model": _model_description(model),
        "layers": layers,
        "calibration": report_dict,
        "checksums": dict(checksums),
    }
    # safetensors metadata is str -> str: every value is JSON except the plain format name
    metadata = {k: v if k == "format" else json.dumps(v) for k, v in fields.items()}
    return seal_metadata(metadata, tensor_table(model.state_dict()) if table is None else table)


def tensor_table(tensors) -> dict[str, list]:
    """``{name: [safetensors dtype name, shape]}`` of ``{name: tensor}`` (meta tensors too):
    the tensor table the header checksum covers."""
    return {k: [SAFETENSORS_NAMES[t.dtype], list(t.shape)] for k, t in tensors.items()}


def seal_metadata(metadata: dict[str, str], table: dict[str, list]) -> dict[str, str]:
    """``metadata`` (the str -> str map of a safetensors header) with its header checksum
    (``integrity``) computed over its values and the tensor table ``table``
    (:func:`tensor_table`). The checksum's JSON has a fixed length for a given set of keys, so
    a writer that reserved the header's space can seal again once the CRCs are known."""
    body = {k: v for k, v in metadata.items() if k != INTEGRITY_KEY}
    # the checksum covers the values as every reader decodes them
    decoded = {k: v if k == "format" else json.loads(v) for k, v in body.items()}
    return {**body, INTEGRITY_KEY: json.dumps(integrity_record(decoded, table))}


def _expected_layer_tensors(name: str, info: dict[str, Any]) -> dict[str, tuple]:
    """``{tensor: (shape, dtype)}`` a ``layers`` entry owns (validated alone: CheckpointError
    naming the key). Kept for the interop modules; :func:`entry_tensors` has the value rules."""
    return {k: (s.shape, s.dtype) for k, s in entry_tensors(name, info).items()}


# --------------------------------------------------------------------------------------------
# save


def _tensors_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, detached, contiguous, on CPU, with no two entries sharing storage."""
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # safetensors refuses tensors that share or view a storage
            seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return tensors


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    return shards


def save_quantized(
    model: nn.Module,
    path: str | Path,
    config=None,
    report=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a quantized diffusers model as a 4-bit checkpoint (atomically).

    Parameters
    ----------
    model : a diffusers model whose target layers are SVDQLinear / W4A16Linear (from
        ``quantize_model`` or ``load_quantized``)
    path : ``*.safetensors`` for one file; any other path (or a model larger than
        ``max_shard_bytes``) becomes a directory of shards with ``dcgen_quant.index.json``
    config : QuantConfig (or its dict); default ``model.dcgen_quant_config``
    report : QuantReport (or its dict); default ``model.dcgen_quant_report``

    Returns
    -------
    The path written.
    """
    config = config if config is not None else getattr(model, "dcgen_quant_config", None)
    if config is None:
        raise CheckpointError(
            "no quantization config: pass config= or quantize the model with quantize_model"
        )
    report = report if report is not None else getattr(model, "dcgen_quant_report", None)
    from .fusion import unfused

    with unfused(model):  # checkpoints hold the member projections, never the fused ones
        tensors = _tensors_for_saving(model)
        checksums = {k: _crc32(t) for k, t in tensors.items()}
        metadata = _build_metadata(model, config, report, checksums, tensor_table(tensors))
    path = Path(path)
    shards = _shards(tensors, max_shard_bytes)
    if path.suffix == ".safetensors" and len(shards) == 1:
        check_output(path)
        with atomic_path(path) as tmp:
            save_safetensors(tensors, tmp, metadata, path)
        return path
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"the model needs {len(shards)} shards of at most {max_shard_bytes} bytes; give a "
            f"directory path instead of {str(path)!r}"
        )
    check_output(path, directory=True)
    with atomic_path(path, directory=True, replaceable=_is_checkpoint_dir) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, tmp / name, {"format": FORMAT_NAME}, path / name)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": metadata, "weight_map": weight_map}
        atomic_write_text(tmp / INDEX_NAME, json.dumps(index, indent=1))
    return path


def _is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds only a sharded checkpoint (index + shards), so it may be replaced."""
    names = [p.name for p in path.iterdir()]
    return INDEX_NAME in names and all(
        n == INDEX_NAME or fnmatch.fnmatch(n, "model-*-of-*.safetensors") for n in names
    )


def check_output(path: str | Path, directory: bool | None = None) -> Path:
    """Refuse a checkpoint output path whose current content writing would destroy.

    ``path`` may be new, an existing checkpoint file (overwritten), or an existing sharded
    checkpoint directory holding nothing else (replaced). An existing directory with other
    content, a directory where a file is due (or the reverse), or a ``.safetensors`` file that is
    not a dcgen_quant checkpoint (say, the model's own weights) raises TargetExistsError.
    ``directory`` defaults to "not a .safetensors path", as :func:`save_quantized` decides.
    """
    path = Path(path)
    if directory is None:
        directory = path.suffix != ".safetensors"
    check_target(path, directory, replaceable=_is_checkpoint_dir)
    if not directory and path.is_file():
        try:
            foreign = read_header(path)[1].get("format") != FORMAT_NAME
        except CheckpointError:
            foreign = True
        if foreign:
            raise TargetExistsError(
                f"{path} exists and is not a dcgen_quant checkpoint; refusing to overwrite it"
            )
    check_writable(path)
    return path


# --------------------------------------------------------------------------------------------
# read + validate (one pipeline for load_quantized and inspect)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like a checkpoint :func:`save_quantized` writes: a
    ``.safetensors`` file or a directory with the shard index (not validated here)."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".safetensors") or (path / INDEX_NAME).is_file()


@dataclass
class OpenedCheckpoint:
    """A checkpoint whose headers passed every check (no tensor data read yet)."""

    files: CheckpointFiles
    meta: dict[str, Any]  # decoded metadata
    specs: dict[str, TensorSpec]  # the quantized layers' tensors
    authenticated: bool  # the header checksum was present and matched
    model: nn.Module | None = None  # the skeleton (parameters on meta, 4-bit layers installed)


def open_header(path: str | Path) -> OpenedCheckpoint:
    """Check a checkpoint's files, metadata, header checksum and model config, as
    :func:`open_checkpoint` does, without building its model (no tensor is read).

    For readers that take the tensors one by one (``dcgen_quant.interop``): the result's
    ``files.tensors`` says where each one is, ``specs`` its value rule.
    """
    path = Path(path)
    files = CheckpointFiles(path)
    meta = decode_metadata(files.raw_metadata, str(path))
    table = {k: [e.dtype_name, list(e.shape)] for k, e in files.tensors.items()}
    authenticated = check_integrity(meta, table, str(path))
    shapes = {k: (e.dtype, e.shape) for k, e in files.tensors.items()}
    specs = validate(meta, shapes)
    check_model_config(meta["model"], shapes, meta["layers"])
    return OpenedCheckpoint(files, meta, specs, authenticated)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decoded metadata of a checkpoint, after every header check (no tensor is read)."""
    return open_header(path).meta


def open_checkpoint(path: str | Path, model: nn.Module | None = None) -> OpenedCheckpoint:
    """Check a checkpoint's headers, metadata and structure; build its model's skeleton.

    Parameters
    ----------
    path : checkpoint file or sharded directory
    model : a model to load into (checked against the metadata); default: one built from the
        metadata with its parameters on the meta device

    Raises CheckpointError naming the problem; nothing but the meta skeleton is allocated.
    """
    opened = open_header(path)
    if model is None:
        model = skeleton(opened.meta["model"], len(opened.files.tensors))
    else:
        check_model_matches(model, opened.meta["model"])
    install_layers(model, opened.meta["layers"])
    shapes = {k: (e.dtype, e.shape) for k, e in opened.files.tensors.items()}
    check_structure(model, shapes, opened.specs)
    opened.model = model
    return opened


def check_tensor(opened: OpenedCheckpoint, name: str, t: torch.Tensor) -> None:
    """Check tensor ``name`` of ``opened`` against its CRC-32, then its values (finite scales,
    positive smoothing factors, ...); CheckpointError naming it."""
    if opened.meta["checksums"][name].lower() != _crc32(t):
        raise CheckpointError(
            f"tensor {name!r} does not match its checksum: the file was altered or corrupted"
        )
    spec = opened.specs.get(name)
    check_values(name, t, spec.rule if spec else "finite")


def read_tensors(opened: OpenedCheckpoint, verify: bool = True, keep: bool = True):
    """Read every tensor; with ``verify``, check its CRC-32 and its values (finite scales,
    positive smoothing factors, ...). Returns ``{name: tensor}`` (empty unless ``keep``)."""
    state = {}
    for entry, t in opened.files.read():
        if verify:
            check_tensor(opened, entry.name, t)
        if keep:
            state[entry.name] = t
    return state


# --------------------------------------------------------------------------------------------
# load


def load_quantized(
    path: str | Path,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    layout: str = "auto",
    verify: bool = True,
    fuse: bool = False,
) -> nn.Module:
    """Load a 4-bit checkpoint into a model with SVDQLinear / W4A16Linear layers.

    Parameters
    ----------
    path : checkpoint file or sharded directory (from :func:`save_quantized`); a Nunchaku
        FLUX checkpoint or DeepCompressor output folder is imported instead (docs/INTEROP.md)
    model : optional diffusers model of the same class and config to load into (its 16-bit
        target layers are replaced); by default the model is rebuilt from the metadata alone
    device : where the loaded model lives
    layout : nibble layout of ``qweight`` in memory: ``"auto"`` (the preferred layout of the
        backend that will run on ``device``), ``"canonical"`` or a registered layout name
    verify : check every tensor against its CRC-32 and its values (finite, and positive where
        the format needs it); ``False`` skips that pass for trusted files (the header, metadata
        and structure are always checked)
    fuse : run each FLUX attention's q/k/v (and added q/k/v) projections as one layer
        (:func:`dcgen_quant.fusion.fuse_projections`); the outputs do not change

    Returns
    -------
    The model in eval mode, with ``dcgen_quant_config`` / ``dcgen_quant_report`` attached.
    """
    path = Path(path)
    from .interop.nunchaku.detect import foreign_kind

    if foreign_kind(path):  # a Nunchaku checkpoint or DeepCompressor folder (docs/INTEROP.md)
        from .interop.nunchaku.importer import load_foreign

        return load_foreign(path, model, device, layout, fuse)
    opened = open_checkpoint(path, model)
    if not opened.authenticated:
        warnings.warn(
            f"{path}: no header checksum (written by dcgen_quant 0.1.0 or earlier): its metadata "
            "is validated but not authenticated; save it again to add one",
            stacklevel=2,
        )
    model = opened.model
    model.load_state_dict(read_tensors(opened, verify), strict=True, assign=True)
    for module in model.modules():  # empty non-persistent buffers (dtype markers) made on meta
        for name, t in list(module._buffers.items()):
            if t is not None and t.is_meta and t.numel() == 0:
                module._buffers[name] = torch.empty(t.shape, dtype=t.dtype)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise CheckpointError(f"tensor {name!r} was not loaded (still on the meta device)")
    model.to(device)
    if layout != "canonical":
        _set_layouts(model, layout, torch.device(device))
    if fuse:
        from .fusion import fuse_projections

        fuse_projections(model)
    from .quantize.config import QuantConfig

    model.dcgen_quant_config = QuantConfig.from_dict(opened.meta["quantization_config"])
    model.dcgen_quant_report = opened.meta.get("calibration")
    return model.eval()


def _set_layouts(model: nn.Module, layout: str, device: torch.device) -> None:
    from .ops import preferred_layout

    for module in model.modules():
        if type(module) in _KIND_OF:
            name = preferred_layout(module.fmt, device) if layout == "auto" else layout
            module.set_layout(name)


# --------------------------------------------------------------------------------------------
# public helpers for writers that assemble a checkpoint themselves (quantize/stream_writer.py)


def build_metadata(model: nn.Module, config, report, checksums: dict[str, str]) -> dict[str, str]:
    """The safetensors metadata :func:`save_quantized` writes for ``model`` (whose layers may
    live on the meta device) with the given per-tensor CRC-32s."""
    return _build_metadata(model, config, report, checksums)


def tensor_crc32(t: torch.Tensor) -> str:
    """The CRC-32 of a tensor's bytes as the metadata's ``checksums`` record it."""
    return _crc32(t)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds only a sharded checkpoint (index + shards)."""
    return _is_checkpoint_dir(Path(path))
