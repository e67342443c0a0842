"""Resumable quantization runs: progress saved after every finished block.

Layout of ``state_dir`` (every file written atomically, ``progress.json`` last, so that a crash at
any point leaves either the previous or the new consistent state):

``progress.json``            fingerprint of the run, index of the next block, the report so far,
                             the files below
``block-NNNN.safetensors``   the quantized modules of finished block NNNN (checkpoint keys
                             ``<module name>.<buffer>``)
``inputs-NNNN.pt``           the cached inputs of block NNNN for every calibration sample

The fingerprint covers the model class and config, its weights, the QuantConfig and the
calibration data; a state_dir written for anything else is refused. ``progress.json`` records
the SHA-256 of every file it names and of its own content, and a resumed run checks them all
before using any: a damaged state (a truncated or altered block file, an edited or unreadable
progress.json) is refused naming the file, never turned into a checkpoint.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..atomic import atomic_path, atomic_write_text
from ..checkpoint_files import save_safetensors
from .report import QuantReport

VERSION = 2  # 2: SHA-256 of every state file and of progress.json itself
_SAMPLE = 1 << 20  # elements hashed per tensor (strided sample of larger tensors)


def _hash_tensor(h, t: torch.Tensor) -> None:
    flat = t.detach().reshape(-1)
    if flat.numel() > _SAMPLE:
        flat = flat[:: (flat.numel() + _SAMPLE - 1) // _SAMPLE]
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _hash_value(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        _hash_tensor(h, value)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            _hash_value(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            _hash_value(h, v)
    else:
        h.update(repr(value).encode())


def _digest(value: Any) -> str:
    h = hashlib.sha256()
    _hash_value(h, value)
    return h.hexdigest()


def fingerprint(model: nn.Module, calib, config) -> dict[str, str]:
    """sha256 digests of what a resumed run must share with the interrupted one."""
    model_config = dict(getattr(model, "config", {}) or {})
    return {
        "model": _digest(
            [type(model).__name__, json.dumps(model_config, sort_keys=True, default=str)]
        ),
        "weights": _digest(dict(model.state_dict())),
        "quant_config": _digest(json.dumps(config.to_dict(), sort_keys=True)),
        "calibration": _digest(list(calib)),
    }


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read 16 MiB at a time)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def progress_sha256(progress: dict[str, Any]) -> str:
    """SHA-256 of a progress record without its own ``sha256`` entry."""
    body = {k: v for k, v in progress.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` inside ``root`` (works for ModuleList items)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _is_state_file(name: str) -> bool:
    """Whether a file name is one a run writes into its state directory (temporaries included)."""
    return (
        name == "progress.json"
        or fnmatch.fnmatch(name, ".*.tmp-*")
        or fnmatch.fnmatch(name, "block-*.safetensors")
        or fnmatch.fnmatch(name, "inputs-*.pt")
        # a streaming run (stream_state.py): tensors outside the blocks, spilled calibration
        # inputs, the calibration records captured from a pipeline
        or name in ("outside.safetensors", "calib", "calibration.pt")
    )


class RunState:
    """Reads and writes the progress of one quantization run in ``state_dir``."""

    def __init__(self, state_dir: str | Path, fp: dict[str, str]):
        self.dir = Path(state_dir)
        self.fp = fp

    @property
    def progress_path(self) -> Path:
        return self.dir / "progress.json"

    @staticmethod
    def check_owned(state_dir: str | Path) -> None:
        """Raise TargetExistsError unless ``state_dir`` holds only files a run writes there."""
        from ..atomic import TargetExistsError

        path = Path(state_dir)
        if not path.is_dir():
            raise TargetExistsError(f"{path} exists and is not a quantization state directory")
        foreign = [p.name for p in path.iterdir() if not _is_state_file(p.name)]
        if foreign:
            raise TargetExistsError(
                f"{path} holds files that are not a quantization run's state "
                f"({', '.join(sorted(foreign)[:3])}); refusing to delete it"
            )

    def _damaged(self, what: str, problem: str) -> ValueError:
        return ValueError(
            f"resume state {self.dir}: {what} {problem}; the state cannot be used: delete "
            f"{self.dir} to start over (CLI: run the same command without --resume)"
        )

    def _checked_file(self, name: Any, digest: Any) -> Path:
        """The state file ``name``, after checking it against its recorded SHA-256."""
        if not isinstance(name, str) or name != Path(name).name or not _is_state_file(name):
            raise self._damaged("progress.json", f"names an unexpected file {name!r}")
        path = self.dir / name
        if not path.is_file():
            raise self._damaged(name, "is missing")
        if not isinstance(digest, str) or file_sha256(path) != digest:
            raise self._damaged(name, "does not match its SHA-256 (truncated or altered)")
        return path

    def load(self) -> dict[str, Any] | None:
        """The saved progress, None for a new run; ValueError if it belongs to another run."""
        if not self.progress_path.exists():
            # leftovers of a run killed before its first block finished are fine; anything
            # else means the directory is not ours
            foreign = [
                p.name
                for p in (self.dir.iterdir() if self.dir.is_dir() else [])
                if not _is_state_file(p.name)
            ]
            if foreign:
                raise ValueError(
                    f"state_dir {self.dir} holds no progress.json but other files "
                    f"({', '.join(sorted(foreign)[:3])}); use an empty or new directory"
                )
            return None
        try:
            progress = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._damaged("progress.json", f"is unreadable ({exc})") from None
        if not isinstance(progress, dict):
            raise self._damaged("progress.json", "is not a JSON object")
        if progress.get("version") != VERSION:
            raise self._damaged(
                "progress.json",
                f"has version {progress.get('version')!r} (this dcgen_quant writes {VERSION})",
            )
        if progress.get("sha256") != progress_sha256(progress):
            raise self._damaged("progress.json", "does not match its SHA-256 (edited?)")
        saved = progress.get("fingerprint")
        saved = saved if isinstance(saved, dict) else {}
        differ = [k for k in self.fp if saved.get(k) != self.fp[k]]
        if differ:
            raise ValueError(
                f"state_dir {self.dir} holds the progress of a different run "
                f"({', '.join(differ)} differ); resume with the same model, QuantConfig and "
                "calibration data, or use a new state_dir"
            )
        return progress

    def restore(self, model: nn.Module, progress: dict[str, Any], make_module, device):
        """Put the finished blocks' quantized modules into ``model``.

        Returns (index of the next block, that block's cached inputs or None, report so far).
        """
        # progress.json matched its own SHA-256, so its structure is what save() wrote; the
        # files it names are checked against theirs before they are read
        report = QuantReport.from_dict(progress["report"])
        by_name = {layer.name: layer for layer in report.layers}
        for block in progress["blocks"]:
            path = self._checked_file(block["file"], block.get("sha256"))
            tensors = load_file(str(path), device=str(device))
            for name in block["modules"]:
                module = make_module(by_name[name]).to(device)
                prefix = name + "."
                state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                module.load_state_dict(state, strict=True)
                replace_module(model, name, module)
        inputs = None
        if progress.get("inputs_file"):
            path = self._checked_file(progress["inputs_file"], progress.get("inputs_sha256"))
            inputs = torch.load(path, map_location=device, weights_only=True)
        return progress["next_block"], inputs, report

    def save(
        self,
        progress: dict[str, Any] | None,
        block_index: int,
        modules: dict[str, nn.Module],
        inputs: list[dict[str, Any]] | None,
        report: QuantReport,
    ) -> dict[str, Any]:
        """Record block ``block_index`` as finished; returns the new progress dict."""
        self.dir.mkdir(parents=True, exist_ok=True)
        blocks = list(progress["blocks"]) if progress else []
        old_inputs = progress.get("inputs_file") if progress else None
        block_file = f"block-{block_index:04d}.safetensors"
        tensors = {
            f"{name}.{key}": t.detach().contiguous()
            for name, module in modules.items()
            for key, t in module.state_dict().items()
        }
        with atomic_path(self.dir / block_file) as tmp:
            save_safetensors(tensors, tmp, None, self.dir / block_file)
            block_sha = file_sha256(tmp)
        blocks.append({"file": block_file, "modules": list(modules), "sha256": block_sha})
        inputs_file = inputs_sha = None
        if inputs is not None:
            inputs_file = f"inputs-{block_index + 1:04d}.pt"
            with atomic_path(self.dir / inputs_file) as tmp:
                # through a file object: a full disk then raises OSError(ENOSPC), where
                # torch.save(path) raises "enforce fail at inline_container.cc"
                with open(tmp, "wb") as fh:
                    torch.save(inputs, fh)
                inputs_sha = file_sha256(tmp)
        new = {
            "version": VERSION,
            "fingerprint": self.fp,
            "next_block": block_index + 1,
            "blocks": blocks,
            "inputs_file": inputs_file,
            "inputs_sha256": inputs_sha,
            "report": report.to_dict(),
        }
        new["sha256"] = progress_sha256(new)
        atomic_write_text(self.progress_path, json.dumps(new, indent=1))
        if old_inputs and old_inputs != inputs_file:
            (self.dir / old_inputs).unlink(missing_ok=True)
        return new
