"""Raw edits of checkpoint files for the fuzz suite: bytes, safetensors headers, metadata.

Every function works on a copy of a checkpoint (a ``.safetensors`` file, or a sharded
directory) and edits it the way a damaged disk, a hand edit or a buggy writer would: without
going through dcgen_quant's writer. :func:`reseal` recomputes the tensor checksums and the
header checksum afterwards, as a writer with a bug would have written them, so that the checks
behind the checksums are exercised too.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import torch

# Self-contained (no dcgen_quant import but the header checksum, imported where a file has one),
# so that the same edits can be replayed against an older dcgen_quant to show its defects.
INDEX_NAME = "dcgen_quant.index.json"
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")


def crc32(t: torch.Tensor) -> str:
    flat = t.contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return f"{zlib.crc32(data):08x}"


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def read_raw(file: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict with ``__metadata__``, data bytes) of a well-formed safetensors file."""
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(file: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def header_span(file: Path) -> tuple[int, int]:
    """Byte range of the header JSON in ``file``."""
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    return 8, 8 + n


class Checkpoint:
    """A copied checkpoint opened for raw edits."""

    def __init__(self, path: Path):
        self.path = path
        self.sharded = path.is_dir()

    # ---------------------------------------------------------------- where things are

    def index(self) -> dict[str, Any]:
        return json.loads((self.path / INDEX_NAME).read_text())

    def write_index(self, index: Any) -> None:
        (self.path / INDEX_NAME).write_text(json.dumps(index))

    def files(self) -> list[Path]:
        if not self.sharded:
            return [self.path]
        return sorted(self.path / n for n in set(self.index()["weight_map"].values()))

    def file_of(self, tensor: str) -> Path:
        return self.path / self.index()["weight_map"][tensor] if self.sharded else self.path

    def tensor_names(self) -> list[str]:
        names = []
        for file in self.files():
            names += [k for k in read_raw(file)[0] if k != "__metadata__"]
        return sorted(names)

    # ---------------------------------------------------------------- metadata

    def raw_meta(self) -> dict[str, str]:
        if self.sharded:
            return dict(self.index()["metadata"])
        return dict(read_raw(self.path)[0]["__metadata__"])

    def set_raw_meta(self, meta: dict[str, Any]) -> None:
        if self.sharded:
            index = self.index()
            index["metadata"] = meta
            self.write_index(index)
        else:
            header, data = read_raw(self.path)
            header["__metadata__"] = meta
            write_raw(self.path, header, data)

    def meta(self, key: str) -> Any:
        return json.loads(self.raw_meta()[key])

    def set_meta(self, key: str, value: Any, raw: bool = False) -> None:
        meta = self.raw_meta()
        meta[key] = value if raw else json.dumps(value)
        self.set_raw_meta(meta)

    def edit_meta(self, key: str, fn) -> None:
        """Let ``fn`` edit the decoded value of ``key`` in place (its return value is ignored)."""
        value = self.meta(key)
        fn(value)
        self.set_meta(key, value)

    def map_meta(self, key: str, fn) -> None:
        """Replace the decoded value of ``key`` by ``fn(value)``."""
        self.set_meta(key, fn(self.meta(key)))

    # ---------------------------------------------------------------- tensors

    def header(self, tensor: str) -> dict[str, Any]:
        return read_raw(self.file_of(tensor))[0][tensor]

    def edit_header(self, tensor: str, fn) -> None:
        """Apply ``fn`` to the header entry of ``tensor`` (or to the whole header with
        ``tensor=None`` on a single file)."""
        file = self.file_of(tensor)
        header, data = read_raw(file)
        fn(header[tensor])
        write_raw(file, header, data)

    def read(self, tensor: str) -> torch.Tensor:
        header, data = read_raw(self.file_of(tensor))
        entry = header[tensor]
        start, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        raw = bytearray(data[start:end])
        if not raw:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(raw, dtype=torch.uint8)
        return flat.view(dtype).reshape(entry["shape"]).clone()

    def write(self, tensor: str, t: torch.Tensor) -> None:
        """Replace a tensor's bytes (same dtype and shape)."""
        file = self.file_of(tensor)
        header, data = read_raw(file)
        start, end = header[tensor]["data_offsets"]
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert len(raw) == end - start
        write_raw(file, header, data[:start] + raw + data[end:])

    def flip_bit(self, file: Path, byte: int, bit: int) -> None:
        blob = bytearray(file.read_bytes())
        blob[byte] ^= 1 << bit
        file.write_bytes(bytes(blob))

    # ---------------------------------------------------------------- resealing

    def reseal(self) -> None:
        """Recompute every tensor's CRC-32 and the header checksum over the current content."""
        table, crcs = {}, {}
        for file in self.files():
            header, data = read_raw(file)  # once per file: the CRC of each tensor's bytes
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                table[name] = [entry.get("dtype"), entry.get("shape")]
                try:
                    start, end = entry["data_offsets"]
                    crcs[name] = f"{zlib.crc32(data[start:end]):08x}"
                except (KeyError, TypeError, ValueError):  # offsets the edit broke
                    crcs[name] = "00000000"
        meta = self.raw_meta()
        try:
            checksums = json.loads(meta["checksums"])
            if isinstance(checksums, dict):
                for key, crc in crcs.items():  # malformed entries and upper case stay as edited
                    old = checksums.get(key)
                    if isinstance(old, str) and _HEX8.fullmatch(old) and old.lower() != crc:
                        checksums[key] = crc
                meta["checksums"] = json.dumps(checksums)
        except (KeyError, ValueError):
            pass  # the edit removed or broke them: leave it so
        decoded = {}
        for key, value in meta.items():
            try:
                decoded[key] = value if key == "format" else json.loads(value)
            except (ValueError, RecursionError):
                decoded[key] = value
        if "integrity" in meta:
            from dcgen_quant.checkpoint_schema import integrity_record

            meta["integrity"] = json.dumps(integrity_record(decoded, table))
        self.set_raw_meta(meta)
