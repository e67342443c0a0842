"""Resume state of a streaming run (quantize/streaming.py), in the run's state directory.

``progress.json`` (written last and atomically, by rank 0, after every finished block):
``{"version": 1, "kind": "stream", "fingerprint": {...}, "next_block": n, "blocks": [record,
...], "report": {...}}``, a record per finished block being its staged file
(``block-NNNN.safetensors``: all of the block's tensors), the CRC-32 of each tensor and its bytes.
Calibration samples that spilled to disk keep their inputs of block ``next_block`` in
``calib/``; the others are recomputed on resume by running the finished (quantized) blocks again,
which gives the same bits and costs a forward pass, not a quantization.

The fingerprint covers the model class and config, the weights (file digest), the QuantConfig
and the calibration inputs; a state directory of another run is refused (:class:`RunState`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .state import VERSION, RunState, _digest

KIND = "stream"


def stream_fingerprint(cls_name: str, config: dict, weights_digest: str, quant_config, calib):
    """sha256 digests of what a resumed streaming run must share with the interrupted one."""
    return {
        "model": _digest([cls_name, json.dumps(config, sort_keys=True, default=str)]),
        "weights": weights_digest,
        "quant_config": _digest(json.dumps(quant_config.to_dict(), sort_keys=True)),
        "calibration": _digest(list(calib)),
    }


class StreamState:
    """Reads and writes ``progress.json`` of a streaming run in ``state_dir``."""

    def __init__(self, state_dir: str | Path, fp: dict[str, str]):
        self.dir = Path(state_dir)
        self.fp = fp

    def load(self) -> dict[str, Any] | None:
        """The saved progress, None for a new run; ValueError for another run's directory."""
        progress = RunState(self.dir, self.fp).load()
        if progress is not None and progress.get("kind") != KIND:
            raise ValueError(
                f"state_dir {self.dir} holds the progress of an in-memory quantize_model run, "
                "not of a streaming run; use a new output path"
            )
        return progress

    def new(self) -> dict[str, Any]:
        return {"version": VERSION, "kind": KIND, "fingerprint": self.fp, "next_block": 0,
                "blocks": [], "report": None}  # fmt: skip

    def save(self, progress: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "progress.json", json.dumps(progress, indent=1))
