"""4-bit checkpoints: save, load, validate (docs/FORMAT.md is the specification).

A checkpoint is a safetensors file, or a directory of shards plus ``dcgen_quant.index.json``
when large. Tensors: every entry of the quantized model's ``state_dict`` (quantized layers under
their diffusers names: ``<name>.qweight``, ``.wscales``, ``.wtscale``, ``.smooth_factor``,
``.proj_down``, ``.proj_up``, ``.bias``; everything else unchanged). Metadata (JSON strings):
format and version, quantization config, model class + config, the quantized layers, per-layer
calibration error stats, a CRC-32 per tensor, tool version.

Writes are atomic. Loading validates version, metadata, the presence, shape and dtype of every
quantized layer's tensors, and the checksums, and fails with a message naming the bad key.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .atomic import TargetExistsError, atomic_path, atomic_write_text, check_target
from .formats import get_format
from .nn import SVDQConv1x1, SVDQLinear, SVDQSplitLinear, W4A16Conv1x1, W4A16Linear

FORMAT_NAME = "dcgen_quant"
# Version 2 adds unsigned activation codes ("act_unsigned") and split layers ("svdq_split"). A
# checkpoint is written with the lowest version that holds it, so that readers of version 1 (which
# would ignore "act_unsigned" and compute wrong outputs) refuse only the files they cannot run.
FORMAT_VERSION = 2
READABLE_VERSIONS = tuple(range(1, FORMAT_VERSION + 1))
INDEX_NAME = "dcgen_quant.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

LAYER_KINDS: dict[str, type[nn.Module]] = {
    "svdq": SVDQLinear,
    "svdq_conv1x1": SVDQConv1x1,
    "w4a16": W4A16Linear,
    "w4a16_conv1x1": W4A16Conv1x1,
    "svdq_split": SVDQSplitLinear,  # a container: its parts are "svdq" entries of their own
}
_KIND_OF = {cls: kind for kind, cls in LAYER_KINDS.items()}


class CheckpointError(ValueError):
    """A checkpoint is malformed, altered, truncated or does not fit the model."""


# --------------------------------------------------------------------------------------------
# metadata


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"metadata {key!r}: unknown dtype {name!r}")
    return dtype


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    return str(value)


def format_version_for(layers: dict[str, dict[str, Any]]) -> int:
    """The lowest format version that holds ``layers`` (see FORMAT_VERSION)."""
    needs_2 = any(
        isinstance(i, dict) and (i.get("act_unsigned") or i.get("kind") == "svdq_split")
        for i in layers.values()
    )
    return 2 if needs_2 else 1


def _build_metadata(model, config, report, checksums) -> dict[str, str]:
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
        "checksums": checksums,
    }
    # safetensors metadata is str -> str: every value is JSON except the plain format name
    return {k: v if k == "format" else json.dumps(v) for k, v in fields.items()}


def _crc32(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{zlib.crc32(data):08x}"


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
        metadata = _build_metadata(model, config, report, checksums)
    path = Path(path)
    shards = _shards(tensors, max_shard_bytes)
    if path.suffix == ".safetensors" and len(shards) == 1:
        check_output(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
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
            save_file(shard, str(tmp / name), metadata={"format": FORMAT_NAME})
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
            foreign = (_open(path).metadata() or {}).get("format") != FORMAT_NAME
        except CheckpointError:
            foreign = True
        if foreign:
            raise TargetExistsError(
                f"{path} exists and is not a dcgen_quant checkpoint; refusing to overwrite it"
            )
    return path


# --------------------------------------------------------------------------------------------
# read + validate


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like a checkpoint :func:`save_quantized` writes: a
    ``.safetensors`` file or a directory with the shard index (not validated here)."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".safetensors") or (path / INDEX_NAME).is_file()


class _Reader:
    """Uniform access to a single-file or sharded checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            index_path = path / INDEX_NAME
            if not index_path.is_file():
                raise CheckpointError(f"{path} is a directory without {INDEX_NAME}")
            try:
                index = json.loads(index_path.read_text())
                self.metadata = index["metadata"]
                self.weight_map = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path} is not a valid index: {exc}") from None
            self.files = sorted({path / f for f in self.weight_map.values()})
        elif path.is_file():
            self.files = [path]
            self.metadata = _open(path).metadata() or {}
            self.weight_map = None
        else:
            raise FileNotFoundError(f"checkpoint not found: {path}")

    def keys(self) -> list[str]:
        if self.weight_map is not None:
            return list(self.weight_map)
        return list(_open(self.path).keys())

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            handle = _open(file)
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                try:
                    t = handle.get_tensor(key)
                except Exception as exc:  # safetensors raises its own error types
                    raise CheckpointError(
                        f"cannot read tensor {key!r} from {file}: {exc}"
                    ) from None
                # safetensors hands out tensors 16 bytes off the 64-byte alignment of torch's
                # own allocations; MKL / oneDNN take other code paths for them and round
                # differently, so a loaded model would not reproduce the saved one's outputs bit
                # for bit. A copy is aligned.
                yield key, (t.clone() if t.data_ptr() % 64 else t)


