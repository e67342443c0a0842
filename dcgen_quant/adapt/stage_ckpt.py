"""Checkpoints of a running stage: torch.distributed.checkpoint, resumable with any process count.

A checkpoint is a directory (``OUT/<stage>/ckpt``)::

    .metadata, __<rank>_<k>.distcp   torch.distributed.checkpoint (DCP) files: the tensors
    meta.json                        format, stage name, completed steps, loss history, the
                                     hyperparameters' fingerprint, the process count that wrote it

Tensors are saved by their names (``params/<name>``, ``ema/<name>``,
``optim/<name>/{exp_avg,exp_avg_sq,step}``) with their global shapes, each rank writing its
own shards of the FSDP-sharded ones and rank 0 the replicated ones. DCP reads them back into
whatever layout the loading run has: saved by 2 processes and loaded by 1 (plain tensors), or
the other way (each rank reads its shard).

Writes are atomic: all ranks write into ``.ckpt.tmp`` next to the target, then rank 0 adds
``meta.json`` and swaps it in with two renames, so ``ckpt`` is always a complete checkpoint
(or absent). Multi-node runs need ``OUT`` on a file system every node sees.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from .distributed import Dist

FORMAT = 2
META = "meta.json"
# DCP warns when it runs without a process group ("assuming the intent is to save in a single
# process"), which is exactly what a 1-process run does.
_NO_PG_WARNING = r"torch.distributed is disabled, unavailable or uninitialized"


def legacy_file(path: Path) -> Path:
    """Where the single-file checkpoint of earlier versions (``ckpt.pt``) of ``path`` lies."""
    return path.with_name(path.name + ".pt")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def save(path: str | Path, dist: Dist, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (flat name -> tensor, sharded or not) and ``meta`` to ``path`` atomically.

    A collective: every rank calls it with its own shards.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = _tmp(path)
    if dist.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_PG_WARNING)
        dcp.save(tensors, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.main:
        atomic_write_text(tmp / META, json.dumps({**meta, "format": FORMAT}, indent=1) + "\n")
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of the checkpoint at ``path``; a one-line error for anything else."""
    path = Path(path)
    meta_file = path / META
    if not path.is_dir() or not meta_file.is_file() or not (path / ".metadata").is_file():
        raise ValueError(
            f"ckpt_path: {path} is not a stage checkpoint (no {META} and .metadata); remove it "
            "to restart the stage"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"ckpt_path: {meta_file} is unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"ckpt_path: {meta_file} has format {got!r}; expected {FORMAT}")
    return meta


def load(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` (flat name -> tensor in this run's layout) in place from ``path``.

    A collective. Missing names or shape mismatches are one-line errors.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_PG_WARNING)
            dcp.load(tensors, checkpoint_id=str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        # its message is every rank's traceback; the last line names the cause
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        raise ValueError(f"ckpt_path: {path} cannot be loaded into this stage: {reason}") from exc
