"""Resume state of a streaming run (quantize/streaming.py), in the run's state directory.

``progress.json`` (written last and atomically, by rank 0, after every finished block):
``{"version": 1, "kind": "stream", "fingerprint": {...}, "next_block": n, "blocks": [record,
...], "report": {...}, "sha256": ...}``, a record per finished block being its staged file
(``block-NNNN.safetensors``: all of the block's tensors), the CRC-32 of each tensor, its bytes and
the SHA-256 of the file. ``sha256`` covers the rest of progress.json. A resumed run checks both
before it uses anything: a damaged state (an edited progress.json, a truncated or altered block
file) is refused, naming the file, instead of being turned into a checkpoint. Calibration samples
that spilled to disk keep their inputs of block ``next_block`` in ``calib/``; the others are
recomputed on resume by running the finished (quantized) blocks again, which gives the same bits
and costs a forward pass, not a quantization.

The fingerprint covers the model class and config, the weights (file digest), the QuantConfig
and the calibration inputs; a state directory of another run is refused. The format is this
module's own (``kind`` "stream"), versioned apart from the in-memory ``quantize_model`` state
(quantize/state.py), whose directory it refuses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .state import _digest, _is_state_file, file_sha256, progress_sha256

KIND = "stream"
VERSION = 1


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

    @property
    def path(self) -> Path:
        return self.dir / "progress.json"

    def _damaged(self, what: str, problem: str) -> ValueError:
        return ValueError(
            f"resume state {self.dir}: {what} {problem}; delete {self.dir} to start over (CLI: "
            "the same command without --resume)"
        )

    def load(self) -> dict[str, Any] | None:
        """The saved progress, None for a new run. ValueError (one line) for another run's
        directory, a directory with foreign files, or a damaged state."""
        if not self.path.exists():
            # leftovers of a run stopped before its first block finished are fine; anything
            # else means the directory is not ours
            present = self.dir.iterdir() if self.dir.is_dir() else []
            foreign = sorted(p.name for p in present if not _is_state_file(p.name))
            if foreign:
                raise ValueError(
                    f"state directory {self.dir} holds no progress.json but other files "
                    f"({', '.join(foreign[:3])}); use a new output path"
                )
            return None
        try:
            progress = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._damaged("progress.json", f"is unreadable ({exc})") from None
        if not isinstance(progress, dict):
            raise self._damaged("progress.json", "is not a JSON object")
        if progress.get("kind") != KIND:
            raise ValueError(
                f"state directory {self.dir} holds the progress of an in-memory quantize_model "
                "run, not of a streaming run; use a new output path"
            )
        if progress.get("version") != VERSION:
            raise self._damaged(
                "progress.json", f"has version {progress.get('version')!r}, expected {VERSION}"
            )
        if progress.get("sha256") != progress_sha256(progress):
            raise self._damaged("progress.json", "does not match its SHA-256 (edited?)")
        saved = progress.get("fingerprint") if isinstance(progress.get("fingerprint"), dict) else {}
        differ = [k for k in self.fp if saved.get(k) != self.fp[k]]
        if differ:
            raise ValueError(
                f"state directory {self.dir} holds the progress of a different run "
                f"({', '.join(differ)} differ); resume with the same model, QuantConfig and "
                "calibration, or run without --resume"
            )
        for record in progress["blocks"]:
            self._check_file(record["file"], record.get("sha256"))
        return progress

    def _check_file(self, name: Any, digest: Any) -> None:
        if not isinstance(name, str) or name != Path(name).name or not _is_state_file(name):
            raise self._damaged("progress.json", f"names an unexpected file {name!r}")
        if not (self.dir / name).is_file():
            raise self._damaged(name, "is missing")
        if not isinstance(digest, str) or file_sha256(self.dir / name) != digest:
            raise self._damaged(name, "does not match its SHA-256 (truncated or altered)")

    def new(self) -> dict[str, Any]:
        return {"version": VERSION, "kind": KIND, "fingerprint": self.fp, "next_block": 0,
                "blocks": [], "report": None}  # fmt: skip

    def save(self, progress: dict[str, Any]) -> None:
        progress = {**progress, "sha256": progress_sha256(progress)}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(progress, indent=1))
