"""Checkpoint metadata: format constants, decoding, header checksum and schema (docs/FORMAT.md).

Everything here reads the header only (metadata and the tensor table: names, dtypes, shapes)
and runs before any tensor is allocated, identically for ``load_quantized`` and ``inspect``:

1. :func:`decode_metadata`: the format name, the version, the required keys, JSON values.
2. :func:`check_integrity`: the header checksum (``integrity``: a SHA-256 over the canonical
   JSON of the metadata and the tensor table, plus a CRC-32 per field to name what was edited).
3. :func:`validate`: one schema for all metadata (types, ranges, required keys, enumerations;
   every quantized layer's tensors present with the shape and dtype its entry implies;
   a checksum per tensor), giving the value rule of every tensor (finite, positive, ...).

Every failure is a :class:`CheckpointError` that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import __version__
from .formats import FORMATS
from .nn import SVDQConv1x1, SVDQLinear, SVDQSplitLinear, W4A16Conv1x1, W4A16Linear

FORMAT_NAME = "dcgen_quant"
# Version 2 adds unsigned activation codes ("act_unsigned") and split layers ("svdq_split"). A
# checkpoint is written with the lowest version that holds it, so that readers of version 1 (which
# would ignore "act_unsigned" and compute wrong outputs) refuse only the files they cannot run.
# The header checksum ("integrity") needs no new version: earlier readers ignore it and still
# compute every file correctly; this reader checks it wherever it is present.
FORMAT_VERSION = 2
READABLE_VERSIONS = tuple(range(1, FORMAT_VERSION + 1))
INDEX_NAME = "dcgen_quant.index.json"
INTEGRITY_KEY = "integrity"
REQUIRED_KEYS = ("format_version", "quantization_config", "model", "layers", "checksums")
TENSOR_TABLE = "tensor table"  # the integrity field of the tensors' names, dtypes and shapes

LAYER_KINDS: dict[str, type[nn.Module]] = {
    "svdq": SVDQLinear,
    "svdq_conv1x1": SVDQConv1x1,
    "w4a16": W4A16Linear,
    "w4a16_conv1x1": W4A16Conv1x1,
    "svdq_split": SVDQSplitLinear,  # a container: its parts are "svdq" entries of their own
}
_KIND_OF = {cls: kind for kind, cls in LAYER_KINDS.items()}
LAYER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_FEATURES = 1 << 20  # widest linear accepted (FLUX.1's widest: 15360)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_LAYER_KEYS = {"kind", "in_features", "out_features", "rank", "fmt", "bias", "dtype"}
_OPTIONAL_LAYER_KEYS = {"act_unsigned", "splits", "part_of"}


class CheckpointError(ValueError):
    """A checkpoint is malformed, altered, truncated or does not fit the model."""


def show(value: Any, limit: int = 80) -> str:
    """A short repr of a value read from a file, for messages (one line, bounded length)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = LAYER_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointError(
            f"metadata {key!r} is {show(name)}; expected one of {', '.join(LAYER_DTYPES)}"
        )
    return dtype


def format_version_for(layers: dict[str, dict[str, Any]]) -> int:
    """The lowest format version that holds ``layers`` (see FORMAT_VERSION)."""
    needs_2 = any(
        isinstance(i, dict) and (i.get("act_unsigned") or i.get("kind") == "svdq_split")
        for i in layers.values()
    )
    return 2 if needs_2 else 1


# --------------------------------------------------------------------------------------------
# 1. decoding


def decode_metadata(raw: dict[str, str], where: str) -> dict[str, Any]:
    """JSON-decode the metadata map; check the format name, the version and the required keys."""
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{where}: metadata 'format' is {show(raw.get('format'))}, expected {FORMAT_NAME!r} "
            "(not a dcgen_quant checkpoint)"
        )
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise CheckpointError(f"{where}: metadata key {key!r} is missing")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "format":
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except (ValueError, TypeError, RecursionError):
            raise CheckpointError(f"{where}: metadata {show(key)} is not valid JSON") from None
    version = meta["format_version"]
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where}: format_version {show(version)} is not supported by dcgen_quant "
            f"{__version__} (reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if isinstance(meta["layers"], dict) and format_version_for(meta["layers"]) > version:
        raise CheckpointError(
            f"{where}: format_version {version} cannot hold unsigned activations or split "
            "layers, but 'layers' has them"
        )
    return meta


