"""Streaming SVDQuant: a FLUX / SANA transformer of any size, one block in memory at a time.

:func:`quantize_streaming` is the entry point of ``python -m dcgen_quant quantize`` (one process,
or every rank under ``torchrun``). The transformer is built on the meta device from its config;
only the tensors outside the blocks (embedders, final norm and projection) and the block being
quantized are ever loaded, onto ``--device``. Per block, in order:

1. its 16-bit weights are read from the safetensors files, one tensor at a time;
2. :func:`~dcgen_quant.quantize.block.quantize_block` collects its linears' inputs over the
   calibration cache (each rank over its own samples), quantizes its groups (each group on one
   rank) and swaps the quantized modules in on every rank;
3. the quantized block runs on the cached inputs to produce the next block's (data parallel);
4. rank 0 writes the block's tensors to the state directory and records the progress;
5. the block's memory is freed (back to meta).

At the end rank 0 writes the tensors outside the blocks and makes the checkpoint
(:mod:`~dcgen_quant.quantize.stream_writer`): the same tensors and metadata as
``quantize_model`` + ``save_quantized`` on the whole model in memory, bit for bit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import build_metadata
from ..models.base import family_for
from .block import module_from_entry, quantize_block, skipped_entry
from .calib_cache import CalibCache, nbytes, to_device
from .calibration import capture_block_inputs, check_calibration
from .config import QuantConfig
from .distributed import SOLO, Dist
from .layer import check_finite
from .plan import Plan, make_plan, plan_dict
from .report import QuantReport
from .state import replace_module
from .stream_state import StreamState, stream_fingerprint
from .stream_writer import finalize, tensors_of, write_staged
from .weights import (
    ModuleWeights,
    SafetensorsWeights,
    TensorFiles,
    materialize,
    meta_model,
    model_class_from_config,
    release,
)


@dataclass
class StreamSource:
    """A transformer to stream: its diffusers class, config and where its weights are."""

    cls: type
    config: dict[str, Any]
    weights: Any  # SafetensorsWeights | ModuleWeights

    @classmethod
    def from_directory(cls, directory: str | Path) -> StreamSource:
        """A diffusers model directory (``config.json`` + safetensors weights)."""
        directory = Path(directory)
        model_cls, config = model_class_from_config(directory)
        return cls(model_cls, config, SafetensorsWeights(directory))

    @classmethod
    def from_module(cls, model: nn.Module) -> StreamSource:
        """A model already in memory (the built-in tiny models)."""
        return cls(type(model), dict(model.config), ModuleWeights(model))

    def meta_model(self) -> nn.Module:
        return meta_model(self.cls, self.config)


@dataclass
class StreamOptions:
    """How a streaming run uses the machine (the QuantConfig says what it computes)."""

    device: str = "cpu"
    calib_cache: str = "auto"  # "auto" | "memory" | "disk"
    max_host_memory: int | None = None  # bytes per process; None: what the host has available
    batch: int | None = None  # samples moved to the device at a time; None: from the plan
    progress: bool = True
    resume: bool = True  # continue from the state directory's progress when it has some
    log: Callable[[str], None] | None = None  # where rank 0 prints the plan (default stderr)
    # filled by the run (this rank): "plan" (the plan's estimates), "cache" (the calibration
    # cache's use), "blocks" ((name, wall seconds) per block quantized)
    stats: dict[str, Any] = field(default_factory=dict)


def _first_error(dist: Dist, message: str | None) -> None:
    """Raise the first rank's error on every rank (all ranks stop with the same message)."""
    messages = dist.all_gather(message) if dist.world > 1 else [message]
    first = next((m for m in messages if m), None)
    if first:
        raise ValueError(first)


def check_weights(model, plans, weights, dtype, dist: Dist) -> None:
    """Every target weight is finite in ``dtype`` (what the run will quantize); the ranks share
    the reading. ValueError naming the first bad layer, on every rank."""
    members = [name for plan in plans for group in plan.groups for name in group.names]
    message = None
    for name in members[dist.rank :: dist.world]:
        try:
            check_finite(weights.read(f"{name}.weight", "cpu", dtype), f"layer {name}: weight")
        except ValueError as exc:
            message = str(exc)
            break
    if dist.world == 1 and message:
        raise ValueError(message)
    _first_error(dist, message)


