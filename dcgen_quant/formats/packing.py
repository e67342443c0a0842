"""Two 4-bit codes per byte: the canonical layout that references and checkpoints use.

Element ``2i`` of a row goes to the low nibble of byte ``i``, element ``2i+1`` to the high
nibble; rows stay row-major, so a ``[rows, K]`` code matrix packs to ``[rows, K // 2]`` uint8.
Kernels that want another order re-layout once at load time (docs/KERNELS.md).
"""

from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte.

    Parameters
    ----------
    codes : Tensor [..., K], int8 or uint8
        Only the low 4 bits of each element are kept (two's complement for signed INT4, the raw
        E2M1 bit pattern for NVFP4). K must be even.

    Returns
    -------
    Tensor [..., K // 2], uint8
    """
    if codes.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"pack_nibbles: codes must be int8 or uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: last dimension must be even, got {codes.shape[-1]}")
    nibbles = codes.view(torch.uint8) & 0x0F
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`.

    Parameters
    ----------
    packed : Tensor [..., K // 2], uint8

    Returns
    -------
    Tensor [..., K], uint8 with values 0..15 (the raw nibbles).
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_nibbles: packed must be uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def nibbles_to_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Sign-extend raw nibbles (uint8 0..15) to signed INT4 values (int8 -8..7)."""
    return ((nibbles.to(torch.int16) ^ 8) - 8).to(torch.int8)
