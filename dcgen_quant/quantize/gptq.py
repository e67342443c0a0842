"""GPTQ (Frantar et al. 2022) on the 4-bit residual, emitting the canonical formats.

GPTQ quantizes a weight one input column at a time and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian ``H = X^T X`` of the layer's
(smoothed) calibration inputs, so that ``||X (R - R_q)^T||`` rather than ``||R - R_q||`` is
minimized.

Here the group scales are fixed up front to exactly those of round-to-nearest
(:func:`dcgen_quant.formats.quantize_weight` on the residual, "static groups"): GPTQ only changes
which code each element gets. The result is therefore a valid canonical :class:`QuantizedWeight`
(INT4 codes -8..7 with 16-bit scales, or E2M1 codes with the same E4M3 block scales and FP32
tensor scale) that every backend reads without change.

With fewer calibration tokens T than input features K, ``X^T X`` has rank T and GPTQ fits the
calibration tokens at the expense of new ones (on a 1536-input layer calibrated on 512 tokens of
uncorrelated inputs its output error on fresh tokens is ~1.3x round-to-nearest's). So the
Hessian is shrunk toward its diagonal, ``(1 - s) H + s diag(H)``, with the Ledoit-Wolf intensity
``s`` estimated from the tokens (:func:`shrinkage`): for uncorrelated inputs ``s`` is ~1 and
GPTQ becomes round-to-nearest (a diagonal Hessian propagates no error), for inputs with strong
correlations that the tokens pin down ``s`` is small and GPTQ keeps its gain. The layer
quantizer then keeps GPTQ only where it lowers the error on held-out tokens.
"""

from __future__ import annotations

import warnings

import torch

from ..formats import QuantizedWeight, get_format, quantize_weight
from ..formats.int4 import pack_int4
from ..formats.nvfp4 import e2m1_decode, e2m1_encode, pack_nvfp4


def hessian(x: torch.Tensor, shrink: float = 0.0) -> torch.Tensor:
    """``H = 2 X^T X / T`` of calibration inputs ``x`` [T, K] -> [K, K] float64, shrunk toward
    its diagonal: ``(1 - shrink) H + shrink diag(H)``."""
    xd = x.double()
    h = xd.t() @ xd
    del xd
    h.mul_(2.0 / max(x.shape[0], 1))  # in place: one [K, K] float64 alive, not two
    if shrink > 0:
        diag = h.diagonal().clone()
        h.mul_(1.0 - shrink)
        h.diagonal().add_(shrink * diag)
    return h


def shrinkage(x: torch.Tensor) -> float:
    """Ledoit-Wolf intensity in [0, 1] for shrinking the second moments of ``x`` [T, K] toward
    their diagonal.

    In the channels' correlation scale (``z = x / rms(x)`` per channel, ``R = z^T z / T``), the
    estimate is ``sum_{i != j} Var(R_ij) / sum_{i != j} R_ij^2``: the sampling noise of the
    off-diagonal entries relative to their size (Schaefer and Strimmer 2005, target D), with
    ``Var(R_ij) = (sum_t z_ti^2 z_tj^2 - T R_ij^2) / (T (T - 1))``. 1 when T < 2 or no channel
    correlates with another.
    """
    t = x.shape[0]
    if t < 2:
        return 1.0
    # float32 products (an estimate needs no more), float64 sums
    rms = x.double().square().mean(dim=0).sqrt()
    z = (x.double() / torch.where(rms > 0, rms, torch.ones_like(rms))).float()

    def off_diagonal_sum(m: torch.Tensor) -> float:
        return float(m.sum() - m.diagonal().sum())

    # one [K, K] matrix at a time (each freed before the next is made): the working set stays
    # at two float64 [K, K] copies, which matters at FLUX.1's K = 12288 (1.2 GB a copy)
    r = (z.t() @ z).div_(t).double()
    r2 = off_diagonal_sum(r.square())
    del r
    if r2 <= 0:
        return 1.0
    z.square_()
    fourth = off_diagonal_sum((z.t() @ z).double())  # sum_t z_ti^2 z_tj^2
    var = (fourth - t * r2) / (t * (t - 1))
    return min(max(var / r2, 0.0), 1.0)


class CalibrationWarning(UserWarning):
    """The calibration set is too small for a step of the quantizer to be trusted."""


def fitted_hessian(x: torch.Tensor, shrink: float | None) -> tuple[torch.Tensor, float]:
    """GPTQ's Hessian [K, K] float64 from fitting tokens ``x`` [T, K] (smoothed, float32), shrunk
    by ``shrink`` (None: :func:`shrinkage` of ``x``), and the shrink used.

    Warns (:class:`CalibrationWarning`) when T < K: the Hessian then has rank T, GPTQ can only
    be trusted as far as the held-out tokens confirm it, and more calibration samples would
    let it do more.
    """
    t, k = x.shape
    if t < k:
        warnings.warn(
            f"GPTQ: {t} calibration tokens for {k} input features (fewer tokens than features): "
            "its Hessian is shrunk toward the diagonal and GPTQ is kept only where it lowers the "
            "error on held-out tokens; more calibration samples would let it help more",
            CalibrationWarning,
            stacklevel=3,
        )
    shrink = shrinkage(x) if shrink is None else shrink
    return hessian(x, shrink), shrink


def _divisors(qw: QuantizedWeight) -> torch.Tensor:
    """Per-element divisor [N, K/G] float32 that maps a weight value to its code domain."""
    scales = qw.wscales.t().float()
    if qw.wtscale is not None:
        scales = scales * qw.wtscale.float()
    return scales