def _install_finished(model, report: QuantReport, blocks, start: int, config) -> None:
    """Put the quantized module structure (on meta) of the finished blocks into ``model``."""
    names = tuple(f"{name}." for name, _ in blocks[:start])
    for entry in report.layers:
        if entry.kind != "skipped" and entry.name.startswith(names):
            replace_module(model, entry.name, module_from_entry(entry, config, "meta"))


def _capture(model, family, sample, device) -> dict[str, Any]:
    return capture_block_inputs(model, family, [to_device(sample, device)])[0]


class _Run:
    """The state of one streaming run on one rank (see :func:`quantize_streaming`)."""

    def __init__(self, source, calib, config, out, state_dir, options, dist):
        self.source, self.config, self.out = source, config, Path(out)
        self.state_dir, self.options, self.dist = Path(state_dir), options, dist
        self.device = torch.device(options.device)
        self.dtype = config.dtype
        self.calib = check_calibration(calib)
        self.model = source.meta_model()
        self.family = family_for(self.model)
        self.blocks = self.family.blocks(self.model)
        if not self.blocks:
            raise ValueError(f"{type(self.model).__name__} has no transformer blocks to quantize")
        self.prefixes = tuple(f"{name}." for name, _ in self.blocks)
        self.plans = [self.family.plan_block(n, b, config) for n, b in self.blocks]
        self.chunk = dist.chunk(len(self.calib))

    def log(self, line: str) -> None:
        if self.dist.is_main:
            (self.options.log or (lambda s: print(s, file=sys.stderr, flush=True)))(line)

    def staged(self, name: str) -> Path:
        return self.state_dir / name

    # ------------------------------------------------------------------ setup

    def resume_point(self) -> tuple[dict[str, Any], QuantReport]:
        fp = stream_fingerprint(
            self.source.cls.__name__, self.source.config, self.source.weights.digest(),
            self.config, self.calib,
        )  # fmt: skip
        self.state = StreamState(self.state_dir, fp)
        progress = message = None
        if self.options.resume and self.dist.is_main:
            try:
                progress = self.state.load()
            except ValueError as exc:  # another run's or a damaged state: every rank stops
                message = str(exc)
        progress, message = self.dist.agree((progress, message))
        if message:
            raise ValueError(message)
        progress = progress or self.state.new()
        if progress["report"] is not None:
            report = QuantReport.from_dict(progress["report"])
            _install_finished(self.model, report, self.blocks, progress["next_block"], self.config)
        else:
            cls_name = type(self.model).__name__
            report = QuantReport(model_class=cls_name, calib_samples=len(self.calib))
            for name, module, reason in self.family.outside_layers(self.model):
                report.add(skipped_entry(name, module, reason))
        return progress, report

    def make_plan(self) -> Plan:
        probe = _capture(self.model, self.family, self.calib[self.chunk[0] if self.chunk else 0],
                         self.device)  # fmt: skip
        sample_bytes = nbytes(probe)
        del probe
        plan = make_plan(
            self.model, self.family, self.plans, self.config, dtype=self.dtype,
            device=str(self.device), world=self.dist.world, samples=len(self.calib),
            rank_samples=len(self.chunk), sample_bytes=sample_bytes,
            outside_bytes=self.outside_bytes, cache_mode=self.options.calib_cache,
            max_host=self.options.max_host_memory, batch=self.options.batch,
        )  # fmt: skip
        for line in plan.lines():
            self.log(line)
        self.options.stats["plan"] = plan_dict(plan)
        return plan

    def fill_cache(self, plan: Plan, start: int) -> CalibCache:
        """Block ``start``'s inputs of this rank's samples: from spilled files a previous run
        left, else captured and run through the finished blocks again."""
        cache = CalibCache(self.chunk, self.family.block_outputs, self.state_dir / "calib",
                           self.options.calib_cache, plan.cache_budget)  # fmt: skip
        if start >= len(self.blocks):  # every block is done; only the checkpoint is missing
            return cache
        todo = [i for i in self.chunk if not (start and cache.adopt(i, start))]
        for i in todo:
            cache.add(i, _capture(self.model, self.family, self.calib[i], self.device))
        if start and todo:
            self.log(f"resume: recomputing block {start}'s inputs of {len(todo)} samples")
            for index in range(start):
                name, block = self.blocks[index]
                staged = TensorFiles([self.staged(f"block-{index:04d}.safetensors")])
                materialize(block, f"{name}.", staged, self.device, None)
                cache.advance(block, self.family, self.device, plan.batch, todo)
                release(block)
        return cache

    # ------------------------------------------------------------------ the run

    def run(self) -> QuantReport:
        self.outside_bytes = materialize(
            self.model, "", self.source.weights, self.device, self.dtype, skip=self.prefixes
        )
        progress, report = self.resume_point()
        start = progress["next_block"]
        check_weights(self.model, self.plans[start:], self.source.weights, self.dtype, self.dist)
        plan = self.make_plan()
        cache = self.fill_cache(plan, start)
        main, progress_bar = self.dist.is_main, self.options.progress and self.dist.is_main
        bar = tqdm(range(start, len(self.blocks)), desc="blocks", unit="block",
                   initial=start, total=len(self.blocks), disable=not progress_bar)  # fmt: skip
        timings = self.options.stats.setdefault("blocks", [])
        for index in bar:
            name, block = self.blocks[index]
            bar.set_postfix_str(name)
            started = time.perf_counter()
            materialize(block, f"{name}.", self.source.weights, self.device, self.dtype)
            _, entries = quantize_block(
                self.model, self.plans[index], cache.iterate(self.device, plan.batch),
                self.config, self.dist, progress=progress_bar,
            )  # fmt: skip
            for entry in entries:
                report.add(entry)
            if index + 1 < len(self.blocks):
                cache.advance(block, self.family, self.device, plan.batch)
            if main:
                record = write_staged(
                    self.staged(f"block-{index:04d}.safetensors"), tensors_of(block, f"{name}.")
                )
                progress = {**progress, "next_block": index + 1, "report": report.to_dict(),
                            "blocks": [*progress["blocks"], record]}  # fmt: skip
            self.dist.barrier()  # every rank's spilled inputs of the next block are written
            if main:
                self.state.save(progress)
                cache.drop_generations_below(index + 1)
            release(block)
            timings.append((name, time.perf_counter() - started))
        self.options.stats["cache"] = cache.stats()
        if main:
            self.write_checkpoint(progress, report)
        self.dist.barrier()
        return report

    def write_checkpoint(self, progress, report: QuantReport) -> None:
        outside = write_staged(
            self.staged("outside.safetensors"), tensors_of(self.model, "", self.prefixes)
        )
        records = [outside, *progress["blocks"]]
        checksums = {k: v for record in records for k, v in record["checksums"].items()}
        metadata = build_metadata(self.model, self.config, report, checksums)
        finalize(self.out, [self.staged(r["file"]) for r in records], metadata)