# --------------------------------------------------------------------------------------------
# 2. the header checksum


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _crc(value: Any) -> str:
    return f"{zlib.crc32(_canonical(value)):08x}"


def integrity_fields(meta: dict[str, Any], table: dict[str, list]) -> dict[str, str]:
    """A CRC-32 per metadata field: what lets a mismatch name the field that was edited.

    Fields are the top-level keys, and inside ``layers``, ``quantization_config``, ``model`` and
    ``model.config`` each entry (the container itself then covers the names of its entries
    only), and the tensor table."""
    fields = {}

    def add(path: str, value: Any, split: bool) -> None:
        if not (split and isinstance(value, dict)):
            fields[path] = _crc(value)
            return
        fields[path] = _crc(sorted(value))  # which entries exist
        for key, sub in value.items():
            add(f"{path}.{key}", sub, path in ("model", "model.config") and key == "config")

    for key, value in meta.items():
        if key != INTEGRITY_KEY:
            add(key, value, key in ("layers", "quantization_config", "model"))
    fields[TENSOR_TABLE] = _crc(table)
    return fields


def header_digest(meta: dict[str, Any], table: dict[str, list]) -> str:
    """SHA-256 of the canonical JSON of the decoded metadata (``integrity`` left out) and the
    tensor table ``{name: [safetensors dtype, shape]}``."""
    body = {k: v for k, v in meta.items() if k != INTEGRITY_KEY}
    return hashlib.sha256(_canonical({"metadata": body, "tensors": table})).hexdigest()


def integrity_record(meta: dict[str, Any], table: dict[str, list]) -> dict[str, Any]:
    """The ``integrity`` metadata value of a header (what :func:`check_integrity` verifies)."""
    return {"sha256": header_digest(meta, table), "fields": integrity_fields(meta, table)}


def check_integrity(meta: dict[str, Any], table: dict[str, list], where: str) -> bool:
    """Verify the header checksum; False for a file written before it existed (no key)."""
    record = meta.get(INTEGRITY_KEY)
    if record is None and INTEGRITY_KEY not in meta:
        return False
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("sha256"), str)
        or not _HEX64.fullmatch(record["sha256"])
        or not isinstance(record.get("fields"), dict)
    ):
        raise CheckpointError(f"{where}: metadata 'integrity' is malformed (edited?)")
    if record["sha256"].lower() == header_digest(meta, table):
        return True
    stored = record["fields"]
    now = integrity_fields(meta, table)
    changed = [k for k in now if k in stored and str(stored[k]).lower() != now[k]]
    added = [k for k in now if k not in stored]
    removed = [k for k in stored if k not in now]
    # name the most specific fields: a layer entry rather than 'layers' (whose CRC covers the
    # names of its entries), an added entry rather than what it holds
    specific = changed + added + removed
    changed = [k for k in changed if not any(c.startswith(k + ".") for c in specific)]
    added = [k for k in added if not any(k.startswith(a + ".") for a in added)]
    removed = [k for k in removed if not any(k.startswith(r + ".") for r in removed)]
    parts = [f"{show(k)} was edited" for k in changed if k != TENSOR_TABLE]
    parts += [f"{show(k)} was added" for k in added] + [f"{show(k)} was removed" for k in removed]
    if TENSOR_TABLE in changed:
        parts.append("the tensor table (names, dtypes, shapes) was edited")
    if not parts:
        parts = ["'integrity' itself was edited"]
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    raise CheckpointError(
        f"{where}: the header does not match its checksum: metadata {'; '.join(parts[:3])}{more}"
    )


