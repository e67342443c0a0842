"""The accuracy rule for GEMM and attention kernels, written once.

flash-attention's rule: a kernel's error against a float64 computation may be at most twice the
error of a baseline computation in the output precision (plus a tiny eps for exact cases).
Errors are max-abs over all elements, in float64.
"""

from __future__ import annotations

import torch


def max_abs_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """max |x - truth| in float64 (NaN, e.g. an unwritten poisoned element, gives inf)."""
    err = (x.double() - truth.double()).abs()
    return float("inf") if bool(err.isnan().any()) else err.max().item()


def assert_within_reference_error(
    out: torch.Tensor,
    baseline: torch.Tensor,
    truth: torch.Tensor,
    what: str,
    factor: float = 2.0,
    rel_eps: float = 1e-6,
) -> tuple[float, float]:
    """Assert ``err(out) <= factor * err(baseline) + eps``, both errors against ``truth``.

    Parameters
    ----------
    out : Tensor, the kernel's result (any dtype)
    baseline : Tensor, the same computation by the pure-torch reference in the output precision
    truth : Tensor, float64 result of the exact computation
    what : str, names the case in the failure message
    rel_eps : eps as a fraction of max |truth| (covers cases where the baseline is exact)

    Returns
    -------
    (kernel error, baseline error)
    """
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    err = max_abs_error(out, truth)
    base = max_abs_error(baseline, truth)
    eps = rel_eps * truth.double().abs().max().item()
    assert err <= factor * base + eps, (
        f"{what}: kernel error {err:.3e} > {factor} x reference error {base:.3e} + {eps:.1e}"
    )
    return err, base
