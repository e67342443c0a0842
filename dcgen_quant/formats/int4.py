"""INT4: signed symmetric 4-bit integers with one scale per group of 64 along K.

Bit-exact contract (kernels must reproduce it):

1. ``amax = max |x|`` over the group, in float32;
2. ``scale = (amax / 7)`` in float32 (correctly rounded division), then cast with
   round-to-nearest-even to the scale dtype (the model's 16-bit dtype);
3. ``code = clamp(round_half_even(x / float(scale)), -8, 7)`` with a correctly rounded float32
   division; a zero scale gives code 0.

The unsigned variant (non-negative inputs) uses ``amax / 15`` and codes 0..15. Activations
quantized unsigned (``quantize_act(..., act_unsigned=True)``, for layers that read a GELU
output) are first shifted by :data:`UNSIGNED_ACT_SHIFT`: ``u = (x + 0.171875) / smooth`` in
float32, then steps 1-3 with 15 and [0, 15]. GELU's minimum is -0.16997 (erf and tanh forms), so
``u >= 0`` and all 16 codes cover the values that occur, where signed codes would spend -8..-1 on
[-0.17, 0). The layer's bias absorbs the shift (docs/FORMAT.md).
"""

from __future__ import annotations

import torch

from .grouping import split_groups
from .packing import nibbles_to_int4, pack_nibbles, unpack_nibbles

INT4_GROUP_SIZE = 64
UNSIGNED_ACT_SHIFT = 0.171875  # 11/64, exact in every float type; >= -min GELU = 0.16997


def int4_code_range(unsigned: bool = False) -> tuple[float, float]:
    """(lowest, highest) INT4 code: (-8, 7) signed, (0, 15) unsigned; scale = amax / highest."""
    return (0.0, 15.0) if unsigned else (-8.0, 7.0)


def quantize_int4(
    x: torch.Tensor,
    group_size: int = INT4_GROUP_SIZE,
    scale_dtype: torch.dtype | None = None,
    unsigned: bool = False,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dimension to INT4 codes and per-group scales.

    Parameters
    ----------
    x : Tensor [..., K], floating point; K a multiple of ``group_size``
    group_size : int
    scale_dtype : torch.dtype, optional
        dtype of the returned scales; defaults to ``x.dtype``.
    unsigned : bool
        Codes 0..15 with ``scale = amax / 15`` (x must be non-negative; negatives clamp to 0).
    check_finite : bool
        Reject NaN/Inf input.

    Returns
    -------
    codes : Tensor [..., K], int8 (-8..7) or uint8 (0..15 when unsigned)
    scales : Tensor [..., K // group_size], ``scale_dtype``
    """
    groups = split_groups(x, group_size, "x", check_finite)
    scale_dtype = scale_dtype or x.dtype
    qmin, qmax = int4_code_range(unsigned)
    amax = groups.abs().amax(dim=-1)
    scales = (amax / qmax).to(scale_dtype)
    divisor = scales.float()
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    codes = torch.round(groups / divisor.unsqueeze(-1)).clamp_(qmin, qmax)
    codes = codes.to(torch.uint8 if unsigned else torch.int8).reshape(x.shape)
    return codes, scales


def dequantize_int4(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`.

    Parameters
    ----------
    codes : Tensor [..., K], int8 or uint8
    scales : Tensor [..., K // group_size]

    Returns
    -------
    Tensor [..., K], float32; exact (a 4-bit integer times a 16-bit scale fits in float32).
    """
    k = codes.shape[-1]
    if scales.shape[-1] * group_size != k:
        raise ValueError(
            f"scales has {scales.shape[-1]} groups but codes has K={k} (group size {group_size})"
        )
    grouped = codes.float().reshape(*codes.shape[:-1], k // group_size, group_size)
    return (grouped * scales.float().unsqueeze(-1)).reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] int8/uint8 codes -> [..., K // 2] uint8 (canonical layout, see packing.py)."""
    return pack_nibbles(codes)


def unpack_int4(packed: torch.Tensor, unsigned: bool = False) -> torch.Tensor:
    """[..., K // 2] uint8 -> [..., K] int8 (-8..7), or uint8 (0..15) when ``unsigned``."""
    nibbles = unpack_nibbles(packed)
    return nibbles if unsigned else nibbles_to_int4(nibbles)