def _open(file: Path):
    if not file.is_file():
        raise CheckpointError(f"checkpoint shard missing: {file}")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # truncated / not safetensors
        raise CheckpointError(
            f"{file} is not a readable safetensors file (truncated?): {exc}"
        ) from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decoded metadata of a checkpoint; checks the format name and version."""
    raw = _Reader(Path(path)).metadata
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path}: metadata 'format' is {raw.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    meta = {}
    for key in ("format_version", "quantization_config", "model", "layers", "checksums"):
        if key not in raw:
            raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value) if key != "format" else value
        except (json.JSONDecodeError, TypeError):
            raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON") from None
    version = meta["format_version"]
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: format_version {version} is not supported by dcgen_quant "
            f"{__version__} (reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if isinstance(meta["layers"], dict) and format_version_for(meta["layers"]) > version:
        raise CheckpointError(
            f"{path}: format_version {version} cannot hold unsigned activations or split "
            "layers, but 'layers' has them"
        )
    return meta


def _expected_layer_tensors(
    name: str, info: dict[str, Any]
) -> dict[str, tuple[tuple, torch.dtype]]:
    try:
        spec = get_format(info["fmt"])
        n, k = int(info["out_features"]), int(info["in_features"])
        dtype = _dtype_from_name(info["dtype"], f"layers.{name}.dtype")
        rank = int(info.get("rank", 0))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"metadata 'layers' entry {name!r} is malformed: {exc}") from None
    if info["kind"] == "svdq_split":
        return {}  # no tensors of its own
    scale_dtype = spec.scale_dtype(dtype)
    expected = {
        "qweight": ((n, k // 2), torch.uint8),
        "wscales": ((k // spec.group_size, n), scale_dtype),
    }
    if spec.has_tensor_scale:
        expected["wtscale"] = ((), torch.float32)
    if info.get("bias"):
        expected["bias"] = ((n,), dtype)
    if info["kind"].startswith("svdq"):
        expected["smooth_factor"] = ((k,), dtype)
        expected["proj_down"] = ((k, rank), dtype)
        expected["proj_up"] = ((n, rank), dtype)
    return {f"{name}.{t}": v for t, v in expected.items()}


def _validate_tensor(key, t, expected, checksums, verify):
    shape, dtype = expected
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise CheckpointError(
            f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}"
        )
    if verify and checksums.get(key) != _crc32(t):
        raise CheckpointError(
            f"tensor {key!r} does not match its checksum: the file was altered or corrupted"
        )


# --------------------------------------------------------------------------------------------
# load


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init); buffers stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _model_class(description: dict[str, Any]):
    import diffusers
    from diffusers.configuration_utils import ConfigMixin

    name = description.get("class")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and issubclass(cls, ConfigMixin)):
        raise CheckpointError(f"metadata 'model.class' {name!r} is not a diffusers model class")
    return cls


def _check_model_matches(model: nn.Module, description: dict[str, Any]) -> None:
    if type(model).__name__ != description.get("class"):
        raise CheckpointError(
            f"checkpoint is for {description.get('class')}, "
            f"the given model is {type(model).__name__}"
        )
    mine = json.loads(json.dumps(dict(getattr(model, "config", {})), default=_jsonable))
    for key, value in description.get("config", {}).items():
        if not key.startswith("_") and key in mine and mine[key] != value:
            raise CheckpointError(
                f"checkpoint comes from another model: config {key!r} is {value!r} in the "
                f"checkpoint but {mine[key]!r} in the given model"
            )


def _split_placeholder(name: str, info: dict[str, Any]) -> SVDQSplitLinear:
    """An SVDQSplitLinear whose parts (rank 0, on meta) the part entries replace."""
    splits, k = info.get("splits"), info.get("in_features")
    if (
        not isinstance(splits, list)
        or len(splits) < 2
        or not all(isinstance(s, int) and s > 0 for s in splits)
        or sum(splits) != k
    ):
        raise CheckpointError(
            f"metadata 'layers' entry {name!r}: splits={splits!r} must be two or more positive "
            f"ints summing to in_features={k!r}"
        )
    dtype = _dtype_from_name(info["dtype"], f"layers.{name}.dtype")
    n = int(info["out_features"])
    return SVDQSplitLinear([SVDQLinear(s, n, 0, info["fmt"], False, dtype, "meta") for s in splits])


def _install_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    placeholders: dict[str, list[nn.Module]] = {}  # split layer -> its placeholder parts
    for name, info in layers.items():
        cls = LAYER_KINDS.get(info.get("kind"))
        if cls is None:
            raise CheckpointError(
                f"metadata 'layers' entry {name!r} has unknown kind {info.get('kind')!r}"
            )
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"layer {name!r} of the checkpoint does not exist in the model"
            ) from None
        if cls is SVDQSplitLinear:
            split = _split_placeholder(name, info)
            placeholders[name] = list(split.parts)
            model.set_submodule(name, split)
            continue
        kwargs = {"fmt": info["fmt"], "bias": bool(info["bias"])}
        kwargs["dtype"] = _dtype_from_name(info["dtype"], f"layers.{name}.dtype")
        if info["kind"].startswith("svdq"):
            kwargs["rank"] = int(info["rank"])
        if "act_unsigned" in info:
            unsigned = info["act_unsigned"]
            if not info["kind"].startswith("svdq") or not isinstance(unsigned, bool):
                raise CheckpointError(
                    f"metadata 'layers' entry {name!r}: act_unsigned={unsigned!r} needs a W4A4 "
                    "(svdq) layer and a boolean"
                )
            kwargs["act_unsigned"] = unsigned
        try:
            layer = cls(int(info["in_features"]), int(info["out_features"]), **kwargs)
        except ValueError as exc:
            raise CheckpointError(f"metadata 'layers' entry {name!r}: {exc}") from None
        model.set_submodule(name, layer)
    for name, originals in placeholders.items():
        for i, (part, original) in enumerate(zip(model.get_submodule(name).parts, originals)):
            if part is original or part.in_features != original.in_features:
                raise CheckpointError(
                    f"layer {name!r} (svdq_split) has no valid 'layers' entry for its part "
                    f"{name}.parts.{i}"
                )


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
    verify : check every tensor against its CRC-32
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
    reader = _Reader(path)
    meta = read_metadata(path)
    description, layers = meta["model"], meta["layers"]
    if model is None:
        cls = _model_class(description)
        config = {k: v for k, v in description.get("config", {}).items() if not k.startswith("_")}
        with _parameters_on_meta():
            model = cls.from_config(config)
    else:
        _check_model_matches(model, description)
    _install_layers(model, layers)

    expected: dict[str, tuple] = {}
    for name, info in layers.items():
        expected.update(_expected_layer_tensors(name, info))
    model_keys = set(model.state_dict())
    file_keys = set(reader.keys())
    if missing := sorted(model_keys - file_keys):
        raise CheckpointError(
            f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing)"
        )
    if unexpected := sorted(file_keys - model_keys):
        raise CheckpointError(
            f"checkpoint has tensor {unexpected[0]!r} that the model does not "
            f"({len(unexpected)} extra)"
        )
    state = {}
    reference = model.state_dict()
    for key, t in reader.tensors():
        want = expected.get(key, (tuple(reference[key].shape), t.dtype))
        _validate_tensor(key, t, want, meta["checksums"], verify)
        state[key] = t
    model.load_state_dict(state, strict=True, assign=True)
    if on_meta := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise CheckpointError(f"tensor {on_meta[0]!r} was not loaded (still on the meta device)")
    model.to(device)
    if layout != "canonical":
        _set_layouts(model, layout, torch.device(device))
    if fuse:
        from .fusion import fuse_projections

        fuse_projections(model)
    from .quantize.config import QuantConfig

    model.dcgen_quant_config = QuantConfig.from_dict(meta["quantization_config"])
    model.dcgen_quant_report = meta.get("calibration")
    return model.eval()


def _set_layouts(model: nn.Module, layout: str, device: torch.device) -> None:
    from .ops import preferred_layout

    for module in model.modules():
        if type(module) in _KIND_OF:
            name = preferred_layout(module.fmt, device) if layout == "auto" else layout
            module.set_layout(name)
