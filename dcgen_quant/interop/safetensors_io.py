"""Reading foreign safetensors files strictly, and writing big ones block by block.

:func:`read_header` parses a safetensors header itself (8-byte little-endian length, JSON) and
checks it against the file size before any tensor is touched, so that a truncated or altered
file fails with one line naming the first tensor it cannot hold, where ``safe_open`` would say
only that the file is invalid. :class:`StreamWriter` writes a safetensors file whose tensor list
is known in advance one tensor at a time (peak memory: the tensor being written), computing each
tensor's CRC-32 on the way; the header is written first with fixed-width placeholders and
rewritten in place at the end, once the checksums are known.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..checkpoint import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class ForeignFormatError(CheckpointError):
    """A file of another engine is malformed, truncated, or holds what we cannot read exactly."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name (e.g. ``"BF16"``), shape, byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.dtype)


@dataclass(frozen=True)
class Header:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int  # file offset of the data buffer (8 + header length)

    def read(self, fh: BinaryIO, key: str) -> torch.Tensor:
        """Tensor ``key`` read with plain file reads from the open file ``fh`` (no memory map, so
        the process holds only what it keeps), into a fresh 64-byte-aligned torch allocation.
        ForeignFormatError names the key when its dtype or byte size is not what its header
        entry says, or the file ends early."""
        info = self.tensors[key]
        dtype = info.torch_dtype
        if dtype is None:
            raise ForeignFormatError(f"tensor {key!r} has unsupported dtype {info.dtype}")
        t = torch.empty(info.shape, dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if nbytes != info.end - info.start:
            raise ForeignFormatError(
                f"tensor {key!r}: header says {info.end - info.start} bytes for "
                f"{info.dtype} {list(info.shape)} ({nbytes} bytes)"
            )
        if nbytes:
            fh.seek(self.data_start + info.start)
            got = fh.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if got != nbytes:
                raise ForeignFormatError(f"{self.path} is truncated inside tensor {key!r}")
        return t


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of the safetensors file ``path``.

    Raises ForeignFormatError (one line) when the file is not safetensors, its header is not
    valid JSON, or the data it describes does not fit the file (truncated: names the first
    tensor that lies beyond the end).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ForeignFormatError(f"{path} is not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ForeignFormatError(
                f"{path} is not a safetensors file or is truncated (header of {n} bytes, file "
                f"of {size})"
            )
        raw = fh.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ForeignFormatError(
            f"{path}: the safetensors header is not valid JSON ({exc})"
        ) from None
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ForeignFormatError(f"{path}: safetensors '__metadata__' is not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        try:
            info = TensorInfo(
                str(entry["dtype"]),
                tuple(int(d) for d in entry["shape"]),
                int(entry["data_offsets"][0]),
                int(entry["data_offsets"][1]),
            )
        except (KeyError, TypeError, ValueError, IndexError):
            raise ForeignFormatError(f"{path}: header entry {key!r} is malformed") from None
        tensors[key] = info
    data = size - 8 - n
    for key, info in sorted(tensors.items(), key=lambda kv: kv[1].end):
        if info.end > data:
            raise ForeignFormatError(
                f"{path} is truncated: tensor {key!r} ends at byte {info.end} of the data, the "
                f"file holds {data}"
            )
    return Header(path, {str(k): str(v) for k, v in metadata.items()}, tensors, 8 + n)


class StreamWriter:
    """Write a safetensors file tensor by tensor, in a fixed order announced up front.

    Parameters
    ----------
    fh : binary file opened for writing (the caller makes it atomic)
    plan : [(name, dtype, shape)] in the order the tensors will be written
    metadata : str -> str; values may contain the placeholder ``"{checksums}"`` marker handled by
        :meth:`finish` (see there)

    The header is written at construction with every checksum set to ``"00000000"``;
    :meth:`finish` rewrites it with the real CRC-32s, which have the same width, so the header
    keeps its length and the data does not move.
    """

    PLACEHOLDER = "00000000"

    def __init__(
        self,
        fh: BinaryIO,
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str],
        checksum_key: str | None = "checksums",
    ):
        self.fh, self.metadata, self.checksum_key = fh, dict(metadata), checksum_key
        self.entries: dict[str, dict] = {}
        self.order = [name for name, _, _ in plan]
        offset = 0
        for name, dtype, shape in plan:
            if dtype not in NAMES:
                raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            self.entries[name] = {
                "dtype": NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        self.total = offset
        self.crcs = dict.fromkeys(self.order, self.PLACEHOLDER)
        self._next = 0
        self._header_len = None
        self.fh.write(self._header())

    def _header(self) -> bytes:
        meta = dict(self.metadata)
        if self.checksum_key is not None:
            meta[self.checksum_key] = json.dumps(self.crcs)
        doc = {"__metadata__": meta, **self.entries}
        raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned, as safetensors does
        if self._header_len is not None and len(raw) != self._header_len:
            raise RuntimeError("safetensors header changed length while streaming")
        self._header_len = len(raw)
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``, which must be the next planned one, with its planned dtype/shape."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"stream writer: got tensor {name!r}, expected {expected!r}")
        entry = self.entries[name]
        if NAMES.get(tensor.dtype) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise RuntimeError(
                f"stream writer: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned "
                f"{entry['dtype']} {tuple(entry['shape'])}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.fh.write(memoryview(data))
        self.crcs[name] = f"{zlib.crc32(data):08x}"
        self._next += 1

    def finish(self) -> dict[str, str]:
        """Check that every planned tensor was written, rewrite the header; returns the CRCs."""
        if self._next != len(self.order):
            raise RuntimeError(
                f"stream writer: {len(self.order) - self._next} planned tensor(s) not written, "
                f"first {self.order[self._next]!r}"
            )
        self.fh.flush()
        end = self.fh.tell()
        self.fh.seek(0)
        self.fh.write(self._header())
        self.fh.seek(end)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        return dict(self.crcs)


def finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in ``t``: integers trivially; 16-bit and fp8 floats by their bit patterns
    (all-ones exponent), which reads the bytes once without a float copy."""
    masks = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
    if t.dtype in masks:
        m = masks[t.dtype]
        return not bool(((t.view(torch.int16) & m) == m).any())
    if t.dtype == torch.float8_e4m3fn:  # no Inf; NaN is S.1111.111
        return not bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t).all())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
