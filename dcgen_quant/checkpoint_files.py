"""Checkpoint files: the one safetensors file, or the index and shards of a sharded checkpoint.

Everything a file declares is checked before it is believed. The safetensors header is parsed
here (not by the safetensors library, whose errors are opaque and which maps the whole file):
its length must fit the file, every tensor's dtype must be known, its byte range must match its
shape and dtype, and the ranges must tile the data area exactly, so that a truncated, padded or
overlapping file is refused before any tensor is allocated, and no allocation is ever larger
than the file. A shard index may only name plain ``*.safetensors`` file names in its own
directory: no path separators, no ``..``, no absolute paths, no symbolic link that leaves the
directory, nothing but regular files (a FIFO or device would hang or never end).

Tensors are read into fresh (64-byte aligned) torch allocations: the tensors safetensors hands
out sit 16 bytes off that alignment, and MKL / oneDNN round such inputs differently, so a loaded
model would not reproduce the saved one's outputs bit for bit (docs/FORMAT.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_schema import INDEX_NAME, CheckpointError, show

# safetensors dtype names -> torch dtypes (those torch can hold)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit
MAX_INDEX_BYTES = 100 * 1024**2
_CHUNK = 64 * 1024**2  # bytes per read when checksumming


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it: where its bytes are and what they hold."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def dtype_name(self) -> str:
        return SAFETENSORS_NAMES[self.dtype]


def regular_file(path: Path, what: str) -> os.stat_result:
    """``os.stat`` of ``path``; CheckpointError unless it is a regular file (following links)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} missing: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO/device?)"
        raise CheckpointError(f"{what} {path} is {kind}; refusing to read it")
    return st


def read_header(file: Path, what: str = "checkpoint") -> tuple[dict[str, TensorEntry], dict]:
    """Parse and check a safetensors header: (tensors by name, the ``__metadata__`` map)."""
    size = regular_file(file, what).st_size
    bad = f"{file} is not a valid safetensors file"
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad}: {size} bytes, shorter than its header (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{bad}: it declares a {n}-byte header but holds {size} bytes (truncated?)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read: {exc.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{bad}: its header is not JSON (damaged?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{bad}: '__metadata__' is not a map of strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    entries, spans = {}, []
    for name, info in header.items():
        entry = _entry(file, name, info, data_start)
        entries[name] = entry
        spans.append((entry.start, entry.end, name))
    position = data_start
    for start, end, name in sorted(spans):
        if start != position:
            problem = "overlaps another tensor" if start < position else "leaves a gap before it"
            raise CheckpointError(f"{bad}: tensor {show(name)}'s byte range {problem}")
        position = end
    if position - data_start > data_size:
        raise CheckpointError(
            f"{file} is truncated: its tensors need {position - data_start} bytes of data, the "
            f"file holds {data_size}"
        )
    if position - data_start < data_size:
        raise CheckpointError(
            f"{bad}: {data_size - (position - data_start)} bytes after the last tensor "
            "(appended to or damaged?)"
        )
    return entries, metadata


def _entry(file: Path, name: str, info, data_start: int) -> TensorEntry:
    where = f"{file}: tensor {show(name)}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: header entry must hold dtype, shape and data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {show(info['dtype'])}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_nat(d) for d in shape)):
        raise CheckpointError(f"{where}: shape {show(shape)} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_nat, offsets))):
        raise CheckpointError(f"{where}: data_offsets {show(offsets)} is not [begin, end]")
    begin, end = offsets
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end < begin or end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes, its shape {shape} and "
            f"dtype {info['dtype']} need {math.prod(shape) * itemsize}"
        )
    return TensorEntry(name, file, dtype, tuple(shape), data_start + begin, data_start + end)


def _nat(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shard_path(directory: Path, name) -> Path:
    """The shard a shard index names, which must be a plain ``*.safetensors`` file name in
    ``directory`` resolving (through any symbolic link) to a regular file inside it."""
    if (
        not isinstance(name, str)
        or not name.endswith(".safetensors")
        or name != os.path.basename(name)
        or "\\" in name
        or "\x00" in name
        or name.startswith(".")
    ):
        raise CheckpointError(
            f"{directory / INDEX_NAME}: weight_map names shard {show(name)}; a shard must be a "
            "plain *.safetensors file name inside the checkpoint directory"
        )
    path = directory / name
    regular_file(path, "checkpoint shard")
    if path.resolve().parent != directory.resolve():
        raise CheckpointError(
            f"{path} is a link to {path.resolve()}, outside the checkpoint directory; refusing "
            "to read it"
        )
    return path


class CheckpointFiles:
    """The files of one checkpoint, every header parsed and checked (no tensor read yet).

    Attributes
    ----------
    path : the checkpoint (file or directory)
    raw_metadata : the metadata map (str -> str: JSON except ``format``)
    tensors : every tensor by name, with its file and byte range
    sharded : whether ``path`` is a directory with a shard index
    """

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        self.sharded = path.is_dir()
        if not self.sharded:
            self.tensors, self.raw_metadata = read_header(path)
            return
        index_path = path / INDEX_NAME
        if not index_path.exists():
            raise CheckpointError(f"{path} is a directory without {INDEX_NAME}")
        if regular_file(index_path, "shard index").st_size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{index_path} is larger than {MAX_INDEX_BYTES} bytes")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{index_path} is not a valid index: {exc}") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_path} is not a valid index: no 'weight_map' object")
        metadata = index.get("metadata")
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(
                f"{index_path} is not a valid index: 'metadata' is not a map of strings to strings"
            )
        self.raw_metadata = metadata
        weight_map: dict = index["weight_map"]
        for key, value in weight_map.items():
            if not isinstance(value, str):
                raise CheckpointError(
                    f"{index_path}: weight_map places tensor {show(key)} in {show(value)}, not a "
                    "shard file name"
                )
        shards = {name: shard_path(path, name) for name in sorted(set(weight_map.values()))}
        self.tensors = {}
        for name, shard in shards.items():
            entries, _ = read_header(shard, "checkpoint shard")
            for key, entry in entries.items():
                if weight_map.get(key) != name:
                    raise CheckpointError(
                        f"shard {name} holds tensor {show(key)}, which {INDEX_NAME} "
                        f"{'places in ' + show(weight_map[key]) if key in weight_map else 'lacks'}"
                    )
                self.tensors[key] = entry
        if missing := sorted(set(weight_map) - set(self.tensors)):
            raise CheckpointError(
                f"{INDEX_NAME} places tensor {show(missing[0])} in shard "
                f"{show(weight_map[missing[0]])}, which does not hold it ({len(missing)} missing)"
            )

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.tensors.values()})

    def read(self, names: list[str] | None = None) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
        """(entry, tensor) for ``names`` (default: all), file by file in byte order."""
        wanted = self.tensors.values() if names is None else [self.tensors[n] for n in names]
        by_file: dict[Path, list[TensorEntry]] = {}
        for entry in wanted:
            by_file.setdefault(entry.file, []).append(entry)
        for file, entries in by_file.items():
            try:
                with open(file, "rb") as fh:
                    for entry in sorted(entries, key=lambda e: e.start):
                        yield entry, _read_into(fh, entry)
            except OSError as exc:
                raise CheckpointError(f"{file} cannot be read: {exc.strerror}") from None


