"""Read a dcgen_quant checkpoint lazily, one tensor at a time (for streaming conversions).

:class:`CheckpointSource` opens a checkpoint file (or sharded directory) written by
``save_quantized``: it validates the metadata (format, version, JSON) and the name, dtype and
shape of every tensor from the safetensors headers alone, then hands out tensors on demand,
each checked against its CRC-32. :class:`StateDictSource` offers the same interface over an
in-memory state dict (tensors may be on the meta device: shapes and dtypes only), which is how a
full-size model is planned without materializing it.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    INDEX_NAME,
    CheckpointError,
    _expected_layer_tensors,
    read_metadata,
)
from .safetensors_stream import DTYPES_BY_NAME


class _SourceBase:
    """Shared interface: ``layers``, ``model_class``, ``config``, ``quantization_config``,
    ``keys()``, ``dtype(key)``, ``shape(key)``, ``get(key)``."""

    layers: dict[str, dict[str, Any]]
    model_class: str
    config: dict[str, Any]
    quantization_config: dict[str, Any]
    name: str
    _info: dict[str, tuple[torch.dtype, tuple[int, ...]]]

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def dtype(self, key: str) -> torch.dtype:
        return self._info[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def _check_layers(self) -> None:
        """Every quantized layer's tensors exist with the shape and dtype its entry implies."""
        if not isinstance(self.layers, dict):
            raise CheckpointError(f"{self.name}: metadata 'layers' is not a JSON object")
        for name, info in self.layers.items():
            if not isinstance(info, dict) or "kind" not in info:
                raise CheckpointError(f"{self.name}: metadata 'layers' entry {name!r} is malformed")
            for key, (shape, dtype) in _expected_layer_tensors(name, info).items():
                if key not in self._info:
                    raise CheckpointError(f"{self.name}: tensor {key!r} is missing")
                have_dtype, have_shape = self._info[key]
                if have_shape != tuple(shape) or have_dtype != dtype:
                    raise CheckpointError(
                        f"{self.name}: tensor {key!r} is {have_dtype} {have_shape}, expected "
                        f"{dtype} {tuple(shape)}"
                    )


class CheckpointSource(_SourceBase):
    """A dcgen_quant checkpoint on disk, read tensor by tensor.

    Parameters
    ----------
    path : ``*.safetensors`` file or sharded checkpoint directory
    verify : check each tensor against its CRC-32 when it is read

    Raises CheckpointError (a ValueError) naming the problem: not a checkpoint, truncated,
    metadata missing or malformed, a quantized layer's tensor missing or of the wrong shape.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"input checkpoint not found: {path}")
        self.name = str(path)
        meta = read_metadata(path)
        self.layers = meta["layers"]
        model = meta["model"] if isinstance(meta["model"], dict) else {}
        self.model_class = str(model.get("class"))
        self.config = dict(model.get("config") or {})
        self.quantization_config = dict(meta["quantization_config"] or {})
        self.checksums = meta["checksums"] if isinstance(meta["checksums"], dict) else {}
        self.verify = verify
        if path.is_dir():
            index = json.loads((path / INDEX_NAME).read_text())
            files = {key: path / shard for key, shard in index["weight_map"].items()}
        else:
            files = None
        self._files: dict[Path, Any] = {}
        self._where: dict[str, tuple[Path, int, int]] = {}  # key -> (file, begin, end)
        self._info = {}
        for file in sorted(set(files.values())) if files else [path]:
            header, data_start = _read_header(file)
            for key, entry in header.items():
                if key == "__metadata__" or (files is not None and files.get(key) != file):
                    continue
                dtype = DTYPES_BY_NAME.get(entry.get("dtype"))
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key!r} has dtype {entry.get('dtype')}")
                begin, end = entry["data_offsets"]
                self._info[key] = (dtype, tuple(int(x) for x in entry["shape"]))
                self._where[key] = (file, data_start + int(begin), data_start + int(end))
        if files is not None and (missing := sorted(set(files) - set(self._info))):
            raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from its shard")
        self._check_layers()

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (CPU), checked against its checksum when ``verify``.

        Read with plain file reads into fresh memory (not memory-mapped), so that a streaming
        conversion holds only the tensors it is working on."""
        if key not in self._info:
            raise CheckpointError(f"{self.name}: tensor {key!r} is missing")
        file, begin, end = self._where[key]
        if file not in self._files:
            self._files[file] = open(file, "rb", buffering=0)  # noqa: SIM115 (kept open)
        fh = self._files[file]
        buf = bytearray(end - begin)
        fh.seek(begin)
        if fh.readinto(buf) != len(buf):
            raise CheckpointError(f"cannot read tensor {key!r} from {file}: file truncated")
        dtype, shape = self._info[key]
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        t = t.view(dtype).reshape(shape)
        if self.verify and self.checksums.get(key) != f"{zlib.crc32(buf):08x}":
            raise CheckpointError(
                f"tensor {key!r} does not match its checksum: {self.name} was altered or corrupted"
            )
        return t

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def _read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; CheckpointError for a
    missing, truncated or foreign file."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint shard missing: {file}")
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        ends = [int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise CheckpointError(
            f"{file} is not a readable safetensors file (truncated?): {exc}"
        ) from None
    if 8 + n + max(ends, default=0) > size:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated?)")
    return header, 8 + n


class StateDictSource(_SourceBase):
    """The :class:`CheckpointSource` interface over a model's state dict (meta tensors allowed).

    Parameters
    ----------
    state_dict : {key: Tensor}, the checkpoint's tensors
    layers : the checkpoint's ``layers`` metadata (``dcgen_quant.checkpoint.quantized_layers``)
    model_class, config : the diffusers class name and config
    quantization_config : the checkpoint's ``QuantConfig.to_dict()``
    """

    def __init__(self, state_dict, layers, model_class, config, quantization_config=None):
        self.name = "<state dict>"
        self._tensors = dict(state_dict)
        self._info = {k: (t.dtype, tuple(t.shape)) for k, t in self._tensors.items()}
        self.layers = layers
        self.model_class = model_class
        self.config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        self.quantization_config = dict(quantization_config or {})
        self._check_layers()

    @classmethod
    def from_model(cls, model: torch.nn.Module, quantization_config=None) -> StateDictSource:
        """From a model with SVDQLinear / W4A16Linear layers (on any device, meta included)."""
        from ..checkpoint import quantized_layers
        from ..fusion import unfused

        with unfused(model):
            state = dict(model.state_dict())
            layers = quantized_layers(model)
        return cls(state, layers, type(model).__name__, dict(model.config), quantization_config)

    def get(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        if t.is_meta:
            raise ValueError(f"tensor {key!r} is on the meta device (a shape-only model)")
        return t.detach().cpu()
