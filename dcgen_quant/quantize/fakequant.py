"""Quantize-then-dequantize with the bit-exact format rules, for the error searches.

The searches (search.py) evaluate many candidate layers on the calibration inputs; they need the
values the runtime would compute, not packed tensors. The INT4 path here is a float-only
restatement of :func:`dcgen_quant.formats.int4.quantize_int4` followed by
:func:`~dcgen_quant.formats.int4.dequantize_int4` (same float32 operations in the same order,
without the int8 codes and packing), so it gives the identical values faster; NVFP4 reuses the
format's E2M1 rounding. tests/quantize/test_fakequant.py checks both against the formats bit for
bit.
"""

from __future__ import annotations

import torch

from ..formats import check_unsigned, get_format
from ..formats.int4 import int4_code_range
from ..formats.nvfp4 import E2M1_MAX, E2M1_VALUES, e2m1_magnitude_code, nvfp4_tensor_scale, to_e4m3


def _int4(
    x: torch.Tensor, group: int, scale_dtype: torch.dtype, unsigned: bool = False
) -> torch.Tensor:
    qmin, qmax = int4_code_range(unsigned)
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    scales = (g.abs().amax(dim=-1, keepdim=True) / qmax).to(scale_dtype).float()
    divisor = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.round(g / divisor).clamp_(qmin, qmax)
    return (codes * scales).reshape(x.shape)


def _nvfp4(x: torch.Tensor, group: int, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    ideal = g.abs().amax(dim=-1, keepdim=True) / E2M1_MAX
    if tensor_scale is not None:
        ideal = ideal / tensor_scale
    block = to_e4m3(ideal).float()
    divisor = block if tensor_scale is None else block * tensor_scale
    safe = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    scaled = torch.where(divisor > 0, g / safe, g * 0)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    mag = table[e2m1_magnitude_code(scaled.abs()).long()]
    values = torch.where(torch.signbit(scaled), -mag, mag) * block
    # dequantize_nvfp4 applies the tensor scale after the block scale: same order here
    if tensor_scale is not None:
        values = values * tensor_scale
    return values.reshape(x.shape)


def fake_quant_weight(w: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Weight ``w`` [N, K] -> its 4-bit dequantized value [N, K] float32.

    INT4 scales are rounded to ``dtype`` (the checkpoint's scale dtype); NVFP4 uses E4M3 block
    scales and the FP32 tensor scale, as :func:`dcgen_quant.formats.quantize_weight`.
    """
    spec = get_format(fmt)
    if spec.name == "int4":
        return _int4(w, spec.group_size, dtype)
    return _nvfp4(w, spec.group_size, nvfp4_tensor_scale(w))


def fake_quant_act(
    xs: torch.Tensor, fmt: str, dtype: torch.dtype, unsigned: bool = False
) -> torch.Tensor:
    """Smoothed activations ``xs`` [T, K] float32 -> 4-bit dequantized [T, K] float32.

    Per token and group, as the reference ``quantize_act`` on a ``dtype`` input: INT4 scales in
    ``dtype``, NVFP4 E4M3 block scales without a tensor scale. ``unsigned`` (INT4): codes 0..15
    (``xs`` is then the shifted, smoothed input ``(x + UNSIGNED_ACT_SHIFT) / smooth``).
    """
    spec = get_format(fmt)
    check_unsigned(fmt, unsigned)
    if spec.name == "int4":
        return _int4(xs, spec.group_size, dtype, unsigned)
    return _nvfp4(xs, spec.group_size, None)
