"""Checkpoint files: the single safetensors file or the shards of a sharded checkpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint_schema import INDEX_NAME, CheckpointError


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
