"""Where the streaming quantizer's 16-bit weights come from, one tensor at a time.

* :class:`SafetensorsWeights`: a diffusers model directory (``config.json`` plus
  ``diffusion_pytorch_model.safetensors``, or shards listed in
  ``diffusion_pytorch_model.safetensors.index.json``). The headers are parsed once; each tensor
  is then read from its byte range straight into a fresh allocation, converted to the target
  dtype and device: only the tensor being read is ever in memory (the page cache aside), and it
  is aligned like torch's own allocations (MKL rounds some misaligned inputs differently, see
  checkpoint.py). ``safe_open`` would map the whole shard for every tensor, which counts
  against the process (and torch's profiler reports it as allocated) while the map lives.
* :class:`ModuleWeights`: the tensors of a model that is already in memory (the built-in tiny
  models), read the same way.

:func:`meta_model` builds the diffusers class from its config with every parameter on the meta
device (no memory); :func:`materialize` loads a submodule's tensors into it and :func:`release`
puts them back on meta.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint_files import read_header

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class TensorFiles:
    """Tensors spread over safetensors files: key -> (file, dtype, shape, byte range)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.where: dict[str, Path] = {}
        self.info: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for file in files:
            # the checkpoint reader's parser: a header that does not describe the file's bytes
            # exactly (truncated, overlapping or unknown entries) is a one-line CheckpointError
            entries, _ = read_header(file, "model weights")
            for key, entry in entries.items():
                self.where[key] = file
                self.info[key] = (entry.dtype, entry.shape, entry.start, entry.end)

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def read(self, key: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``key`` as a new allocation on ``device`` in ``dtype`` (default: as stored).

        The tensor's bytes are read straight into a fresh CPU tensor (one ``readinto`` of its
        byte range): no mapping of the whole shard (which ``safe_open`` makes, and which counts
        against the process while it lives), and torch's own alignment.
        """
        if key not in self.where:
            raise KeyError(f"tensor {key!r} is not in the weights")
        stored, shape, begin, end = self.info[key]
        host = torch.empty(shape, dtype=stored)
        nbytes = host.numel() * host.element_size()
        if nbytes != end - begin:
            raise ValueError(f"{self.where[key]}: tensor {key!r} has {end - begin} bytes, "
                             f"its shape and dtype need {nbytes}")  # fmt: skip
        if nbytes:
            view = memoryview(host.reshape(-1).view(torch.uint8).numpy())
            with open(self.where[key], "rb") as fh:
                fh.seek(begin)
                done = 0
                while done < nbytes:
                    got = fh.readinto(view[done:])
                    if not got:
                        raise ValueError(f"{self.where[key]} is truncated (tensor {key!r})")
                    done += got
        if (dtype is None or dtype == stored) and torch.device(device).type == "cpu":
            return host
        return torch.empty(shape, dtype=dtype or stored, device=device).copy_(host)

    def nbytes(self, key: str, dtype: torch.dtype | None = None) -> int:
        stored, shape, _, _ = self.info[key]
        n = 1
        for s in shape:
            n *= s
        return n * (dtype or stored).itemsize

    def digest(self) -> str:
        """sha256 of every file's name, size, header and 64 evenly spaced 4 KiB samples of its
        data: detects a changed or replaced checkpoint without reading it whole."""
        h = hashlib.sha256()
        for file in self.files:
            size = file.stat().st_size
            keys = [k for k, f in self.where.items() if f == file]
            start = min((self.info[k][2] for k in keys), default=size)
            h.update(f"{file.name}:{size}".encode())
            h.update(json.dumps({k: repr(self.info[k]) for k in sorted(keys)}).encode())
            with open(file, "rb") as fh:
                span = max(size - start, 1)
                for j in range(64):
                    h.update(os.pread(fh.fileno(), 4096, start + span * j // 64))
        return h.hexdigest()


class SafetensorsWeights(TensorFiles):
    """The weights of a diffusers model directory (single file or sharded)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / WEIGHTS_INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{index} is not a valid shard index: {exc}") from None
            files = sorted({directory / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{directory}: shard {missing[0]} of the index is missing")
        elif (directory / WEIGHTS_NAME).is_file():
            files = [directory / WEIGHTS_NAME]
        else:
            present = sorted(p.name for p in directory.iterdir() if p.is_file())
            raise FileNotFoundError(
                f"{directory}: no {WEIGHTS_NAME} (or its shard index); streaming reads "
                f"safetensors weights (found: {', '.join(present[:5]) or 'nothing'})"
            )
        super().__init__(files)
        self.directory = directory


class ModuleWeights:
    """The tensors of an in-memory model, read like :class:`SafetensorsWeights`."""

    def __init__(self, model: nn.Module):
        self.state = dict(model.state_dict())

    def keys(self) -> list[str]:
        return list(self.state)

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def read(self, key: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        if key not in self.state:
            raise KeyError(f"tensor {key!r} is not in the weights")
        t = self.state[key]
        return torch.empty(t.shape, dtype=dtype or t.dtype, device=device).copy_(t)

    def nbytes(self, key: str, dtype: torch.dtype | None = None) -> int:
        t = self.state[key]
        return t.numel() * (dtype or t.dtype).itemsize

    def digest(self) -> str:
        from .state import _digest

        return _digest(self.state)


def meta_model(cls, config: dict[str, Any]) -> nn.Module:
    """``cls.from_config(config)`` with every parameter on the meta device, in eval mode."""
    from ..checkpoint_model import parameters_on_meta

    with parameters_on_meta():
        model = cls.from_config(config)
    return model.eval()


def model_class_from_config(directory: Path) -> tuple[type, dict[str, Any]]:
    """(diffusers class, config dict) named by ``directory/config.json``; ValueError (one line)
    when it is not valid JSON, not an object, or names no diffusers model class."""
    import diffusers

    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path.name} holds a JSON {type(config).__name__}, not an object")
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and hasattr(cls, "from_config")):
        raise ValueError(f"{path.name} names {name!r}, not a diffusers model class")
    return cls, config


def materialize(
    module: nn.Module,
    prefix: str,
    weights,
    device,
    dtype: torch.dtype | None,
    skip: tuple[str, ...] = (),
) -> int:
    """Load ``module``'s parameters and persistent buffers from ``weights`` (keys ``prefix +
    name``) onto ``device``; floating-point tensors in ``dtype`` (None: as stored). Names starting
    with one of ``skip`` stay as they are. Returns the bytes loaded."""
    state, total = {}, 0
    for name, current in module.state_dict(keep_vars=True).items():
        if name.startswith(skip):
            continue
        key = prefix + name
        if key not in weights:
            raise ValueError(f"the weights have no tensor {key!r} (the model config wants it)")
        target = dtype if (dtype is not None and current.is_floating_point()) else None
        state[name] = weights.read(key, device, target)
        total += state[name].numel() * state[name].element_size()
    module.load_state_dict(state, strict=not skip, assign=True)
    return total


def release(module: nn.Module) -> None:
    """Free ``module``'s tensors (they go back to the meta device)."""
    module.to("meta")


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers (meta ones too), floating ones in ``dtype``."""
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total
