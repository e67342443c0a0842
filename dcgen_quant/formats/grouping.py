"""Input checks and the [..., K] -> [..., K / G, G] view shared by every format."""

from __future__ import annotations

import torch


def split_groups(
    x: torch.Tensor, group_size: int, name: str = "x", check_finite: bool = True
) -> torch.Tensor:
    """Validate ``x`` and return it as float32 groups along the last dimension.

    Parameters
    ----------
    x : Tensor [..., K], floating point, finite
    group_size : int
        K must be a multiple of it.
    name : str
        How the caller calls ``x``; used in error messages.
    check_finite : bool
        Reject NaN/Inf (one extra pass; a device sync on GPU, so hot paths turn it off).

    Returns
    -------
    Tensor [..., K // group_size, group_size], float32
    """
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")
    k = x.shape[-1]
    if k == 0 or k % group_size:
        raise ValueError(
            f"{name}: K={k} (last dimension) must be a positive multiple of the group size "
            f"{group_size}"
        )
    xf = x.float()
    if check_finite and not bool(torch.isfinite(xf).all()):
        bad = (~torch.isfinite(xf)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); quantization needs finite input")
    return xf.reshape(*x.shape[:-1], k // group_size, group_size)
