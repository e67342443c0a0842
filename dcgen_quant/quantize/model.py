"""``quantize_model``: SVDQuant a whole FLUX / SANA transformer, block by block."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import UNSIGNED_ACT_SHIFT
from ..models.base import BlockPlan, PlannedGroup, family_for
from .calibration import (
    InputCollector,
    TokenReservoir,
    capture_block_inputs,
    check_calibration,
    run_block,
)
from .config import QuantConfig
from .layer import (
    QUANTIZED_TYPES,
    check_finite,
    linear_spec,
    make_module,
    make_split_module,
    quantize_group,
    quantize_split,
    quantize_weight_only,
    seed_for,
)
from .ranks import block_ranks
from .report import LayerReport, QuantReport
from .state import RunState, fingerprint, replace_module


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _skipped_entry(name: str, module: nn.Module, reason: str) -> LayerReport:
    if isinstance(module, nn.Conv2d):
        n, k = module.out_channels, module.in_channels
    else:
        n, k = getattr(module, "out_features", 0), getattr(module, "in_features", 0)
    return LayerReport(
        name=name, kind="skipped", module=type(module).__name__, out_features=n,
        in_features=k, bias=getattr(module, "bias", None) is not None, reason=reason,
    )  # fmt: skip


def _module_from_entry(entry: LayerReport, config: QuantConfig) -> nn.Module:
    """An empty runtime module matching a report entry (resume)."""
    if entry.split_at is not None:
        return make_split_module(
            entry.in_features, entry.out_features, entry.split_at, entry.rank, entry.bias,
            config.format, config.dtype,
        )  # fmt: skip
    fmt = config.weight_only_format if entry.kind == "w4a16" else config.format
    return make_module(
        entry.kind, entry.module.endswith("Conv1x1"), entry.in_features, entry.out_features,
        entry.rank, entry.bias, fmt, config.dtype, act_unsigned=entry.act_unsigned,
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
            stacklevel=3,
        )
        return False
    return True


def _quantize_block(
    model: nn.Module,
    plan: BlockPlan,
    inputs: list[dict[str, Any]],
    config: QuantConfig,
    block: nn.Module,
    progress: bool,
) -> tuple[dict[str, nn.Module], list[LayerReport]]:
    """Collect the block's linear inputs over all samples, quantize them, swap them in."""
    device = _device_of(block)
    groups, reservoirs = [], []
    for group in plan.groups:
        modules = [model.get_submodule(n) for n in group.names]
        gen = torch.Generator(device=device).manual_seed(seed_for(config.seed, group.names[0]))
        reservoir = TokenReservoir(config.calib_tokens, gen)
        groups.append((group.names, modules, reservoir))
        reservoirs.append(reservoir)
    collector = InputCollector(groups)
    with torch.no_grad(), collector:
        for i, kw in enumerate(inputs):
            block(**kw)
            if i == 0:
                collector.check_shared_inputs()

    ranks = block_ranks(model, plan, reservoirs, config) if config.rank_alloc else {}
    entries = [_skipped_entry(name, module, reason) for name, module, reason in plan.skipped]
    new_modules: dict[str, nn.Module] = {}
    bar = tqdm(
        list(zip(plan.groups, groups)), desc=plan.name, unit="group", leave=False,
        disable=not progress,
    )  # fmt: skip
    for group, (names, modules, reservoir) in bar:
        if reservoir.data is None:
            for name, module in zip(names, modules):
                entries.append(
                    _skipped_entry(name, module, "never called during calibration (kept 16-bit)")
                )
            continue
        x = reservoir.tokens().float()
        specs = [linear_spec(m, n) for m, n in zip(modules, names)]
        with torch.no_grad():
            if group.kind == "w4a16":
                results = [quantize_weight_only(specs[0], x, config)]
            elif group.split_at is not None and _unsigned_ok(group, x[:, group.split_at :], names):
                results = [quantize_split(specs[0], x, config, group.split_at)]
            else:
                unsigned = group.act_unsigned and _unsigned_ok(group, x, names)
                cfg = config
                if names[0] in ranks:
                    cfg = dataclasses.replace(config, rank=ranks[names[0]])
                results = quantize_group(specs, x, cfg, act_unsigned=unsigned)
        for (module, entry), spec in zip(results, specs):
            module = module.to(device)
            replace_module(model, spec.name, module)
            new_modules[spec.name] = module
            entries.append(entry)
        del x
    return new_modules, entries


def quantize_model(
    model: nn.Module,
    calib: Sequence[Mapping[str, Any]],
    config: QuantConfig | None = None,
    *,
    progress: bool = True,
    state_dir: str | Path | None = None,
) -> QuantReport:
    """SVDQuant every target linear of a diffusers FLUX / SANA transformer, in place.

    Parameters
    ----------
    model : FluxTransformer2DModel or SanaTransformer2DModel (unquantized), in eval mode
    calib : one dict of ``model.forward`` keyword arguments per calibration sample x timestep
        (:func:`dcgen_quant.models.synthetic_calibration`,
        :func:`dcgen_quant.models.capture_pipeline_calibration`)
    config : QuantConfig (default ``QuantConfig()``)
    progress : show tqdm progress bars (blocks, groups)
    state_dir : directory for resumable progress; a second call with the same directory (same
        model, config and calibration) continues after the last finished block and ends
        bit-identical to an uninterrupted run

    Returns
    -------
    QuantReport, also set as ``model.dcgen_quant_report`` (and the config as
    ``model.dcgen_quant_config``). Linears in the blocks become ``SVDQLinear`` /
    ``SVDQConv1x1`` (W4A4) or ``W4A16Linear`` (AdaLayerNorm modulation); the rest stays 16-bit and
    is listed in the report as skipped with the reason.
    """
    config = config or QuantConfig()
    family = family_for(model)
    if any(isinstance(m, QUANTIZED_TYPES) for m in model.modules()):
        raise ValueError(
            "model already contains quantized layers; pass a freshly loaded (unquantized) model"
        )
    calib = check_calibration(calib)
    device = _device_of(model)
    blocks = family.blocks(model)
    # Plan every block and check every target weight before any work or state is written, so
    # that bad input (an incompatible K, a NaN weight) fails at once and leaves nothing behind.
    plans = [family.plan_block(name, block, config) for name, block in blocks]
    for plan in plans:
        for group in plan.groups:
            for member in group.names:
                check_finite(model.get_submodule(member).weight, f"layer {member}: weight")

    state = progress_state = None
    if state_dir is not None:
        state = RunState(state_dir, fingerprint(model, calib, config))
        progress_state = state.load()
    if progress_state is not None:
        start, inputs, report = state.restore(
            model, progress_state, lambda e: _module_from_entry(e, config), device
        )
    else:
        start, inputs = 0, None
        report = QuantReport(model_class=type(model).__name__, calib_samples=len(calib))
        for name, module, reason in family.outside_layers(model):
            report.add(_skipped_entry(name, module, reason))

    if start < len(blocks) and inputs is None:
        inputs = capture_block_inputs(model, family, calib)
    bar = tqdm(range(start, len(blocks)), desc="blocks", unit="block", disable=not progress)
    for index in bar:
        name, block = blocks[index]
        bar.set_postfix_str(name)
        plan = plans[index]
        new_modules, entries = _quantize_block(model, plan, inputs, config, block, progress)
        for entry in entries:
            report.add(entry)
        last = index == len(blocks) - 1
        inputs = None if last else run_block(family, block, inputs)
        if state is not None:
            progress_state = state.save(progress_state, index, new_modules, inputs, report)

    model.dcgen_quant_config = config
    model.dcgen_quant_report = report
    return report