def quantize_streaming(
    source: StreamSource,
    calib: Sequence[dict[str, Any]],
    config: QuantConfig,
    out: str | Path,
    state_dir: str | Path,
    options: StreamOptions | None = None,
    dist: Dist = SOLO,
) -> QuantReport:
    """SVDQuant ``source`` block by block into the checkpoint ``out``, in bounded memory.

    Parameters
    ----------
    source : the transformer (:meth:`StreamSource.from_directory` or ``from_module``)
    calib : one dict of ``transformer.forward`` keyword arguments per calibration sample x
        timestep (every rank passes the same list; each uses its share)
    config : QuantConfig
    out : checkpoint path: ``*.safetensors`` (one file) or a directory (one shard per block)
    state_dir : where the run stages its blocks and keeps its resume state (created; rank 0
        writes it; with several ranks on several nodes it must be shared by all of them)
    options : device, calibration cache, host memory budget, batch, resume
    dist : the ranks (:func:`~dcgen_quant.quantize.distributed.init_from_env`)

    Returns
    -------
    QuantReport (identical on every rank). The checkpoint equals what ``quantize_model`` on the
    whole model in memory followed by ``save_quantized`` writes, tensor for tensor and in its
    layer metadata, on any number of ranks (given the same CPU threads per process). Raises
    ValueError (one line, before anything is written) when the plan does not fit.
    """
    return _Run(source, calib, config, out, state_dir, options or StreamOptions(), dist).run()
