"""Rank-r factors of the smoothed weight: randomized range finder or full SVD.

The low-rank branch is ``W_hat ~= L1 @ L2`` with ``L1`` [N, r] and ``L2`` [r, K]. SVDQuant needs
only the top r singular triplets, so by default a randomized range finder (Halko, Martinsson and
Tropp 2011) with power iterations computes them from a few matmuls with [K, r + p] and [N, r + p]
blocks instead of a full SVD of the whole matrix; ``method="full"`` calls ``torch.linalg.svd``
for comparison (bench/quantizer_speed.py measures both).

:func:`lowrank_factors` approximates a weight in the Frobenius norm (DeepCompressor's branch).
:func:`output_factors` approximates it in the norm of the layer's *output* on calibration
activations ``X``: ``min ||X (A - L)^T||`` over rank-r ``L``, whose solution is
``L = SVD_r(A C) C^-1`` for any ``C`` with ``C C^T = X^T X`` (:func:`activation_whitener`).
The Gram is shrunk toward its diagonal: the pure output norm ignores directions the activations
never take, and a branch that leaves large weights there gives the 4-bit residual large group
scales (and errors) in every direction.
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
    right: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``a`` (or of ``a @ right``) by a seeded randomized
    range finder.

    Parameters
    ----------
    a : Tensor [N, K], float32
    rank : int, 1 <= rank <= min(N, K)
    generator : torch.Generator on a's device (makes the result reproducible)
    oversample, power_iters : default :data:`OVERSAMPLE`, :data:`POWER_ITERS`
    right : Tensor [K, K] float32, optional; the triplets are those of ``a @ right``, computed
        from products with [K, r + p] blocks (``a @ right`` itself, N*K*K flops, is never formed)

    Returns
    -------
    u : Tensor [N, rank] float32; s : Tensor [rank] float32; vh : Tensor [rank, K] float32
    """
    oversample = OVERSAMPLE if oversample is None else oversample
    power_iters = POWER_ITERS if power_iters is None else power_iters
    n, k = a.shape
    width = min(rank + oversample, n, k)

    def mul(m):  # (a @ right) @ m
        return a @ (m if right is None else right @ m)

    def mul_t(m):  # (a @ right)^T @ m
        return a.t() @ m if right is None else right.t() @ (a.t() @ m)

    omega = torch.randn(k, width, generator=generator, device=a.device, dtype=a.dtype)
    q = _orthonormal(mul(omega))  # [N, width]: an orthonormal basis of the dominant range
    for _ in range(power_iters):
        q = _orthonormal(mul(_orthonormal(mul_t(q))))
    b = q.t() @ a if right is None else mul_t(q).t()
    b = b.double()  # [width, K]: small, so its SVD is cheap; float64 keeps it exact
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


def activation_whitener(x: torch.Tensor, shrink: float) -> torch.Tensor:
    """Lower Cholesky factor ``C`` [K, K] float64 of the shrunk activation Gram of ``x`` [T, K].

    ``C C^T = (1 - shrink) G + shrink diag(G) + eps I`` with ``G = x^T x / T``; ``eps`` (1e-6 of
    the mean diagonal) keeps it positive definite when T < K or a channel is never active.
    """
    xd = x.double()
    g = (xd.t() @ xd) / max(x.shape[0], 1)
    diag = g.diagonal().clone()
    g.mul_(1.0 - shrink)
    g.diagonal().add_(shrink * diag + 1e-6 * max(float(diag.mean()), 1e-30))
    return torch.linalg.cholesky(g)


def output_factors(
    target: torch.Tensor,
    whitener: torch.Tensor,
    rank: int,
    dtype: torch.dtype,
    method: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runtime factors of the rank-r ``L`` minimizing ``||(target - L) C||_F``.

    With ``C`` from :func:`activation_whitener` of the *unsmoothed* activations this is the
    layer's output error ``||X (target - L)^T||``; ``target`` and ``L`` act on the unsmoothed x
    (a smoothed-space target ``T_hat`` enters as ``T_hat / smooth``), so ``proj_down`` comes out
    directly: ``x @ proj_down @ proj_up^T = x L^T``. The factors are balanced (equal norms per
    component) to stay in range in 16 bits.

    Parameters
    ----------
    target : Tensor [N, K], float32
    whitener : Tensor [K, K], float64 lower triangular
    rank : int >= 1
    dtype : storage dtype of the factors; they are rounded to it here
    method : "randomized" | "full"
    generator : torch.Generator for the randomized method

    Returns
    -------
    proj_down : Tensor [K, r] float32 (dtype-representable)
    proj_up : Tensor [N, r] float32 (dtype-representable)
    """
    c = whitener.to(target.dtype)
    rank = min(rank, *target.shape)
    if method == "randomized":
        u, s, vh = randomized_svd(target, rank, generator, right=c)
    else:
        u, s, vh = full_svd(target @ c, rank)
    # L = u diag(s) vh C^-1: the right factor is C^-T vh^T [K, r]
    v = torch.linalg.solve_triangular(whitener.t(), vh.t().double(), upper=True).to(target.dtype)
    norm = v.norm(dim=0).clamp_min(1e-30)
    root = (s.clamp_min(0) * norm).sqrt()
    proj_up = (u * root).to(dtype).float()
    proj_down = (v * (s.clamp_min(0) / root.clamp_min(1e-30))).to(dtype).float()
    return proj_down, proj_up