# --------------------------------------------------------------------------------------------
# 3. the schema


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor of a quantized layer must be, and the value rule it obeys."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    rule: str | None  # "finite", "positive", "nonnegative" or None (integer codes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise CheckpointError(f"metadata {show(key, 160)} is {show(value)}; expected {expected}")


def _int_in(value: Any, key: str, lo: int, hi: int) -> int:
    _need(_is_int(value) and lo <= value <= hi, key, value, f"an integer in [{lo}, {hi}]")
    return value


def _dict(value: Any, key: str) -> dict:
    _need(isinstance(value, dict), key, value, "a JSON object")
    return value


def validate(meta: dict[str, Any], table: dict[str, tuple[torch.dtype, tuple]]) -> dict:
    """Check all metadata against itself and the tensor table ``{name: (dtype, shape)}``.

    Returns ``{tensor name: TensorSpec}`` for the tensors of the quantized layers. Raises
    CheckpointError naming the key.
    """
    _check_quant_config(meta["quantization_config"])
    model = _dict(meta["model"], "model")
    _need(isinstance(model.get("class"), str), "model.class", model.get("class"), "a class name")
    _need(
        isinstance(model.get("config", {}), dict),
        "model.config",
        model.get("config"),
        "a JSON object",
    )
    if "tool_version" in meta:
        _need(
            isinstance(meta["tool_version"], str), "tool_version", meta["tool_version"], "a string"
        )
    _check_calibration(meta.get("calibration"))
    specs = layer_tensors(_dict(meta["layers"], "layers"))
    for key, spec in specs.items():
        if key not in table:
            raise CheckpointError(
                f"checkpoint is missing tensor {show(key)} ({_count(specs, table)} missing)"
            )
        dtype, shape = table[key]
        if tuple(shape) != spec.shape or dtype != spec.dtype:
            raise CheckpointError(
                f"tensor {show(key)} is {dtype} {tuple(shape)}, expected {spec.dtype} {spec.shape}"
            )
    checksums = _dict(meta["checksums"], "checksums")
    for key in table:
        value = checksums.get(key)
        if value is None:
            raise CheckpointError(f"metadata 'checksums' has no entry for tensor {show(key)}")
        _need(
            isinstance(value, str) and _HEX8.fullmatch(value),
            f"checksums.{key}",
            value,
            "a CRC-32 of 8 hex digits",
        )
    if extra := sorted(set(checksums) - set(table)):
        raise CheckpointError(
            f"metadata 'checksums' names tensor {show(extra[0])}, which the file does not hold"
        )
    return specs


def _count(specs: dict, table: dict) -> int:
    return sum(k not in table for k in specs)


def layer_tensors(layers: dict[str, Any]) -> dict[str, TensorSpec]:
    """Validate every ``layers`` entry; the tensors each one owns, by name."""
    specs: dict[str, TensorSpec] = {}
    for name, info in layers.items():
        specs.update(entry_tensors(name, info, layers))
    return specs


