"""The calibration cache: one block's inputs for every calibration sample, on the host or disk.

Block by block quantization keeps, for each calibration sample (one sample x timestep), the
keyword inputs of the block being quantized. For FLUX.1 at 1024^2 that is about 28 MiB per
sample, 36 GB for 64 prompts x 20 steps: more than a GPU, often more than the host, can hold.

Each sample's inputs are split into the part a block changes (the family's ``block_outputs``,
e.g. FLUX's ``hidden_states`` and ``encoder_hidden_states``: the *dynamic* part, one generation
per block) and the rest (``temb``, rotary embeddings, masks: the *static* part, written once).
A sample lives in host memory while the cache's memory stays within its byte budget, and on
disk (``root/static-IIIIII.pt``, ``root/gen-GGGG/dyn-IIIIII.pt``) otherwise:

* ``mode="memory"``: never spill; ``"disk"``: every sample on disk; ``"auto"``: spill the samples
  that do not fit ``budget`` bytes.

Samples are read back in index order, a batch at a time (the next batch is read from disk while
the current one runs), moved to the device, and each block's outputs replace the sample's
dynamic part: in place for samples in memory, as the next generation's file on disk (the previous
generation stays until the resume state has moved past it). The values are bit for bit those of
a cache that never spilled (torch.save round trips tensors exactly).

Every spilled file gets the SHA-256 of its bytes beside it (``.NAME.sha256``, written before the
file itself appears). A resumed run checks it before adopting a previous run's files: a
truncated or altered file is refused by name instead of becoming calibration data.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, atomic_write_text

MODES = ("auto", "memory", "disk")


def nbytes(value: Any) -> int:
    """Bytes of the tensors inside ``value`` (dicts, lists and tuples are walked)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def to_device(value: Any, device) -> Any:
    """``value`` with every tensor moved to ``device`` (no copy when it is already there)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _host(value: Any) -> Any:
    return to_device(value, "cpu")


def _digest_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


class CalibCache:
    """Block inputs of one rank's calibration samples.

    Parameters
    ----------
    indices : the global indices of this rank's samples (in order)
    dynamic_keys : the keyword inputs that each block replaces (``ModelFamily.block_outputs``)
    root : directory for spilled samples (created on first use)
    mode : "auto", "memory" or "disk"
    budget : bytes of samples kept in host memory in "auto" mode
    """

    def __init__(self, indices, dynamic_keys, root: str | Path, mode: str = "auto", budget=0):
        if mode not in MODES:
            raise ValueError(f"calibration cache mode must be one of {', '.join(MODES)}: {mode!r}")
        self.indices = list(indices)
        self.dynamic_keys = tuple(dynamic_keys)
        self.root = Path(root)
        self.mode = mode
        self.budget = float("inf") if mode == "memory" else (0 if mode == "disk" else budget)
        self.static: dict[int, dict[str, Any]] = {}  # samples held in memory
        self.dynamic: dict[int, dict[str, Any]] = {}
        self.gen: dict[int, int] = {}  # the block whose inputs each sample holds
        self.memory_bytes = 0
        self.peak_memory_bytes = 0
        self.disk_samples: set[int] = set()

    # ------------------------------------------------------------------ files

    def _static_path(self, i: int) -> Path:
        return self.root / f"static-{i:06d}.pt"

    def _dyn_path(self, i: int, gen: int) -> Path:
        return self.root / f"gen-{gen:04d}" / f"dyn-{i:06d}.pt"

    def _write(self, path: Path, value: Any) -> None:
        from .state import file_sha256

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
            atomic_write_text(_digest_path(path), file_sha256(tmp) + "\n")

    def _verify(self, path: Path) -> None:
        """ValueError naming ``path`` unless its bytes match the SHA-256 written beside it."""
        from .state import file_sha256

        digest = _digest_path(path)
        try:
            ok = digest.read_text().strip() == file_sha256(path)
        except (OSError, UnicodeDecodeError):
            ok = False
        if not ok:
            state = self.root.parent
            raise ValueError(
                f"resume state {state}: {path.relative_to(state)} does not match its SHA-256 "
                f"(truncated or altered); delete {state} to start over (CLI: the same command "
                "without --resume)"
            )

    @staticmethod
    def _read(path: Path) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True)

    # ------------------------------------------------------------------ filling

    def _split(self, kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        static = {k: v for k, v in kw.items() if k not in self.dynamic_keys}
        dyn = {k: v for k, v in kw.items() if k in self.dynamic_keys}
        return static, dyn

    def _fits(self, extra: int) -> bool:
        return self.memory_bytes + extra <= self.budget

    def _account(self, delta: int) -> None:
        self.memory_bytes += delta
        self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)

    def add(self, i: int, kw: dict[str, Any], gen: int = 0) -> None:
        """Sample ``i``'s inputs of block ``gen`` (its first block at capture)."""
        static, dyn = self._split(_host(kw))
        self.gen[i] = gen
        if self._fits(nbytes(static) + nbytes(dyn)):
            self.static[i], self.dynamic[i] = static, dyn
            self._account(nbytes(static) + nbytes(dyn))
        else:
            self._spill(i, static, dyn)

    def _spill(self, i: int, static, dyn) -> None:
        self._write(self._static_path(i), static)
        self._write(self._dyn_path(i, self.gen[i]), dyn)
        self.disk_samples.add(i)

    def adopt(self, i: int, gen: int) -> bool:
        """Take sample ``i`` from files a previous run left at generation ``gen`` (resume)."""
        if self._static_path(i).is_file() and self._dyn_path(i, gen).is_file():
            self._verify(self._static_path(i))
            self._verify(self._dyn_path(i, gen))
            self.gen[i] = gen
            self.disk_samples.add(i)
            return True
        return False

    def store(self, i: int, dyn: dict[str, Any]) -> None:
        """Sample ``i``'s next generation: the block's outputs (``dynamic_keys`` only)."""
        dyn = _host({k: dyn[k] for k in self.dynamic_keys})
        if i in self.disk_samples:
            self.gen[i] += 1
            self._write(self._dyn_path(i, self.gen[i]), dyn)
            return
        old = nbytes(self.dynamic[i])
        self.gen[i] += 1
        if self._fits(nbytes(dyn) - old):
            self.dynamic[i] = dyn
            self._account(nbytes(dyn) - old)
        else:  # outputs larger than the inputs and over budget: this sample moves to disk
            static = self.static.pop(i)
            self._account(-old - nbytes(static))
            del self.dynamic[i]
            self._spill(i, static, dyn)

    # ------------------------------------------------------------------ reading

    def _load(self, i: int) -> dict[str, Any]:
        if i in self.disk_samples:
            static = self._read(self._static_path(i))
            dyn = self._read(self._dyn_path(i, self.gen[i]))
        else:
            static, dyn = self.static[i], self.dynamic[i]
        return {**static, **dyn}

    def iterate(self, device, batch: int = 1, indices=None) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, keyword inputs on ``device``) for this rank's samples (or ``indices``), in
        order; disk samples are read a batch ahead on a background thread."""
        order = list(self.indices if indices is None else indices)
        batches = [order[s : s + max(1, batch)] for s in range(0, len(order), max(1, batch))]
        if not batches:
            return

        def read(chunk):
            return [(i, self._load(i)) for i in chunk]

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, batches[0])
            for b in range(len(batches)):
                loaded = pending.result()
                if b + 1 < len(batches):
                    pending = pool.submit(read, batches[b + 1])
                moved = [(i, to_device(kw, device)) for i, kw in loaded]
                del loaded
                yield from moved
                del moved

    def advance(self, block, family, device, batch: int = 1, indices=None) -> None:
        """Run ``block`` on the samples and keep its outputs as their next block's inputs."""
        with torch.no_grad():
            for i, kw in self.iterate(device, batch, indices):
                out = family.next_inputs(kw, block(**kw))
                del kw
                self.store(i, out)

    # ------------------------------------------------------------------ bookkeeping

    def generations_on_disk(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[4:]) for p in self.root.glob("gen-*") if p.name[4:].isdigit())

    def drop_generations_below(self, gen: int) -> None:
        """Delete spilled generations older than ``gen`` (no sample needs them any more)."""
        for g in self.generations_on_disk():
            if g < gen:
                shutil.rmtree(self.root / f"gen-{g:04d}", ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        return {
            "samples": len(self.indices),
            "in_memory": len(self.indices) - len(self.disk_samples),
            "on_disk": len(self.disk_samples),
            "memory_bytes": self.memory_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
        }
