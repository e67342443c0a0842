"""One transformer block of SVDQuant, shared by every driver (in memory, streaming, several ranks).

:func:`quantize_block` does, for one block whose weights are on the device:

1. run the (16-bit) block on this process's calibration samples with forward pre-hooks that fill
   one :class:`~dcgen_quant.quantize.calibration.TokenReservoir` per planned group;
2. hand every group's partial reservoirs to the rank that owns the group (ranks own whole
   groups, chosen by a deterministic cost balance), which merges them in sample order and
   quantizes the group (search, SVD, residual quantization, GPTQ);
3. share the quantized modules and their report entries with every rank and swap them into the
   block (every rank needs the quantized block to compute the next block's inputs).

The quantization of a group depends only on its merged tokens and its name-derived seed, so a run
on any number of ranks gives the modules a single process gives, bit for bit (with the same
number of CPU threads per process).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import UNSIGNED_ACT_SHIFT
from ..models.base import BlockPlan, PlannedGroup
from .calibration import InputCollector, TokenReservoir
from .config import QuantConfig
from .distributed import SOLO, Dist
from .layer import (
    linear_spec,
    make_module,
    make_split_module,
    quantize_group,
    quantize_split,
    quantize_weight_only,
    seed_for,
)
from .report import LayerReport
from .state import replace_module

NEVER_CALLED = "never called during calibration (kept 16-bit)"


def device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def skipped_entry(name: str, module: nn.Module, reason: str) -> LayerReport:
    """The report entry of a layer kept in 16 bits."""
    if isinstance(module, nn.Conv2d):
        n, k = module.out_channels, module.in_channels
    else:
        n, k = getattr(module, "out_features", 0), getattr(module, "in_features", 0)
    return LayerReport(
        name=name, kind="skipped", module=type(module).__name__, out_features=n,
        in_features=k, bias=getattr(module, "bias", None) is not None, reason=reason,
    )  # fmt: skip


def module_from_entry(entry: LayerReport, config: QuantConfig, device=None) -> nn.Module:
    """An empty runtime module matching a report entry (resume; ``device="meta"``: no memory)."""
    if entry.split_at is not None:
        return make_split_module(
            entry.in_features, entry.out_features, entry.split_at, entry.rank, entry.bias,
            config.format, config.dtype, device,
        )  # fmt: skip
    fmt = config.weight_only_format if entry.kind == "w4a16" else config.format
    return make_module(
        entry.kind, entry.module.endswith("Conv1x1"), entry.in_features, entry.out_features,
        entry.rank, entry.bias, fmt, config.dtype, device, act_unsigned=entry.act_unsigned,
    )  # fmt: skip


def _unsigned_ok(group: PlannedGroup, x: torch.Tensor, names: list[str]) -> bool:
    """The plan's act_unsigned (or split), unless the calibration inputs ``x`` (the GELU columns)
    contradict it (a layer the family lists as reading a GELU output sees values below
    -UNSIGNED_ACT_SHIFT): then signed codes, with a warning, instead of clipping those values."""
    if not (group.act_unsigned or group.split_at is not None):
        return False
    if (low := float(x.min())) < -UNSIGNED_ACT_SHIFT:
        warnings.warn(
            f"{'+'.join(names)}: inputs go down to {low:.4g}, below -{UNSIGNED_ACT_SHIFT}; "
            "quantized with signed activation codes instead of unsigned",
            stacklevel=4,
        )
        return False
    return True


def group_cost(model: nn.Module, group: PlannedGroup) -> float:
    """Relative cost of quantizing a group (weights N x K; W4A16 layers need no search)."""
    cost = 0.0
    for name in group.names:
        m = model.get_submodule(name)
        n = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        k = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        cost += n * k
    return cost / 20 if group.kind == "w4a16" else cost


def collect_inputs(
    model: nn.Module,
    plan: BlockPlan,
    samples: Iterable[tuple[int, dict[str, Any]]],
    config: QuantConfig,
) -> list[TokenReservoir]:
    """This process's reservoirs, one per planned group, over ``samples``.

    Parameters
    ----------
    model : the model holding the block ``plan.name`` (16-bit, weights on the device)
    plan : the block's plan
    samples : (global sample index, the block's keyword inputs on the device), in index order
    config : QuantConfig (``calib_tokens``, ``seed``)
    """
    block = model.get_submodule(plan.name)
    device = device_of(block)
    groups, reservoirs = [], []
    for group in plan.groups:
        modules = [model.get_submodule(n) for n in group.names]
        reservoir = TokenReservoir(
            config.calib_tokens, seed_for(config.seed, group.names[0]), device
        )
        groups.append((group.names, modules, reservoir))
        reservoirs.append(reservoir)
    collector = InputCollector(groups)
    with torch.no_grad(), collector:
        first = True
        for index, kw in samples:
            for reservoir in reservoirs:
                reservoir.begin_sample(index)
            block(**kw)
            if first:
                collector.check_shared_inputs()
                first = False
    return reservoirs


def quantize_planned_group(
    model: nn.Module,
    group: PlannedGroup,
    x: torch.Tensor | None,
    config: QuantConfig,
    rank: int | None = None,
) -> list[tuple[str, nn.Module | None, LayerReport]]:
    """(name, quantized module or None if kept 16-bit, report entry) per member of ``group``.

    ``x`` [T, K]: the group's merged calibration tokens (None: the group was never called).
    ``rank``: the group's low-rank rank where rank allocation chose one (default config.rank).
    """
    modules = [model.get_submodule(n) for n in group.names]
    if x is None:
        return [
            (name, None, skipped_entry(name, module, NEVER_CALLED))
            for name, module in zip(group.names, modules)
        ]
    x = x.float()
    specs = [linear_spec(m, n) for m, n in zip(modules, group.names)]
    with torch.no_grad():
        if group.kind == "w4a16":
            results = [quantize_weight_only(specs[0], x, config)]
        elif group.split_at is not None and _unsigned_ok(
            group, x[:, group.split_at :], group.names
        ):
            results = [quantize_split(specs[0], x, config, group.split_at)]
        else:
            unsigned = group.act_unsigned and _unsigned_ok(group, x, group.names)
            if rank is not None:
                config = dataclasses.replace(config, rank=rank)
            results = quantize_group(specs, x, config, act_unsigned=unsigned)
    return [(spec.name, module, entry) for (module, entry), spec in zip(results, specs)]


def _to(module: nn.Module | None, device) -> nn.Module | None:
    return None if module is None else module.to(device)


def _allocated_ranks(model, plan: BlockPlan, mine, tokens, config: QuantConfig, dist: Dist):
    """``config.rank_alloc``: {first member's name: rank} for the block's W4A4 groups (ranks.py).
    Each rank measures its own groups; the allocation, made from all of them, is the same on
    every rank."""
    from .ranks import allocate_block, group_rank_errors

    found = {}
    for i in mine:
        item = group_rank_errors(model, plan.groups[i], tokens(i), config)
        if item is not None:
            found[i] = item
    if dist.world > 1:
        gathered: dict[int, tuple] = {}
        for contribution in dist.all_gather(found):
            gathered.update(contribution)
        found = gathered
    return allocate_block([found[i] for i in sorted(found)])


def quantize_block(
    model: nn.Module,
    plan: BlockPlan,
    samples: Iterable[tuple[int, dict[str, Any]]],
    config: QuantConfig,
    dist: Dist = SOLO,
    progress: bool = False,
) -> tuple[dict[str, nn.Module], list[LayerReport]]:
    """Quantize the block ``plan.name`` of ``model`` in place, on every rank of ``dist``.

    Parameters
    ----------
    model : the model; the block's weights are on the device, the rest may be on meta
    plan : the block's plan (:meth:`ModelFamily.plan_block`)
    samples : this rank's calibration samples: (global index, block keyword inputs on the
        device), in index order; the ranks' samples are consecutive runs, rank 0's first
    config : QuantConfig
    dist : the process group (:data:`~dcgen_quant.quantize.distributed.SOLO` for one process)
    progress : tqdm bar over this rank's groups

    Returns
    -------
    (name -> quantized module now in the model, report entries in plan order: the block's
    skipped layers, then each group's members). Identical on every rank.
    """
    block = model.get_submodule(plan.name)
    device = device_of(block)
    reservoirs = collect_inputs(model, plan, samples, config)
    owners = dist.owners([group_cost(model, g) for g in plan.groups])
    mine = [i for i, owner in enumerate(owners) if owner == dist.rank]
    parts = dist.gather_to_owners({i: r.state() for i, r in enumerate(reservoirs)}, owners)
    del reservoirs

    def tokens(i: int) -> torch.Tensor | None:
        seed = seed_for(config.seed, plan.groups[i].names[0])
        return TokenReservoir.merge(config.calib_tokens, seed, parts[i], device).data

    ranks = _allocated_ranks(model, plan, mine, tokens, config, dist) if config.rank_alloc else {}
    results: dict[int, list] = {}
    bar = tqdm(mine, desc=plan.name, unit="group", leave=False, disable=not progress)
    for i in bar:
        group = plan.groups[i]
        x = tokens(i)
        del parts[i]
        results[i] = quantize_planned_group(model, group, x, config, ranks.get(group.names[0]))
        del x
    if dist.world > 1:
        # modules travel as CPU tensors; each rank puts them on its own device
        shared: dict[int, list] = {}
        outgoing = {i: [(n, _to(m, "cpu"), e) for n, m, e in r] for i, r in results.items()}
        for contribution in dist.all_gather(outgoing):
            shared.update(contribution)
        results = shared

    entries = [skipped_entry(name, module, reason) for name, module, reason in plan.skipped]
    new_modules: dict[str, nn.Module] = {}
    for i in range(len(plan.groups)):
        for name, module, entry in results[i]:
            if module is not None:
                module = module.to(device)
                replace_module(model, name, module)
                new_modules[name] = module
            entries.append(entry)
    return new_modules, entries
