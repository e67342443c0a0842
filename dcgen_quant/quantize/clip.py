"""Clipped weight scales: each group's scale from a fraction of its largest magnitude.

Round-to-nearest gives a group of the residual the scale ``amax / 7`` (INT4) or ``amax / 6``
(NVFP4, before the E4M3 rounding): no value is clipped, but the step is as coarse as the group's
largest value makes it. A smaller scale ``c * amax / q_max`` rounds every other value more
finely and saturates the few largest; the best ``c`` per group is the one that minimizes the
group's error weighted by what the layer's output feels of it,
``sum_k d_k (w_k - q_k)^2`` with ``d_k`` the mean square of input channel k on the fitting
tokens (the diagonal of the layer's Hessian). The stored scale is an ordinary scale of the
format: the kernels and Nunchaku's loader read it like any other.

:func:`clip_factors` searches ``c`` on :data:`CLIP_GRID` per (row, group);
:func:`quantize_clipped` quantizes with the chosen factors. The quantizer tries the clipped
residual as one more candidate and keeps it only where the held-out output error falls
(``QuantConfig.clip``, docs/QUANTIZE.md).
"""

from __future__ import annotations

import torch

from ..formats import QuantizedWeight, get_format
from ..formats.int4 import pack_int4
from ..formats.nvfp4 import E2M1_MAX, nvfp4_tensor_scale, pack_nvfp4, to_e4m3
from .gptq import round_with_divisors

CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5


def _divisors(amax: torch.Tensor, fmt: str, dtype: torch.dtype, s_t: torch.Tensor | None):
    """(stored scales [N, K/G], float32 divisors [N, K/G]) of group maxima ``amax``."""
    if fmt == "int4":
        scales = (amax / 7.0).to(dtype)
        return scales, scales.float()
    scales = to_e4m3(amax / E2M1_MAX / s_t)
    return scales, scales.float() * s_t


def _groups(w: torch.Tensor, fmt: str) -> torch.Tensor:
    n, k = w.shape
    g = get_format(fmt).group_size
    if k % g:
        raise ValueError(f"weight [N, K]=[{n}, {k}]: K must be a multiple of {g} for {fmt}")
    return w.float().reshape(n, k // g, g)


def clip_factors(
    w: torch.Tensor,
    d: torch.Tensor,
    fmt: str,
    dtype: torch.dtype,
    tensor_scale: torch.Tensor | None = None,
    grid: tuple[float, ...] = CLIP_GRID,
) -> torch.Tensor:
    """Per (row, group) factor ``c`` of ``grid`` [N, K/G] float32 minimizing
    ``sum_k d_k (w_k - q_k)^2`` over the group, for a weight ``w`` [N, K] and channel weights
    ``d`` [K] (non-negative). Ties keep the larger factor, so ``c = 1`` (round-to-nearest's own
    scale) wherever clipping gains nothing. NVFP4 uses ``tensor_scale`` (default: ``w``'s own).
    """
    groups = _groups(w, fmt)
    _, ng, g = groups.shape
    if d.shape != (ng * g,):
        raise ValueError(f"channel weights must be [K]=[{ng * g}], got {tuple(d.shape)}")
    s_t = None
    if fmt == "nvfp4":
        s_t = _tensor_scale(w, tensor_scale)
    dg = d.float().reshape(ng, g)
    amax = groups.abs().amax(dim=-1)
    best = torch.full_like(amax, float("inf"))
    factor = torch.ones_like(amax)
    for c in sorted(grid, reverse=True):
        _, div = _divisors(amax * c, fmt, dtype, s_t)
        _, deq = round_with_divisors(groups, div.unsqueeze(-1), fmt)
        err = ((groups - deq).square_() * dg).sum(dim=-1)
        better = err < best
        best = torch.where(better, err, best)
        factor = torch.where(better, torch.full_like(factor, c), factor)
    return factor


def _tensor_scale(w: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """NVFP4: the given shared tensor scale as float32 [], else ``w``'s own."""
    if tensor_scale is None:
        return nvfp4_tensor_scale(w)
    return tensor_scale.to(dtype=torch.float32, device=w.device).reshape(())


def quantize_clipped(
    w: torch.Tensor,
    factors: torch.Tensor,
    fmt: str,
    dtype: torch.dtype,
    tensor_scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """``w`` [N, K] in the canonical packed layout with the group scales of ``factors`` [N, K/G]
    times the group maxima; with every factor 1 it equals
    :func:`dcgen_quant.formats.quantize_weight` bit for bit."""
    groups = _groups(w, fmt)
    if factors.shape != groups.shape[:2]:
        raise ValueError(f"factors must be {tuple(groups.shape[:2])}, got {tuple(factors.shape)}")
    s_t = _tensor_scale(w, tensor_scale) if fmt == "nvfp4" else None
    amax = groups.abs().amax(dim=-1) * factors.float()
    scales, div = _divisors(amax, fmt, dtype, s_t)
    codes, _ = round_with_divisors(groups, div.unsqueeze(-1), fmt)
    codes = codes.reshape(w.shape)
    packed = pack_int4(codes) if fmt == "int4" else pack_nvfp4(codes)
    return QuantizedWeight(packed, scales.t().contiguous(), s_t, fmt)
