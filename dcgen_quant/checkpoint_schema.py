"""Checkpoint metadata: format constants, decoding and validation (docs/FORMAT.md).

What a checkpoint's header must say, checked before any tensor is read: the format name and
version, the metadata keys, the quantized layers and the tensors each of them owns.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .formats import get_format
from .nn import SVDQConv1x1, SVDQLinear, SVDQSplitLinear, W4A16Conv1x1, W4A16Linear

FORMAT_NAME = "dcgen_quant"
# Version 2 adds unsigned activation codes ("act_unsigned") and split layers ("svdq_split"). A
# checkpoint is written with the lowest version that holds it, so that readers of version 1 (which
# would ignore "act_unsigned" and compute wrong outputs) refuse only the files they cannot run.
FORMAT_VERSION = 2
READABLE_VERSIONS = tuple(range(1, FORMAT_VERSION + 1))
INDEX_NAME = "dcgen_quant.index.json"

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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"metadata {key!r}: unknown dtype {name!r}")
    return dtype


def format_version_for(layers: dict[str, dict[str, Any]]) -> int:
    """The lowest format version that holds ``layers`` (see FORMAT_VERSION)."""
    needs_2 = any(
        isinstance(i, dict) and (i.get("act_unsigned") or i.get("kind") == "svdq_split")
        for i in layers.values()
    )
    return 2 if needs_2 else 1


def _crc32(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{zlib.crc32(data):08x}"


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decoded metadata of a checkpoint; checks the format name and version."""
    from .checkpoint_files import _Reader

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
