"""The plan of a streaming run: what it will hold where, printed before any work, and the checks
that refuse a run that cannot fit (one line, nothing written).

Estimates per rank, from the model's shapes (the meta model), the QuantConfig and the measured
size of one calibration sample's block inputs:

* one block in 16 bits (the largest), its quantized modules, the tensors outside the blocks;
* the token reservoirs of a block (``calib_tokens`` x K per group, in the model dtype) and the
  working set of quantizing its largest group (float32 copies of the weight, the tokens and the
  outputs: :data:`WORK_WEIGHT`, :data:`WORK_TOKENS`, :data:`WORK_OUTPUTS` copies of each,
  measured on FLUX-width groups; plus [K, K] copies for GPTQ and the output-aware low-rank
  branch, the larger of :data:`WORK_SQUARE_GPTQ` and :data:`WORK_SQUARE_OUTPUT_LOWRANK`);
* a batch of samples on the device, and the activations of one block forward
  (:data:`ACTIVATION_FACTOR` x one sample's inputs);
* the calibration cache: what fits the host budget stays in memory, the rest goes to disk.

On the CPU, device memory is host memory. ``max_host`` None means "what the machine has
available" (``MemAvailable``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..formats import get_format

WORK_WEIGHT = 8  # float32 [N, K] copies alive while a group is searched (W, W_hat, R, Q(R), ...)
WORK_TOKENS = 5  # float32 [T, K] copies (x, the dtype-rounded x, x / lambda, its 4-bit value...)
WORK_OUTPUTS = 3  # float32 [T, N] copies (reference outputs, the error, the check's outputs)
WORK_WEIGHT_W4A16 = 4  # a W4A16 layer is rounded once: its weight, codes, dequantized weight
# [K, K] float32 copies: GPTQ's shrinkage estimate, Hessian and inverse factor (peak RSS over the
# step, `python -m dcgen_quant.bench.gptq_memory --k 2048 4096`: 4.4-4.7 copies at K = 4096, 6.1
# at K = 2048 where glibc keeps freed blocks; 8.8 before each matrix was freed as soon as the next
# existed), or the output-aware low-rank branch's activation whitening (2.8-3.4 copies), freed
# before GPTQ begins; with K = 12288 (FLUX.1's fc2) one copy is 0.6 GB
WORK_SQUARE_GPTQ = 5
WORK_SQUARE_OUTPUT_LOWRANK = 4
ACTIVATION_FACTOR = 8  # one block forward's live activations, in units of one sample's inputs

_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes of a size like ``24GB`` (10^9), ``24GiB`` (2^30), ``512M``, ``1.5g`` or ``1000``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"size {text!r} not understood; use a number with an optional unit such as 512MB, "
            "24GB or 24GiB"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return int(value)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def available_host_memory() -> int:
    """``MemAvailable`` of /proc/meminfo (what the kernel can give without swapping)."""
    try:
        with open("/proc/meminfo") as fh:
            lines = fh.read().splitlines()
        for line in lines:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _shape(module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels, module.in_channels
    return module.out_features, module.in_features


def quantized_bytes(n: int, k: int, rank: int, config, bias: bool, weight_only=False) -> int:
    """Checkpoint bytes of one quantized layer: 4-bit codes, scales, bias; a W4A4 layer also has
    its smoothing factor and low-rank branch, a W4A16 layer is in ``config.weight_only_format``."""
    spec = get_format(config.weight_only_format if weight_only else config.format)
    dsize = config.dtype.itemsize
    scales = (k // spec.group_size) * n * spec.scale_dtype(config.dtype).itemsize
    lowrank = 0 if weight_only else (k + n) * min(rank, n, k) * dsize + k * dsize
    return n * k // 2 + scales + lowrank + (n * dsize if bias else 0)


@dataclass
class Plan:
    """What one rank of a streaming run will hold (bytes) and how it splits the calibration."""

    model_class: str
    blocks: int
    block_kinds: str
    device: str
    world: int
    samples: int
    rank_samples: int
    sample_bytes: int
    block_bytes: int
    quantized_block_bytes: int
    outside_bytes: int
    reservoir_bytes: int
    work_bytes: int
    activation_bytes: int
    checkpoint_bytes: int
    batch: int
    cache_mode: str
    max_host: int
    host_fixed: int = 0
    device_need: int = 0
    device_capacity: int | None = None
    cache_budget: float = 0
    cache_memory: int = 0
    cache_disk: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def lines(self) -> list[str]:
        cal = self.rank_samples * self.sample_bytes
        total = fmt_bytes(self.samples * self.sample_bytes)
        out = [
            f"plan: {self.model_class}, {self.block_kinds} blocks on {self.device}"
            f"{f' x {self.world} ranks' if self.world > 1 else ''}; calibration {self.samples} "
            f"inputs of {fmt_bytes(self.sample_bytes)} ({total}"
            f"{f', {self.rank_samples} on this rank' if self.world > 1 else ''})",
            f"  largest block {fmt_bytes(self.block_bytes)} in 16 bits, "
            f"{fmt_bytes(self.quantized_block_bytes)} quantized; outside the blocks "
            f"{fmt_bytes(self.outside_bytes)}; reservoirs {fmt_bytes(self.reservoir_bytes)}; "
            f"group working set {fmt_bytes(self.work_bytes)}",
            f"  host memory: ~{fmt_bytes(self.host_fixed + self.cache_memory)} peak "
            f"(budget {fmt_bytes(self.max_host)}): calibration cache ({self.cache_mode}) "
            f"{fmt_bytes(self.cache_memory)} in memory, {fmt_bytes(self.cache_disk)} on disk "
            f"of {fmt_bytes(cal)}",
        ]
        if self.cuda:
            cap = f" of {fmt_bytes(self.device_capacity)}" if self.device_capacity else ""
            out.append(
                f"  device memory: ~{fmt_bytes(self.device_need)}{cap} (block, working set, "
                f"batch of {self.batch} samples and its activations)"
            )
        out.append(
            f"  disk: checkpoint ~{fmt_bytes(self.checkpoint_bytes)} (staged block by block), "
            f"spilled calibration up to {fmt_bytes(2 * self.cache_disk)}"
        )
        return out + [f"  note: {n}" for n in self.notes]


def make_plan(
    model, family, plans, config, *, dtype, device: str, world: int, samples: int,
    rank_samples: int, sample_bytes: int, outside_bytes: int, cache_mode: str,
    max_host: int | None, batch: int | None,
) -> Plan:  # fmt: skip
    """Estimate the run (see the module docstring) and size the cache and the device batch.

    Raises ValueError (one line) when the budget or the device cannot hold one block plus a
    batch of one sample, or when ``cache_mode="memory"`` cannot keep the calibration in memory.
    """
    from .weights import module_bytes

    blocks = family.blocks(model)
    counts: dict[str, int] = {}
    for name, _ in blocks:
        counts[name.rsplit(".", 1)[0]] = counts.get(name.rsplit(".", 1)[0], 0) + 1
    dsize = config.dtype.itemsize
    block_bytes = quant_bytes = reservoirs = work = 0
    for (_, block), plan in zip(blocks, plans):
        block_bytes = max(block_bytes, module_bytes(block, dtype))
        q = r = w = 0
        for group in plan.groups:
            shapes = [_shape(model.get_submodule(n)) for n in group.names]
            k = shapes[0][1]
            n_total = sum(n for n, _ in shapes)
            tokens = config.calib_tokens
            r += tokens * (k * dsize + 4)
            copies = WORK_WEIGHT if group.kind == "w4a4" else WORK_WEIGHT_W4A16
            # GPTQ's [K, K] matrices and the output-aware branch's whitener never coexist (the
            # whitener is freed before GPTQ starts): the larger of the two counts
            square = WORK_SQUARE_GPTQ if config.gptq else 0
            if group.kind == "w4a4" and config.rank and config.lowrank != "svd":
                square = max(square, WORK_SQUARE_OUTPUT_LOWRANK)
            w = max(w, 4 * (copies * n_total * k + WORK_TOKENS * tokens * k
                            + WORK_OUTPUTS * tokens * n_total + square * k * k))  # fmt: skip
            for name, (n, kk) in zip(group.names, shapes):
                bias = getattr(model.get_submodule(name), "bias", None) is not None
                unsigned = group.act_unsigned  # the bias absorbs the shift: a bias is stored
                q += quantized_bytes(n, kk, config.rank, config, bias or unsigned,
                                     weight_only=group.kind == "w4a16")  # fmt: skip
        quant_bytes, reservoirs, work = max(quant_bytes, q), max(reservoirs, r), max(work, w)
    checkpoint = outside_bytes + sum(
        module_bytes(b, dtype) for _, b in blocks
    ) * quant_bytes // max(block_bytes, 1)
    kinds = " + ".join(str(c) for c in counts.values())
    host_total = max_host if max_host is not None else available_host_memory()
    plan = Plan(
        model_class=type(model).__name__, blocks=len(blocks), block_kinds=kinds, device=device,
        world=world, samples=samples, rank_samples=rank_samples, sample_bytes=sample_bytes,
        block_bytes=block_bytes, quantized_block_bytes=quant_bytes, outside_bytes=outside_bytes,
        reservoir_bytes=reservoirs, work_bytes=work,
        activation_bytes=ACTIVATION_FACTOR * sample_bytes, checkpoint_bytes=checkpoint,
        batch=1, cache_mode=cache_mode, max_host=host_total,
    )  # fmt: skip
    compute = block_bytes + quant_bytes + reservoirs + work + plan.activation_bytes
    # host: the quantized block is copied to the CPU to be written; on the CPU everything else
    # is host memory too
    plan.host_fixed = 2 * quant_bytes + (outside_bytes + compute if not plan.cuda else 0)
    if plan.cuda:
        plan.device_capacity = _device_free(device)
        plan.device_need = outside_bytes + compute
    budget_flag = "--max-host-memory" if max_host is not None else "the available host memory"

    def batch_cost(b: int) -> int:
        # a batch is read ahead while the previous one runs: two batches of copies at most
        return 2 * b * sample_bytes

    if plan.host_fixed + batch_cost(1) > host_total:
        raise ValueError(
            f"{budget_flag} ({fmt_bytes(host_total)}) cannot hold one block plus its batch: "
            f"that needs about {fmt_bytes(plan.host_fixed + batch_cost(1))} (block "
            f"{fmt_bytes(block_bytes)}, quantization working set {fmt_bytes(reservoirs + work)}, "
            f"one sample {fmt_bytes(sample_bytes)})"
        )
    capacity = plan.device_capacity
    if plan.cuda and capacity is not None and plan.device_need + sample_bytes > capacity:
        raise ValueError(
            f"{device} has {fmt_bytes(capacity)} free; one block plus its batch needs about "
            f"{fmt_bytes(plan.device_need + sample_bytes)}"
        )
    if batch is None:
        batch = 1
        if plan.cuda and plan.device_capacity is not None:
            room = plan.device_capacity - plan.device_need
            batch = max(1, min(16, rank_samples, int(room // max(sample_bytes, 1))))
        elif not plan.cuda:
            batch = 2
    plan.batch = max(1, batch)
    if plan.cuda:
        plan.device_need += plan.batch * sample_bytes
    plan.host_fixed += batch_cost(plan.batch)
    cache_total = rank_samples * sample_bytes
    room = max(0, host_total - plan.host_fixed)
    if cache_mode == "memory":
        if cache_total > room and max_host is not None:
            raise ValueError(
                f"--calib-cache memory: the calibration cache needs {fmt_bytes(cache_total)} but "
                f"{budget_flag} leaves {fmt_bytes(room)} after one block plus its batch; use "
                "--calib-cache auto or disk"
            )
        plan.cache_budget = math.inf
    else:
        plan.cache_budget = 0 if cache_mode == "disk" else room
    plan.cache_memory = int(min(cache_total, plan.cache_budget))
    plan.cache_memory -= plan.cache_memory % max(sample_bytes, 1)
    plan.cache_disk = cache_total - plan.cache_memory
    return plan


def _device_free(device: str) -> int | None:
    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    except (RuntimeError, AssertionError, ValueError):
        return None


def plan_dict(plan: Plan) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(plan)
    d["cache_budget"] = None if math.isinf(plan.cache_budget) else plan.cache_budget
    return d
