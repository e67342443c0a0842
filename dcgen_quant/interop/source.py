"""Read a dcgen_quant checkpoint lazily, one tensor at a time (for streaming conversions).

:class:`CheckpointSource` opens a checkpoint file (or sharded directory) written by
``save_quantized``: its headers go through every check ``load_quantized`` runs before reading a
tensor (:func:`dcgen_quant.checkpoint.open_header`), then it hands out tensors on demand, each
checked against its CRC-32 and its value rules. :class:`StateDictSource` offers the same
interface over an in-memory state dict (tensors may be on the meta device: shapes and dtypes
only), which is how a full-size model is planned without materializing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, _expected_layer_tensors, check_tensor, open_header


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
    verify : check each tensor against its CRC-32 and its values (finite scales, positive
        smoothing factors, ...) when it is read, as ``load_quantized`` does

    The files, metadata, header checksum and model config go through every check of
    :func:`dcgen_quant.checkpoint.open_header` first. Raises CheckpointError (a ValueError)
    naming the problem.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"input checkpoint not found: {path}")
        self.name = str(path)
        self._opened = open_header(path)
        meta = self._opened.meta
        self.layers = meta["layers"]
        self.model_class = meta["model"]["class"]
        self.config = dict(meta["model"].get("config") or {})
        self.quantization_config = dict(meta["quantization_config"])
        self.checksums = meta["checksums"]
        self.verify = verify
        self._info = {k: (e.dtype, e.shape) for k, e in self._opened.files.tensors.items()}
        self._check_layers()

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (CPU), checked when ``verify``.

        Read with plain file reads into fresh memory (not memory-mapped), so that a streaming
        conversion holds only the tensors it is working on."""
        if key not in self._info:
            raise CheckpointError(f"{self.name}: tensor {key!r} is missing")
        _, t = next(self._opened.files.read([key]))
        if self.verify:
            check_tensor(self._opened, key, t)
        return t

    def close(self) -> None:
        """Nothing stays open between reads (kept for the source interface)."""


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
