"""4-bit formats: pure-torch reference quantize / dequantize / pack / unpack.

Everything here runs on CPU (and on any device torch supports) and is the ground truth that
kernels must match bit for bit. Two layers:

* per-format primitives in :mod:`.int4` and :mod:`.nvfp4` (codes + scales along the last dim);
* the canonical packed tensors that ops and checkpoints exchange, in this module:

  ============  ===========================  ==========================================
  tensor        shape                        dtype
  ============  ===========================  ==========================================
  qweight       [N, K/2]                     uint8 (two codes per byte, low nibble first)
  wscales       [K/G, N]                     model 16-bit dtype (INT4) / float8_e4m3fn
  wtscale       []                           float32 (NVFP4 only)
  q (acts)      [M, K/2]                     uint8
  scales (acts) [M, K/G]                     x.dtype (INT4) / float8_e4m3fn (NVFP4)
  ============  ===========================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .int4 import (
    INT4_GROUP_SIZE,
    UNSIGNED_ACT_SHIFT,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from .nvfp4 import (
    NVFP4_GROUP_SIZE,
    dequantize_nvfp4,
    pack_nvfp4,
    quantize_nvfp4,
    unpack_nvfp4,
)

__all__ = [
    "FORMATS",
    "FormatSpec",
    "UNSIGNED_ACT_SHIFT",
    "QuantizedWeight",
    "get_format",
    "quantize_weight",
    "dequantize_weight",
    "quantize_activation",
    "dequantize_activation",
    "quantize_int4",
    "dequantize_int4",
    "pack_int4",
    "unpack_int4",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "pack_nvfp4",
    "unpack_nvfp4",
]


@dataclass(frozen=True)
class FormatSpec:
    """What a 4-bit format is: its name, group size along K and scale conventions."""

    name: str
    group_size: int
    has_tensor_scale: bool  # weights carry one FP32 per-tensor scale

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """dtype of the block scales for a model running in ``model_dtype``."""
        return torch.float8_e4m3fn if self.name == "nvfp4" else model_dtype


FORMATS: dict[str, FormatSpec] = {
    "int4": FormatSpec("int4", INT4_GROUP_SIZE, has_tensor_scale=False),
    "nvfp4": FormatSpec("nvfp4", NVFP4_GROUP_SIZE, has_tensor_scale=True),
}


def get_format(name: str) -> FormatSpec:
    """Look up a format by name; unknown names raise ``ValueError`` naming the choices."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unsupported format {name!r}; expected one of {', '.join(sorted(FORMATS))}"
        ) from None


@dataclass
class QuantizedWeight:
    """A weight in the canonical packed layout (see the module docstring)."""

    qweight: torch.Tensor  # [N, K/2] uint8
    wscales: torch.Tensor  # [K/G, N]
    wtscale: torch.Tensor | None  # [] float32, NVFP4 only
    fmt: str


def quantize_weight(
    w: torch.Tensor,
    fmt: str,
    scale_dtype: torch.dtype | None = None,
    tensor_scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a weight ``w`` [N, K] (groups along K) into the canonical packed layout.

    ``scale_dtype`` is the model's 16-bit dtype for INT4 scales (default ``w.dtype``); NVFP4
    scales are always float8_e4m3fn. ``tensor_scale`` (NVFP4 only, float32 []) replaces the
    tensor scale computed from ``w``: layers that are concatenated at run time
    (:mod:`dcgen_quant.fusion`) must share one.
    """
    spec = get_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if spec.name == "int4":
        codes, scales = quantize_int4(w, spec.group_size, scale_dtype or w.dtype)
        return QuantizedWeight(pack_int4(codes), scales.t().contiguous(), None, fmt)
    if tensor_scale is not None and spec.name != "nvfp4":
        raise ValueError(f"tensor_scale: {fmt} weights have no tensor scale")
    ts = True if tensor_scale is None else tensor_scale
    codes, scales, s_t = quantize_nvfp4(w, spec.group_size, tensor_scale=ts)
    return QuantizedWeight(pack_nvfp4(codes), scales.t().contiguous(), s_t, fmt)


def dequantize_weight(qw: QuantizedWeight, apply_tensor_scale: bool = True) -> torch.Tensor:
    """Canonical packed weight -> float32 [N, K].

    With ``apply_tensor_scale=False`` the NVFP4 result is exact (block scales only), which the
    GEMM reference uses and then scales its output by ``wtscale`` instead.
    """
    spec = get_format(qw.fmt)
    scales = qw.wscales.t()
    if spec.name == "int4":
        return dequantize_int4(unpack_int4(qw.qweight), scales, spec.group_size)
    s_t = qw.wtscale if apply_tensor_scale else None
    return dequantize_nvfp4(unpack_nvfp4(qw.qweight), scales, s_t, spec.group_size)


def check_unsigned(fmt: str, unsigned: bool) -> None:
    """Unsigned activation codes exist for INT4 only; ValueError otherwise."""
    if unsigned and get_format(fmt).name != "int4":
        raise ValueError(f"act_unsigned=True: unsigned activations exist for int4 only, not {fmt}")


def quantize_activation(
    x: torch.Tensor,
    fmt: str,
    check_finite: bool = True,
    unsigned: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-group quantization of activations ``x`` [M, K].

    Returns ``q`` [M, K/2] uint8 and ``scales`` [M, K/G] (``scale_dtype``, default ``x.dtype``,
    for INT4; float8_e4m3fn for NVFP4). ``unsigned`` (INT4 only): codes 0..15 of non-negative x
    (the caller applies any shift).
    """
    spec = get_format(fmt)
    check_unsigned(fmt, unsigned)
    if spec.name == "int4":
        codes, scales = quantize_int4(
            x, spec.group_size, scale_dtype or x.dtype, unsigned, check_finite
        )
        return pack_int4(codes), scales
    codes, scales, _ = quantize_nvfp4(x, spec.group_size, False, check_finite=check_finite)
    return pack_nvfp4(codes), scales


def dequantize_activation(
    q: torch.Tensor, scales: torch.Tensor, fmt: str, unsigned: bool = False
) -> torch.Tensor:
    """Inverse of :func:`quantize_activation`: float32 [M, K], exact."""
    spec = get_format(fmt)
    check_unsigned(fmt, unsigned)
    if spec.name == "int4":
        return dequantize_int4(unpack_int4(q, unsigned), scales, spec.group_size)
    return dequantize_nvfp4(unpack_nvfp4(q), scales, None, spec.group_size)
