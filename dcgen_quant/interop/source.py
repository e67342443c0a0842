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
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint import (
    INDEX_NAME,
    CheckpointError,
    _crc32,
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
        self._handles: dict[Path, Any] = {}
        self._file_of: dict[str, Path] = {}
        self._info = {}
        for file in sorted(set(files.values())) if files else [path]:
            handle = self._open(file)
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if files is not None and files.get(key) != file:
                    continue
                sl = handle.get_slice(key)
                dtype = DTYPES_BY_NAME.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key!r} has dtype {sl.get_dtype()}")
                self._info[key] = (dtype, tuple(sl.get_shape()))
                self._file_of[key] = file
        if files is not None and (missing := sorted(set(files) - set(self._info))):
            raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from its shard")
        self._check_layers()

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"checkpoint shard missing: {file}")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # truncated / not safetensors
                raise CheckpointError(
                    f"{file} is not a readable safetensors file (truncated?): {exc}"
                ) from None
        return self._handles[file]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (CPU), checked against its checksum when ``verify``."""
        if key not in self._info:
            raise CheckpointError(f"{self.name}: tensor {key!r} is missing")
        try:
            t = self._open(self._file_of[key]).get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read tensor {key!r} from {self.name}: {exc}") from None
        if self.verify and self.checksums.get(key) != _crc32(t):
            raise CheckpointError(
                f"tensor {key!r} does not match its checksum: {self.name} was altered or corrupted"
            )
        return t


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
