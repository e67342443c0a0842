"""``quantize_model``: SVDQuant a whole FLUX / SANA transformer, block by block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..models.base import family_for
from .block import device_of, module_from_entry, quantize_block, skipped_entry
from .calibration import capture_block_inputs, check_calibration, run_block
from .config import QuantConfig
from .layer import QUANTIZED_TYPES, check_finite
from .report import QuantReport
from .state import RunState, fingerprint


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
    device = device_of(model)
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
            model, progress_state, lambda e: module_from_entry(e, config), device
        )
    else:
        start, inputs = 0, None
        report = QuantReport(model_class=type(model).__name__, calib_samples=len(calib))
        for name, module, reason in family.outside_layers(model):
            report.add(skipped_entry(name, module, reason))

    if start < len(blocks) and inputs is None:
        inputs = capture_block_inputs(model, family, calib)
    bar = tqdm(range(start, len(blocks)), desc="blocks", unit="block", disable=not progress)
    for index in bar:
        name, block = blocks[index]
        bar.set_postfix_str(name)
        plan = plans[index]
        new_modules, entries = quantize_block(
            model, plan, enumerate(inputs), config, progress=progress
        )
        for entry in entries:
            report.add(entry)
        last = index == len(blocks) - 1
        inputs = None if last else run_block(family, block, inputs)
        if state is not None:
            progress_state = state.save(progress_state, index, new_modules, inputs, report)

    model.dcgen_quant_config = config
    model.dcgen_quant_report = report
    return report
