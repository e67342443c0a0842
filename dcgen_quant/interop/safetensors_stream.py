"""Write a safetensors file tensor by tensor, without holding them all in memory.

``safetensors.torch.save_file`` needs every tensor at once; a FLUX.1-size conversion must stream
(about one block in memory). The file format is simple: an 8-byte little-endian header length,
a JSON header (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, padded with spaces), then the tensor bytes, contiguous, in offset order. The
writer plans every offset from the names, dtypes and shapes up front, accepts tensors in any
order (writing each at its offset), and writes the header last, into space reserved for it, so
that metadata computed while streaming (checksums) still fits.

Tensors are laid out by descending element size, so every tensor starts at a multiple of its
own element size (loaders that map the file zero-copy need that alignment).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class StreamingWriter:
    """Write one safetensors file whose tensors (names, dtypes, shapes) are known in advance.

    Parameters
    ----------
    path : the file to write (the caller makes it atomic, e.g. with ``atomic_path``)
    specs : ``[(name, dtype, shape), ...]``; names unique
    header_reserve : bytes reserved for the JSON header beyond what the tensor entries need
        (metadata goes there; :meth:`close` raises if it does not fit)

    Use :meth:`write` once per tensor, then :meth:`close` with the metadata.
    """

    def __init__(self, path: str | os.PathLike, specs, header_reserve: int = 1 << 20):
        self.path = Path(path)
        entries, seen = [], set()
        for name, dtype, shape in specs:
            if name in seen:
                raise ValueError(f"tensor {name!r} planned twice")
            if dtype not in SAFETENSORS_DTYPES:
                raise TypeError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
            seen.add(name)
            entries.append((name, dtype, tuple(int(s) for s in shape)))
        order = sorted(
            range(len(entries)), key=lambda i: -torch.empty((), dtype=entries[i][1]).element_size()
        )  # stable: plan order within one element size
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for i in order:
            name, dtype, shape = entries[i]
            size = _nbytes(dtype, shape)
            self.layout[name] = (dtype, shape, offset, offset + size)
            offset += size
        self.data_bytes = offset
        self.header_bytes = len(self._header({})) + header_reserve
        self.header_bytes += -self.header_bytes % 8
        self.written: set[str] = set()
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed in close/abort)
        self._fh.truncate(8 + self.header_bytes + self.data_bytes)

    def _header(self, metadata: dict[str, str]) -> bytes:
        header: dict = {}
        if metadata:
            header["__metadata__"] = metadata
        for name, (dtype, shape, begin, end) in sorted(self.layout.items(), key=lambda x: x[1][2]):
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [begin, end],
            }
        return json.dumps(header, separators=(",", ":")).encode()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (CPU, the planned dtype and shape) at its place."""
        if name not in self.layout:
            raise KeyError(f"tensor {name!r} is not in the plan")
        if name in self.written:
            raise ValueError(f"tensor {name!r} written twice")
        dtype, shape, begin, end = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != end - begin:
            raise ValueError(f"tensor {name!r}: {data.nbytes} bytes, planned {end - begin}")
        self._fh.seek(8 + self.header_bytes + begin)
        self._fh.write(memoryview(data))
        self.written.add(name)

    def close(self, metadata: dict[str, str] | None = None) -> None:
        """Check that every planned tensor was written, write the header and close."""
        if missing := [n for n in self.layout if n not in self.written]:
            self._fh.close()
            raise ValueError(f"tensor {missing[0]!r} was never written ({len(missing)} missing)")
        header = self._header(dict(metadata or {}))
        if len(header) > self.header_bytes:
            self._fh.close()
            raise ValueError(
                f"metadata needs {len(header)} header bytes, {self.header_bytes} were reserved"
            )
        header += b" " * (self.header_bytes - len(header))
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", self.header_bytes))
        self._fh.write(header)
        self._fh.close()

    def abort(self) -> None:
        """Close without finishing (the caller removes the file)."""
        if not self._fh.closed:
            self._fh.close()