def round_with_divisors(values: torch.Tensor, div: torch.Tensor, fmt: str):
    """Codes and dequantized values of ``values`` for divisors ``div`` (the scale times any tensor
    scale; broadcast against ``values``): a GPTQ column [N] with [N], or groups [N, K/G, G] with
    [N, K/G, 1].

    Same rounding as the formats (INT4: round half even, clamp to [-8, 7], zero scale -> 0;
    NVFP4: E2M1 round to nearest even with saturation, zero divisor -> signed zero).
    """
    if fmt == "int4":
        safe = torch.where(div == 0, torch.ones_like(div), div)
        codes = torch.round(values / safe).clamp_(-8, 7)
        return codes.to(torch.int8), codes * div
    safe = torch.where(div > 0, div, torch.ones_like(div))
    scaled = torch.where(div > 0, values / safe, values * 0)
    codes = e2m1_encode(scaled)
    return codes, e2m1_decode(codes) * div


def inverse_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """GPTQ's error-propagation matrix [K, K] float32: the upper Cholesky factor of
    ``(H + damp mean(diag H) I)^-1``, from a Hessian ``h`` [K, K] float64 that it **overwrites**
    (pass a copy to keep it; pass the only reference, as a call's result, to let it be freed
    early). Channels never active in calibration (zero diagonal) get a unit diagonal first.

    It depends on the Hessian alone, so the members of a group share one. Every intermediate is
    released as soon as the next exists: at most two float64 [K, K] matrices are alive at once
    (four float32 copies' worth; at FLUX.1's K = 12288, its MLP input, 0.6 GB a float32 copy).
    """
    k = h.shape[0]
    if h.dim() != 2 or h.shape[1] != k:
        raise ValueError(f"hessian must be square [K, K], got {tuple(h.shape)}")
    if damp <= 0:
        raise ValueError(f"damp must be > 0, got damp={damp}")
    if h.dtype != torch.float64:
        raise ValueError(f"hessian must be float64, got {h.dtype}")
    dead = torch.diag(h) == 0  # channels never active in calibration: nothing to compensate
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    factor = torch.linalg.cholesky(h)
    del h  # the caller's reference may keep it; this function no longer needs it
    inverse = torch.cholesky_inverse(factor)
    del factor
    upper = torch.linalg.cholesky(inverse, upper=True)
    del inverse
    return upper.float()


def gptq_quantize(
    residual: torch.Tensor,
    h: torch.Tensor | None,
    fmt: str,
    dtype: torch.dtype,
    damp: float = 0.01,
    block: int = 128,
    tensor_scale: torch.Tensor | None = None,
    hinv: torch.Tensor | None = None,
    scales: QuantizedWeight | None = None,
) -> QuantizedWeight:
    """GPTQ of ``residual`` [N, K] against Hessian ``h`` [K, K] into the canonical format.

    Parameters
    ----------
    residual : Tensor [N, K], float32
    h : Tensor [K, K], float64 (:func:`hessian` of the smoothed calibration inputs; not
        modified), or None when ``hinv`` is given
    fmt : "int4" | "nvfp4"
    dtype : INT4 scale dtype (the layer's 16-bit dtype)
    damp : float; ``damp * mean(diag(H))`` is added to the diagonal (reference 0.01)
    block : int; columns per lazy-update block (reference 128)
    tensor_scale : NVFP4 tensor scale to use instead of the residual's own (see
        :func:`dcgen_quant.formats.quantize_weight`)
    hinv : Tensor [K, K] float32, :func:`inverse_factor` of the damped Hessian, computed once
        for the members of a group (then ``h`` and ``damp`` are not used)
    scales : a QuantizedWeight of ``residual`` whose scales to round with (e.g. clipped ones,
        :mod:`.clip`); default: round-to-nearest's own

    Returns
    -------
    QuantizedWeight with qweight [N, K/2] uint8 and the scales of ``scales`` (default: the
    round-to-nearest scales of ``residual``).
    """
    spec = get_format(fmt)
    n, k = residual.shape
    given = hinv if hinv is not None else h
    if given is None or tuple(given.shape) != (k, k):
        shape = None if given is None else tuple(given.shape)
        raise ValueError(f"hessian must be [K, K]=[{k}, {k}], got {shape}")
    if damp <= 0 or block < 1:
        raise ValueError(f"damp must be > 0 and block >= 1, got damp={damp}, block={block}")
    rtn = scales if scales is not None else quantize_weight(residual, fmt, dtype, tensor_scale)
    div_groups = _divisors(rtn)  # [N, K/G]
    if hinv is None:
        # Upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i.
        hinv = inverse_factor(h.double().clone(), damp)

    w = residual.float().clone()
    code_dtype = torch.int8 if spec.name == "int4" else torch.uint8
    codes = torch.empty(n, k, dtype=code_dtype)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb = w[:, start:end].clone()
        errs = torch.empty_like(wb)
        hb = hinv[start:end, start:end]
        for j in range(end - start):
            col = start + j
            div = div_groups[:, col // spec.group_size]
            c, deq = round_with_divisors(wb[:, j], div, spec.name)
            codes[:, col] = c
            err = (wb[:, j] - deq) / hb[j, j]
            wb[:, j:] -= err.unsqueeze(1) * hb[j, j:].unsqueeze(0)
            errs[:, j] = err
        w[:, end:] -= errs @ hinv[start:end, end:]
    packed = pack_int4(codes) if spec.name == "int4" else pack_nvfp4(codes)
    return QuantizedWeight(packed, rtn.wscales, rtn.wtscale, fmt)
