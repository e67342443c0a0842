"""Per-family knowledge of diffusion transformers (FLUX, SANA), calibration inputs and tiny
test models.

``family_for(model)`` -> :class:`~dcgen_quant.models.base.ModelFamily` (block lists, fused
groups, skips, W4A16 AdaLayerNorm linears); ``synthetic_calibration`` and
``capture_pipeline_calibration`` make the ``calib`` argument of
:func:`dcgen_quant.quantize.quantize_model`; tiny.py / tiny_pipeline.py build small models and
pipelines in code.
"""

from .base import ModelFamily, family_for, supported_classes
from .calibration import capture_pipeline_calibration, synthetic_calibration

__all__ = [
    "ModelFamily",
    "capture_pipeline_calibration",
    "family_for",
    "supported_classes",
    "synthetic_calibration",
]