def entry_tensors(
    name: str, info: Any, layers: dict[str, Any] | None = None
) -> dict[str, TensorSpec]:
    """Validate one ``layers`` entry; the tensors it owns, by name (none for ``svdq_split``).

    ``layers`` is the whole map, for the checks across entries (a split layer and its parts);
    None checks the entry alone. Raises CheckpointError naming the key.
    """
    key = f"layers.{name}"
    _need(
        isinstance(name, str) and len(name) <= 400 and _NAME.fullmatch(name) is not None,
        "layers",
        name,
        "module names (dotted identifiers)",
    )
    _dict(info, key)
    if missing := sorted(_LAYER_KEYS - set(info)):
        raise CheckpointError(f"metadata {show(key, 160)} lacks {show(missing[0])}")
    if unknown := sorted(set(info) - _LAYER_KEYS - _OPTIONAL_LAYER_KEYS):
        raise CheckpointError(f"metadata {show(key, 160)} has unknown key {show(unknown[0])}")
    kind = info["kind"]
    _need(kind in LAYER_KINDS, f"{key}.kind", kind, f"one of {', '.join(LAYER_KINDS)}")
    fmt = info["fmt"]
    _need(fmt in FORMATS, f"{key}.fmt", fmt, f"one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    k = _int_in(info["in_features"], f"{key}.in_features", 1, MAX_FEATURES)
    n = _int_in(info["out_features"], f"{key}.out_features", 1, MAX_FEATURES)
    _need(
        k % spec.group_size == 0,
        f"{key}.in_features",
        k,
        f"a multiple of the {fmt} group size {spec.group_size}",
    )
    svdq = kind.startswith("svdq")
    rank = _int_in(info["rank"], f"{key}.rank", 0, min(n, k) if svdq else 0)
    _need(isinstance(info["bias"], bool), f"{key}.bias", info["bias"], "true or false")
    dtype = _dtype_from_name(info["dtype"], f"{key}.dtype")
    if "act_unsigned" in info:
        unsigned = info["act_unsigned"]
        _need(isinstance(unsigned, bool), f"{key}.act_unsigned", unsigned, "true or false")
        _need(
            not unsigned or (kind == "svdq" and fmt == "int4"),
            f"{key}.act_unsigned",
            unsigned,
            "true only on an int4 W4A4 (svdq) layer",
        )
    if kind == "svdq_split":
        if layers is not None:
            _check_split(name, info, layers)
        return {}  # no tensors of its own
    _need("splits" not in info, f"{key}.splits", info.get("splits"), "absent (not svdq_split)")
    if layers is not None and "part_of" in info:
        _check_part(name, info, layers)
    elif layers is not None and ".parts." in name:  # a part of a split layer must say so
        parent = name.rpartition(".parts.")[0]
        if isinstance(layers.get(parent), dict) and layers[parent].get("kind") == "svdq_split":
            raise CheckpointError(f"metadata {show(key, 160)} lacks 'part_of' ({parent!r})")
    scale_dtype = spec.scale_dtype(dtype)
    owned = {
        "qweight": TensorSpec((n, k // 2), torch.uint8, None),
        # scales are >= 0 (a zero scale: an all-zero group)
        "wscales": TensorSpec((k // spec.group_size, n), scale_dtype, "nonnegative"),
    }
    if spec.has_tensor_scale:
        owned["wtscale"] = TensorSpec((), torch.float32, "positive")
    if info["bias"]:
        owned["bias"] = TensorSpec((n,), dtype, "finite")
    if svdq:
        owned["smooth_factor"] = TensorSpec((k,), dtype, "positive")  # x is divided by it
        owned["proj_down"] = TensorSpec((k, rank), dtype, "finite")
        owned["proj_up"] = TensorSpec((n, rank), dtype, "finite")
    return {f"{name}.{t}": s for t, s in owned.items()}


def _check_split(name: str, info: dict[str, Any], layers: dict[str, Any]) -> None:
    key = f"layers.{name}"
    splits, k = info.get("splits"), info["in_features"]
    group = FORMATS[info["fmt"]].group_size
    _need(
        isinstance(splits, list)
        and 2 <= len(splits) <= 64
        and all(_is_int(s) and s > 0 and s % group == 0 for s in splits)
        and sum(splits) == k,
        f"{key}.splits",
        splits,
        f"two or more positive multiples of {group} summing to in_features={k}",
    )
    _need("part_of" not in info, f"{key}.part_of", info.get("part_of"), "absent")
    for i, width in enumerate(splits):
        part = layers.get(f"{name}.parts.{i}")
        if not isinstance(part, dict) or part.get("part_of") != name:
            raise CheckpointError(
                f"layer {name!r} (svdq_split) has no valid 'layers' entry for its part "
                f"{name}.parts.{i}"
            )
        for attr, want in (
            ("in_features", width),
            ("out_features", info["out_features"]),
            ("fmt", info["fmt"]),
            ("dtype", info["dtype"]),
            ("kind", "svdq"),
        ):
            _need(
                part.get(attr) == want,
                f"layers.{name}.parts.{i}.{attr}",
                part.get(attr),
                f"{want!r} (from its split layer)",
            )
    _need(
        layers[f"{name}.parts.0"].get("bias") == info["bias"],
        f"layers.{name}.parts.0.bias",
        layers[f"{name}.parts.0"].get("bias"),
        f"{info['bias']!r} (part 0 holds the split layer's bias)",
    )
    ranks = [layers[f"{name}.parts.{i}"].get("rank") for i in range(len(splits))]
    if all(_is_int(r) for r in ranks):
        _need(info["rank"] == max(ranks), f"{key}.rank", info["rank"], f"{max(ranks)} (its parts')")


def _check_part(name: str, info: dict[str, Any], layers: dict[str, Any]) -> None:
    key = f"layers.{name}"
    parent = info["part_of"]
    _need(
        isinstance(parent, str)
        and isinstance(layers.get(parent), dict)
        and layers[parent].get("kind") == "svdq_split",
        f"{key}.part_of",
        parent,
        "the name of an svdq_split layer",
    )
    prefix, _, index = name.rpartition(".parts.")
    splits = layers[parent].get("splits")
    _need(
        prefix == parent
        and index.isdigit()
        and isinstance(splits, list)
        and int(index) < len(splits),
        "layers",
        name,
        f"{parent}.parts.<i> for i < the number of splits",
    )


def _check_quant_config(q: Any) -> None:
    from .quantize.config import QuantConfig

    q = _dict(q, "quantization_config")
    fmt = q.get("format")
    _need(fmt in FORMATS, "quantization_config.format", fmt, f"one of {', '.join(FORMATS)}")
    if "method" in q:
        _need(q["method"] == "svdquant", "quantization_config.method", q["method"], "'svdquant'")
    if "group_size" in q:
        g = FORMATS[fmt].group_size
        _need(
            q["group_size"] == g and _is_int(q["group_size"]),
            "quantization_config.group_size",
            q["group_size"],
            f"{g} (the {fmt} group size)",
        )
    for f in dataclasses.fields(QuantConfig):
        if f.name not in q or f.name == "format":
            continue
        value, key = q[f.name], f"quantization_config.{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            _need(isinstance(value, bool), key, value, "true or false")
        elif isinstance(default, int):
            _int_in(value, key, 0, 1 << 31)
        elif isinstance(default, float):
            _need(
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value),
                key,
                value,
                "a finite number",
            )
        elif isinstance(default, torch.dtype):
            _need(value in LAYER_DTYPES, key, value, f"one of {', '.join(LAYER_DTYPES)}")
        elif isinstance(default, tuple):
            _need(
                isinstance(value, list) and all(isinstance(v, str) for v in value),
                key,
                value,
                "a list of strings",
            )
        elif isinstance(default, str):
            _need(isinstance(value, str), key, value, "a string")
    try:
        QuantConfig.from_dict(q)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"metadata 'quantization_config': {exc}") from None


def _check_calibration(calib: Any) -> None:
    """The fields ``inspect`` reads from the quantizer's report (the rest is free-form)."""
    if calib is None:
        return
    _dict(calib, "calibration")
    rows = calib.get("layers", [])
    _need(isinstance(rows, list), "calibration.layers", rows, "a list")
    for i, row in enumerate(rows):
        _dict(row, f"calibration.layers[{i}]")
        _need(
            isinstance(row.get("name", ""), str),
            f"calibration.layers[{i}].name",
            row.get("name"),
            "a string",
        )
        for field in ("err_rtn", "err_smooth", "err_svdq", "seconds"):
            value = row.get(field)
            _need(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                f"calibration.layers[{i}].{field}",
                value,
                "a number or null",
            )
