"""Rank-r factors of the smoothed weight: randomized range finder or full SVD.

The low-rank branch is ``W_hat ~= L1 @ L2`` with ``L1`` [N, r] and ``L2`` [r, K]. SVDQuant needs
only the top r singular triplets, so by default a randomized range finder (Halko, Martinsson and
Tropp 2011) with power iterations computes them from a few matmuls with [K, r + p] and [N, r + p]
blocks instead of a full SVD of the whole matrix; ``method="full"`` calls ``torch.linalg.svd``
for comparison (bench/quantizer_speed.py measures both).
"""

from __future__ import annotations

import torch

OVERSAMPLE = 16
"""Extra columns of the random sketch beyond the rank (accuracy of the top-r subspace)."""
POWER_ITERS = 4
"""Power iterations of the range finder (sharpen a slowly decaying spectrum)."""


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    oversample: int | None = None,
    power_iters: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``a`` by a seeded randomized range finder.

    Parameters
    ----------
    a : Tensor [N, K], float32
    rank : int, 1 <= rank <= min(N, K)
    generator : torch.Generator on a's device (makes the result reproducible)
    oversample, power_iters : default :data:`OVERSAMPLE`, :data:`POWER_ITERS`

    Returns
    -------
    u : Tensor [N, rank] float32; s : Tensor [rank] float32; vh : Tensor [rank, K] float32
    """
    oversample = OVERSAMPLE if oversample is None else oversample
    power_iters = POWER_ITERS if power_iters is None else power_iters
    n, k = a.shape
    width = min(rank + oversample, n, k)
    omega = torch.randn(k, width, generator=generator, device=a.device, dtype=a.dtype)
    q = _orthonormal(a @ omega)  # [N, width]: an orthonormal basis of a's dominant range
    for _ in range(power_iters):
        q = _orthonormal(a @ _orthonormal(a.t() @ q))
    b = (q.t() @ a).double()  # [width, K]: small, so its SVD is cheap; float64 keeps it exact
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub[:, :rank].to(a.dtype)
    return u, s[:rank].to(a.dtype), vh[:rank].to(a.dtype)


def full_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``a`` [N, K] from ``torch.linalg.svd`` (float32)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def top_singular(
    a: torch.Tensor, rank: int, method: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch on ``method`` ("randomized" or "full"); see :func:`randomized_svd`."""
    rank = min(rank, *a.shape)
    if method == "randomized":
        return randomized_svd(a, rank, generator)
    if method == "full":
        return full_svd(a, rank)
    raise ValueError(f"svd method must be 'randomized' or 'full', got {method!r}")


def lowrank_factors(
    target: torch.Tensor,
    smooth: torch.Tensor,
    rank: int,
    dtype: torch.dtype,
    method: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runtime factors of the rank-r approximation of ``target`` (a smoothed weight).

    The runtime computes the branch from the *unsmoothed* x: ``(x @ proj_down) @ proj_up^T`` with
    ``proj_down = diag(1 / smooth) @ L2^T``, so that ``x @ proj_down = (x / smooth) @ L2^T``. The
    singular values are split evenly (``sqrt(s)`` on each side) to keep both factors in the same
    range in 16 bits.

    Parameters
    ----------
    target : Tensor [N, K], float32; what the branch should approximate (in smoothed space)
    smooth : Tensor [K], float32; the smoothing vector (dtype-representable values)
    rank : int >= 1
    dtype : storage dtype of the factors; they are rounded to it here
    method : "randomized" | "full"
    generator : torch.Generator for the randomized method

    Returns
    -------
    proj_down : Tensor [K, r] float32 (dtype-representable)
    proj_up : Tensor [N, r] float32 (dtype-representable)
    """
    u, s, vh = top_singular(target, rank, method, generator)
    root = s.clamp_min(0).sqrt()
    proj_up = (u * root).to(dtype).float()
    proj_down = (vh.t() * root / smooth.unsqueeze(1)).to(dtype).float()
    return proj_down, proj_up


def lowrank_weight(proj_down: torch.Tensor, proj_up: torch.Tensor, smooth: torch.Tensor):
    """The smoothed-space weight the branch realises: ``proj_up @ (diag(smooth) proj_down)^T``.

    Returns Tensor [N, K] float32. ``W_hat`` minus this is the residual to quantize, which makes
    the 16-bit rounding of the factors part of what the 4-bit residual compensates.
    """
    return proj_up @ (proj_down * smooth.unsqueeze(1)).t()
