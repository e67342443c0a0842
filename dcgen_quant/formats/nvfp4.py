"""NVFP4: E2M1 4-bit floats, one FP8 E4M3 scale per group of 16 along K, and for weights one
FP32 per-tensor scale.

E2M1 codes: bit 3 is the sign, bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.

Bit-exact contract (kernels must reproduce it; all arithmetic float32, correctly rounded):

Weights (``tensor_scale=True``)
    ``s_t = amax(|W|) / 2688`` (2688 = 6 * 448; ``s_t = 1`` for an all-zero tensor);
    ``bs = e4m3(min((amax_block / 6) / s_t, 448))``;
    ``v = x / (float(bs) * s_t)``.
Activations (``tensor_scale=False``)
    ``bs = e4m3(min(amax_block / 6, 448))``; ``v = x / float(bs)``.

``e4m3`` is round-to-nearest-even into float8_e4m3fn (subnormals included). Where the divisor
is zero, ``v = x * 0``. The code of ``v`` is its sign bit (``signbit``, so -0.0 and negatives that
round to zero give code 8) plus the E2M1 magnitude rounded to nearest, ties to the even code,
saturating at 6.
"""

from __future__ import annotations

import torch

from .grouping import split_groups
from .packing import pack_nibbles, unpack_nibbles

NVFP4_GROUP_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Rounding boundaries between consecutive E2M1 magnitudes. A value exactly on a boundary goes to
# the even code: boundaries whose lower neighbour has an even code use ">", odd use ">=".
_BOUNDARIES_UP_FROM_EVEN = (0.25, 1.25, 2.5, 5.0)  # between codes 0|1, 2|3, 4|5, 6|7
_BOUNDARIES_UP_FROM_ODD = (0.75, 1.75, 3.5)  # between codes 1|2, 3|4, 5|6


def e2m1_magnitude_code(a: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 magnitudes to E2M1 codes 0..7 (RNE, saturating).

    Parameters
    ----------
    a : Tensor [...], float32, >= 0

    Returns
    -------
    Tensor [...], uint8 in 0..7
    """
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for b in _BOUNDARIES_UP_FROM_EVEN:
        code += (a > b).to(torch.uint8)
    for b in _BOUNDARIES_UP_FROM_ODD:
        code += (a >= b).to(torch.uint8)
    return code


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """float32 values (already divided by their scales) -> E2M1 codes 0..15, uint8."""
    sign = torch.signbit(v).to(torch.uint8) << 3
    return sign | e2m1_magnitude_code(v.abs())


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) -> float32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 >= 0 -> float8_e4m3fn, round to nearest even, saturating at 448."""
    return x.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """The FP32 per-tensor scale of a weight: ``amax / (6 * 448)``, or 1 for all zeros."""
    amax = x.float().abs().amax()
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def quantize_nvfp4(
    x: torch.Tensor,
    group_size: int = NVFP4_GROUP_SIZE,
    tensor_scale: bool | torch.Tensor = False,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize along the last dimension to E2M1 codes with E4M3 block scales.

    Parameters
    ----------
    x : Tensor [..., K], floating point; K a multiple of ``group_size``
    group_size : int
    tensor_scale : bool or Tensor []
        False: activations (block scales only). True: weights; the FP32 tensor scale is computed
        from ``x``. A float32 scalar tensor: use that tensor scale.
    check_finite : bool
        Reject NaN/Inf input.

    Returns
    -------
    codes : Tensor [..., K], uint8 0..15
    block_scales : Tensor [..., K // group_size], float8_e4m3fn
    tensor_scale : Tensor [] float32, or None for activations
    """
    groups = split_groups(x, group_size, "x", check_finite)
    amax = groups.abs().amax(dim=-1)
    if isinstance(tensor_scale, torch.Tensor):
        s_t = tensor_scale.to(device=x.device, dtype=torch.float32).reshape(())
        if not bool(s_t > 0):
            raise ValueError(f"tensor_scale must be positive, got {s_t.item()}")
    elif tensor_scale:
        s_t = nvfp4_tensor_scale(x)
    else:
        s_t = None
    ideal = amax / E2M1_MAX
    if s_t is not None:
        ideal = ideal / s_t
    block_scales = to_e4m3(ideal)
    divisor = block_scales.float()
    if s_t is not None:
        divisor = divisor * s_t
    divisor = divisor.unsqueeze(-1)
    safe = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    scaled = torch.where(divisor > 0, groups / safe, groups * 0)
    codes = e2m1_encode(scaled).reshape(x.shape)
    return codes, block_scales, s_t


def dequantize_nvfp4(
    codes: torch.Tensor,
    block_scales: torch.Tensor,
    tensor_scale: torch.Tensor | None = None,
    group_size: int = NVFP4_GROUP_SIZE,
) -> torch.Tensor:
    """Inverse of :func:`quantize_nvfp4`.

    Parameters
    ----------
    codes : Tensor [..., K], uint8 0..15
    block_scales : Tensor [..., K // group_size], float8_e4m3fn (or any float dtype)
    tensor_scale : Tensor [] float32, optional

    Returns
    -------
    Tensor [..., K], float32. Without a tensor scale the result is exact (E2M1 times E4M3 fits
    in float32); with one, a single float32 rounding per element.
    """
    k = codes.shape[-1]
    if block_scales.shape[-1] * group_size != k:
        raise ValueError(
            f"block_scales has {block_scales.shape[-1]} groups but codes has K={k} "
            f"(group size {group_size})"
        )
    values = e2m1_decode(codes).reshape(*codes.shape[:-1], k // group_size, group_size)
    out = (values * block_scales.float().unsqueeze(-1)).reshape(codes.shape)
    if tensor_scale is not None:
        out = out * tensor_scale.float()
    return out


def pack_nvfp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] uint8 E2M1 codes -> [..., K // 2] uint8 (canonical layout, see packing.py)."""
    return pack_nibbles(codes)


def unpack_nvfp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K // 2] uint8 -> [..., K] uint8 E2M1 codes 0..15."""
    return unpack_nibbles(packed)
