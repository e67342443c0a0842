"""Per-input-channel smoothing: ``lambda_j = max|X_j|^alpha / max|W_j|^beta``.

Smoothing divides the activations by ``lambda`` and multiplies the weight columns by it, which
leaves ``x W^T`` unchanged but moves the outlier magnitude of a few activation channels into the
weight (where the low-rank branch can absorb it). The exponents are chosen per layer by a grid
search on the output error (search.py); this module only generates candidates and vectors.
"""

from __future__ import annotations

import torch

# A channel whose calibration inputs (or weight column) are all zero has max 0; clamp so that
# lambda stays finite and positive. Relative to the tensor's own max, so it is scale-free.
_FLOOR = 1e-5


def alpha_beta_candidates(grid: int, smooth: bool = True) -> list[tuple[float, float]]:
    """The (alpha, beta) pairs the search tries, the no-smoothing pair (0, 0) first.

    With ``grid`` points ``c_i = i / grid`` (i = 1 .. grid-1) the candidates are
    ``(0, 0)``, ``(c, 0)`` (activation-only smoothing) and ``(c, 1 - c)`` (SmoothQuant's balance):
    ``2 * (grid - 1) + 1`` pairs, 39 for the reference grid of 20 (REFERENCE.md section 2).

    Parameters
    ----------
    grid : int >= 1
    smooth : bool
        False returns only ``[(0.0, 0.0)]`` (no smoothing).
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    pairs = [(0.0, 0.0)]
    if not smooth:
        return pairs
    choices = [i / grid for i in range(1, grid)]
    pairs += [(c, 0.0) for c in choices]
    pairs += [(c, 1.0 - c) for c in choices]
    return pairs


def channel_absmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| over every dimension but the last: [..., K] -> [K] float32."""
    return t.detach().float().reshape(-1, t.shape[-1]).abs().amax(dim=0)


def smooth_factor(
    x_absmax: torch.Tensor,
    w_absmax: torch.Tensor,
    alpha: float,
    beta: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The smoothing vector for one (alpha, beta) pair, rounded to the layer's dtype.

    Parameters
    ----------
    x_absmax : Tensor [K], float32; per-channel max |x| over the calibration tokens
    w_absmax : Tensor [K], float32; per-column max |W| (over all fused members' rows)
    alpha, beta : float in [0, 1]
    dtype : the runtime dtype of ``smooth_factor``; the value is rounded to it here so that the
        search evaluates exactly what the runtime divides by.

    Returns
    -------
    Tensor [K], float32 holding ``dtype``-representable values; all ones for (0, 0).
    """
    k = x_absmax.shape[0]
    if alpha == 0 and beta == 0:
        return torch.ones(k, dtype=torch.float32, device=x_absmax.device)
    xa = x_absmax.float().clamp_min(_FLOOR * float(x_absmax.max().clamp_min(1e-30)))
    wa = w_absmax.float().clamp_min(_FLOOR * float(w_absmax.max().clamp_min(1e-30)))
    lam = xa.pow(alpha) / wa.pow(beta)
    # A common factor on lambda cancels (per-group scales absorb it); center it on 1 in log scale
    # so that the 16-bit smooth_factor, x / lambda and W * lambda stay well inside their ranges.
    lam = lam / torch.sqrt(lam.max() * lam.min())
    return lam.to(dtype).float()
