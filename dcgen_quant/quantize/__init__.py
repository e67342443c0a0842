"""SVDQuant: smoothing + a 16-bit low-rank branch + a 4-bit residual, per linear layer.

Public API::

    quantize_linear(linear, x, config, *, name, report, weight_only) -> SVDQLinear
    quantize_linears(linears, x, config, *, names, report) -> list[SVDQLinear]  (fused group)
    quantize_model(model, calib, config, *, progress=True, state_dir=None) -> QuantReport
    QuantConfig, QuantReport, LayerReport

Modules: smoothing.py (lambda and the (alpha, beta) candidates), lowrank.py (randomized / full
SVD factors), fakequant.py (exact simulated 4-bit values), search.py (the per-group search),
gptq.py (GPTQ on the residual), layer.py (modules and the layer/group entry points),
calibration.py (streaming block-by-block calibration), state.py (resume), model.py
(``quantize_model``), report.py.
"""

from .config import QuantConfig
from .layer import quantize_linear, quantize_linears
from .model import quantize_model
from .report import LayerReport, QuantReport

__all__ = [
    "LayerReport",
    "QuantConfig",
    "QuantReport",
    "quantize_linear",
    "quantize_linears",
    "quantize_model",
]
