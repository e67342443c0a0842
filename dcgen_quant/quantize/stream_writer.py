"""The streaming quantizer's checkpoint: written block by block, made final at the very end.

Every finished block is written at once to ``<state dir>/block-NNNN.safetensors`` (all of the
block's tensors: its 4-bit layers and the 16-bit rest, under their model names, with CRC-32s
kept for the metadata), the tensors outside the blocks to ``outside.safetensors``. Nothing
appears at the output path until :func:`finalize`, after the last block:

* a directory ``--out``: the staged files become its shards (hard links, so no data is copied
  and the state directory stays intact until the rename), plus ``dcgen_quant.index.json``
  holding the metadata; one shard per block keeps every shard far below the 5 GiB limit;
* a ``.safetensors`` ``--out``: one file, the staged tensors copied into it a chunk at a time
  (never more than 64 MiB in memory), with the metadata in its header.

Either is moved onto the output path atomically and reads back with :func:`load_quantized`
exactly like a checkpoint :func:`save_quantized` writes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path, atomic_write_text
from ..checkpoint import FORMAT_NAME, INDEX_NAME, check_output, is_checkpoint_dir, tensor_crc32
from ..checkpoint_files import read_header, save_safetensors
from .state import file_sha256

COPY_CHUNK = 64 * 2**20


def tensors_of(module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> dict:
    """``module``'s state dict under ``prefix``: detached, contiguous, on the CPU, no two
    entries sharing storage (safetensors refuses shared or partial storages)."""
    tensors, seen = {}, set()
    for key, t in module.state_dict().items():
        if key.startswith(skip):
            continue
        t = t.detach().cpu().contiguous()
        if t.numel():
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        tensors[prefix + key] = t
    return tensors


def write_staged(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write ``tensors`` to the staged file ``path`` (atomically); returns its record: file
    name, CRC-32 per tensor, bytes, SHA-256 of the file (checked on resume)."""
    checksums = {k: tensor_crc32(t) for k, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, {"format": FORMAT_NAME}, path)  # a full disk: ENOSPC
        # save_file recreates the file with mode 0600; staged files become the output's shards
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        sha256 = file_sha256(tmp)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"file": path.name, "checksums": checksums, "bytes": total, "sha256": sha256}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links: copy
        shutil.copyfile(src, dst)


def concat_safetensors(sources: list[Path], target: Path, metadata: dict[str, str]) -> None:
    """Write the tensors of ``sources`` into one safetensors file ``target`` (not atomic: the
    caller writes a temporary), a chunk at a time. Raises ValueError on a duplicate key."""
    entries, seen = [], set()
    for src in sources:
        for key, e in read_header(src, "staged block")[0].items():
            if key in seen:
                raise ValueError(f"tensor {key!r} is staged twice")
            seen.add(key)
            entries.append((key, e.dtype_name, list(e.shape), src, e.start, e.end - e.start))
    header, offset = {"__metadata__": metadata}, 0
    for key, dtype, shape, _, _, size in entries:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(target, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        handles: dict[Path, Any] = {}
        try:
            for _, _, _, src, begin, size in entries:
                fh = handles.get(src) or handles.setdefault(src, open(src, "rb"))  # noqa: SIM115
                fh.seek(begin)
                while size:
                    chunk = fh.read(min(size, COPY_CHUNK))
                    if not chunk:
                        raise ValueError(f"{src} is truncated")
                    out.write(chunk)
                    size -= len(chunk)
        finally:
            for fh in handles.values():
                fh.close()
        out.flush()
        os.fsync(out.fileno())


def finalize(out: Path, staged: list[Path], metadata: dict[str, str]) -> Path:
    """Make the checkpoint at ``out`` from the staged files (see the module docstring)."""
    out = Path(out)
    if out.suffix == ".safetensors":
        check_output(out)
        with atomic_path(out) as tmp:
            concat_safetensors(staged, tmp, metadata)
        return out
    check_output(out, directory=True)
    with atomic_path(out, directory=True, replaceable=is_checkpoint_dir) as tmp:
        weight_map = {}
        for i, src in enumerate(staged):
            name = f"model-{i + 1:05d}-of-{len(staged):05d}.safetensors"
            _link_or_copy(src, tmp / name)
            weight_map.update({k: name for k in read_header(src, "staged block")[0]})
        index = {"metadata": metadata, "weight_map": weight_map}
        atomic_write_text(tmp / INDEX_NAME, json.dumps(index, indent=1))
    return out