def _read_into(fh, entry: TensorEntry) -> torch.Tensor:
    t = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.end > entry.start:
        fh.seek(entry.start)
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise CheckpointError(
                    f"{entry.file} is truncated: tensor {show(entry.name)} ends at byte "
                    f"{entry.end}, the file at {entry.start + got}"
                )
            got += n
    return t


def crc32(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes (C order), as 8 lower-case hex digits."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    crc = 0
    view = memoryview(data) if flat.numel() else b""
    for i in range(0, len(view), _CHUNK):
        crc = zlib.crc32(view[i : i + _CHUNK], crc)
    return f"{crc:08x}"


def check_values(name: str, t: torch.Tensor, rule: str | None) -> None:
    """Value rule of a floating-point tensor: ``finite``, ``positive`` (finite and > 0) or
    ``nonnegative`` (finite and >= 0); CheckpointError naming the tensor and the first bad
    element. Integer tensors (packed codes) and ``rule=None`` pass."""
    if rule is None or not t.is_floating_point() or not t.numel():
        return
    x = t.float() if t.element_size() == 1 else t  # float8: no isfinite on CPU
    # fast path: one vectorized min/max pass (NaN propagates through aminmax), 15-30x faster on
    # CPU than isfinite + sum over 16-bit tensors; the element-wise pass below runs only on a
    # tensor that fails, to count and locate what is wrong
    lo, hi = (float(v) for v in torch.aminmax(x))
    floor_ok = {"finite": True, "positive": lo > 0, "nonnegative": lo >= 0}[rule]
    if math.isfinite(lo) and math.isfinite(hi) and floor_ok:
        return
    bad = ~torch.isfinite(x)
    if rule == "positive":
        bad |= x <= 0
    elif rule == "nonnegative":
        bad |= x < 0
    count = int(bad.sum())
    if count:
        index = tuple(int(i) for i in torch.nonzero(bad)[0]) if t.dim() else ()
        value = float(x[index]) if t.dim() else float(x)
        what = {"finite": "finite", "positive": "finite and > 0", "nonnegative": "finite and >= 0"}
        raise CheckpointError(
            f"tensor {show(name)} holds {count} value(s) that are not {what[rule]} (first "
            f"{value} at {list(index)}): the file was written wrong or edited with its checksum "
            "recomputed"
        )


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_safetensors(
    tensors: dict[str, torch.Tensor], tmp: Path, metadata: dict | None, target: Path
) -> None:
    """Write ``tensors`` to ``tmp`` with safetensors' save_file, its I/O failures raised as the
    OSError they are (a full disk: ENOSPC) naming ``target``, not as SafetensorError."""
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    except Exception as exc:  # SafetensorError wraps the OS error in its message
        found = _OS_ERROR.search(str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(target)) from None
