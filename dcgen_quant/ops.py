"""The torch custom ops of dcgen_quant: one source of truth per op.

Each op (namespace ``dcgen_quant``) has here its signature, argument checks, fake impl (shapes
only, for torch.compile and the meta device), pure-torch reference impl (what runs on CPU, and
the ground truth for kernels), and the dispatch to a backend on CUDA tensors:

``cuda``       csrc/ through the pybind11 module (:mod:`dcgen_quant.cuda_backend`);
``triton``     dcgen_quant/kernels/ (:mod:`dcgen_quant.kernels`);
``reference``  the pure-torch impl below, on any device.

Select with ``DCGEN_QUANT_BACKEND`` or :func:`set_backend`; ``auto`` (default) takes the first
of cuda, triton, reference that is available and supports the call. A backend module exposes
``unavailable_reason() -> str | None`` and a function per op with the op's signature; a function
that cannot serve a particular call (format, dtype, GPU) raises :class:`BackendUnsupported`.

Shapes (M tokens, K input features, N output features, r rank, G group size of ``fmt``)::

    quantize_act(x[M,K], smooth[K]?, lora_down[K,r]?, fmt, layout, act_unsigned)
        -> q[M,K/2] uint8, scales[M,K/G], lora_act[M,r] float32
    gemm_w4a4(q[M,K/2], scales[M,K/G], qweight[N,K/2], wscales[K/G,N], lora_act[M,r]?,
              proj_up[N,r]?, bias[N]?, wtscale[]?, fmt, out_dtype, layout, act_unsigned)
        -> y[M,N]
    gemm_w4a16(x[M,K], qweight[N,K/2], wscales[K/G,N], bias[N]?, wtscale[]?, fmt, layout)
        -> y[M,N]
    attention(q[B,H,S,D], k[B,H,S,D], v[B,H,S,D], scale?) -> o[B,H,S,D]

``layout`` (default ``"canonical"``) names the nibble order of the packed tensors q and qweight
(:mod:`dcgen_quant.formats.layouts`); the reference accepts every registered layout, a kernel
backend raises BackendUnsupported for layouts it does not read.

``act_unsigned`` (default False, INT4 only) selects unsigned activation codes: quantize_act
quantizes ``(x + UNSIGNED_ACT_SHIFT) / smooth`` to codes 0..15 (formats/int4.py), and gemm_w4a4
reads q as unsigned. The shift's contribution ``UNSIGNED_ACT_SHIFT * sum_k W[n, k]`` is part of
the GEMM's result; the quantizer folds its negative into the layer's bias.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor

from . import capabilities
from .formats import (
    UNSIGNED_ACT_SHIFT,
    check_unsigned,
    dequantize_activation,
    get_format,
    quantize_int4,
    quantize_nvfp4,
)
from .formats import packing as _packing
from .formats.int4 import dequantize_int4
from .formats.layouts import CANONICAL, from_layout, get_layout, to_layout
from .formats.nvfp4 import dequantize_nvfp4

__all__ = [
    "BACKENDS",
    "BackendUnsupported",
    "attention",
    "gemm_w4a4",
    "gemm_w4a16",
    "get_backend",
    "preferred_layout",
    "quantize_act",
    "set_backend",
]

BACKENDS = ("cuda", "triton", "reference")
_BACKEND_MODULES = {"cuda": "dcgen_quant.cuda_backend", "triton": "dcgen_quant.kernels"}
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class BackendUnsupported(NotImplementedError):
    """A backend cannot serve this particular call (format, dtype, shape or GPU)."""


# --------------------------------------------------------------------------------------------
# backend selection


def _normalize_backend(name: str) -> str:
    name = (name or "auto").strip().lower()
    if name not in ("auto", *BACKENDS):
        raise ValueError(
            f"unknown backend {name!r}; expected one of auto, {', '.join(BACKENDS)} "
            "(DCGEN_QUANT_BACKEND or dcgen_quant.set_backend)"
        )
    return name


_backend_choice = _normalize_backend(os.environ.get("DCGEN_QUANT_BACKEND", "auto"))


def _load_backend(name: str):
    """The backend's module, or a string saying why it cannot be used."""
    if name == "reference":
        return None
    if name == "triton" and (reason := capabilities.triton_unavailable()):
        return reason
    try:
        module = importlib.import_module(_BACKEND_MODULES[name])
    except ImportError as exc:
        return f"backend {name!r} failed to import: {exc}"
    reason = module.unavailable_reason()
    return reason if reason else module


def backend_unavailable(name: str) -> str | None:
    """None if backend ``name`` can run on this machine, else why not."""
    name = _normalize_backend(name)
    if name in ("auto", "reference"):
        return None
    loaded = _load_backend(name)
    return loaded if isinstance(loaded, str) else None


def set_backend(name: str) -> None:
    """Choose the backend for ops on CUDA tensors: ``auto``, ``cuda``, ``triton``, ``reference``.

    Raises ``RuntimeError`` naming what is missing when the backend cannot run here.
    """
    global _backend_choice
    name = _normalize_backend(name)
    if reason := backend_unavailable(name):
        raise RuntimeError(f"cannot use backend {name!r}: {reason}")
    _backend_choice = name


def get_backend() -> str:
    """The backend choice in effect (``auto`` unless set)."""
    return _backend_choice


def _candidates(device: torch.device) -> list[str]:
    if device.type != "cuda":
        # On CPU tensors only the reference runs, except Triton in interpreter mode when chosen
        # explicitly (how tests drive whole modules through the Triton kernels on CPU).
        if _backend_choice == "triton" and capabilities.triton_interpret():
            return ["triton"]
        return ["reference"]
    return list(BACKENDS) if _backend_choice == "auto" else [_backend_choice]


def _dispatch(op: str, device: torch.device, *args):
    reasons = []
    for name in _candidates(device):
        if name == "reference":
            return _REFERENCE[op](*args)
        loaded = _load_backend(name)
        if isinstance(loaded, str):
            reasons.append(loaded)
            continue
        fn: Callable | None = getattr(loaded, op, None)
        if fn is None:
            reasons.append(f"backend {name!r} does not implement {op}")
            continue
        try:
            return fn(*args)
        except BackendUnsupported as exc:
            reasons.append(f"backend {name!r}: {exc}")
    raise RuntimeError(f"dcgen_quant::{op}: no backend can run this call: {'; '.join(reasons)}")


def preferred_layout(fmt: str, device: torch.device | str) -> str:
    """The nibble layout that the backend serving ``device`` reads fastest.

    ``canonical`` on CPU and for the reference; otherwise the first available backend's
    ``preferred_layout(fmt)``. Loaders convert weights to it once (SVDQLinear.set_layout).
    """
    for name in _candidates(torch.device(device)):
        if name == "reference":
            return CANONICAL
        loaded = _load_backend(name)
        if not isinstance(loaded, str) and hasattr(loaded, "preferred_layout"):
            return loaded.preferred_layout(fmt)
    return CANONICAL


# --------------------------------------------------------------------------------------------
# argument checks (shared by every backend and the fake impls)


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _expect_dtype(t: Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {allowed}")


def _check_quantize_act(
    x: Tensor, smooth, lora_down, fmt: str, layout: str, act_unsigned: bool = False
) -> int:
    group = get_format(fmt).group_size
    get_layout(layout)
    check_unsigned(fmt, act_unsigned)
    _expect(x.dim() == 2, f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _expect_dtype(x, "x", _ACT_DTYPES)
    k = x.shape[1]
    _expect(
        k > 0 and k % group == 0, f"x: K={k} must be a positive multiple of {fmt} group {group}"
    )
    if smooth is not None:
        _expect(tuple(smooth.shape) == (k,), f"smooth must be [K]=[{k}], got {tuple(smooth.shape)}")
    if lora_down is not None:
        _expect(
            lora_down.dim() == 2 and lora_down.shape[0] == k,
            f"lora_down must be [K, r] with K={k}, got {tuple(lora_down.shape)}",
        )
    return 0 if lora_down is None else lora_down.shape[1]


def _check_gemm_w4a4(
    q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, fmt, out_dtype, layout,
    act_unsigned=False,
):  # fmt: skip
    group = get_format(fmt).group_size
    get_layout(layout)
    check_unsigned(fmt, act_unsigned)
    _expect(
        q.dim() == 2 and q.dtype == torch.uint8,
        f"q must be uint8 [M, K/2], got {q.dtype} {tuple(q.shape)}",
    )
    m, k = q.shape[0], q.shape[1] * 2
    _expect(k % group == 0, f"q: K={k} must be a multiple of {fmt} group {group}")
    _expect(
        qweight.dim() == 2 and qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == k,
        f"qweight must be uint8 [N, K/2] with K={k}, got {qweight.dtype} {tuple(qweight.shape)}",
    )
    n = qweight.shape[0]
    _expect(
        tuple(scales.shape) == (m, k // group),
        f"scales must be [M, K/G]=[{m}, {k // group}], got {tuple(scales.shape)}",
    )
    _expect(
        tuple(wscales.shape) == (k // group, n),
        f"wscales must be [K/G, N]=[{k // group}, {n}], got {tuple(wscales.shape)}",
    )
    if fmt == "int4":
        _expect_dtype(scales, "scales", _ACT_DTYPES)
        _expect_dtype(wscales, "wscales", _ACT_DTYPES)
    else:
        _expect_dtype(scales, "scales", (torch.float8_e4m3fn,))
        _expect_dtype(wscales, "wscales", (torch.float8_e4m3fn,))
        _expect(
            wtscale is not None and wtscale.numel() == 1, "nvfp4 needs wtscale, a float32 scalar"
        )
    if (lora_act is None) != (proj_up is None):
        raise ValueError("lora_act and proj_up must be given together (or both None)")
    if lora_act is not None:
        r = lora_act.shape[-1]
        _expect(
            tuple(lora_act.shape) == (m, r),
            f"lora_act must be [M, r] with M={m}, got {tuple(lora_act.shape)}",
        )
        _expect(
            tuple(proj_up.shape) == (n, r),
            f"proj_up must be [N, r]=[{n}, {r}], got {tuple(proj_up.shape)}",
        )
    if bias is not None:
        _expect(tuple(bias.shape) == (n,), f"bias must be [N]=[{n}], got {tuple(bias.shape)}")
    _expect(out_dtype in _ACT_DTYPES, f"out_dtype must be one of {_ACT_DTYPES}, got {out_dtype}")
    return m, n, k


def _check_gemm_w4a16(x, qweight, wscales, bias, wtscale, fmt, layout):
    group = get_format(fmt).group_size
    get_layout(layout)
    _expect(x.dim() == 2, f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _expect_dtype(x, "x", _ACT_DTYPES)
    m, k = x.shape
    _expect(k % group == 0, f"x: K={k} must be a multiple of {fmt} group {group}")
    _expect(
        qweight.dim() == 2 and qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == k,
        f"qweight must be uint8 [N, K/2] with K={k}, got {qweight.dtype} {tuple(qweight.shape)}",
    )
    n = qweight.shape[0]
    _expect(
        tuple(wscales.shape) == (k // group, n),
        f"wscales must be [K/G, N]=[{k // group}, {n}], got {tuple(wscales.shape)}",
    )
    if fmt == "nvfp4":
        _expect_dtype(wscales, "wscales", (torch.float8_e4m3fn,))
        _expect(
            wtscale is not None and wtscale.numel() == 1, "nvfp4 needs wtscale, a float32 scalar"
        )
    else:
        _expect_dtype(wscales, "wscales", _ACT_DTYPES)
    if bias is not None:
        _expect(tuple(bias.shape) == (n,), f"bias must be [N]=[{n}], got {tuple(bias.shape)}")
    return m, n, k


def _check_attention(q, k, v):
    _expect(q.dim() == 4, f"q must be [B, H, S, D], got shape {tuple(q.shape)}")
    _expect(
        k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape"
    )
    _expect(
        k.dim() == 4 and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3],
        f"k must be [B, H, S_kv, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}",
    )
    _expect_dtype(q, "q", _ACT_DTYPES)
    _expect(
        q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    )


# --------------------------------------------------------------------------------------------
# reference implementations (pure torch; float32 arithmetic)


def quantize_act_reference(x, smooth, lora_down, fmt, layout=CANONICAL, act_unsigned=False):
    """Reference of ``quantize_act``: (shift and) smoothing division, per-token per-group
    quantization (the bit-exact contract of dcgen_quant.formats, in float32), and
    ``lora_act = x @ lora_down`` on the *unsmoothed, unshifted* x (checkpoints fold the smoothing
    into ``proj_down``)."""
    spec = get_format(fmt)
    xf = x.float()
    xq = xf + UNSIGNED_ACT_SHIFT if act_unsigned else xf
    xs = xq / smooth.float() if smooth is not None else xq
    if spec.name == "int4":
        codes, scales = quantize_int4(
            xs, spec.group_size, x.dtype, act_unsigned, check_finite=False
        )
    else:
        codes, scales, _ = quantize_nvfp4(xs, spec.group_size, False, check_finite=False)
    q = to_layout(_packing.pack_nibbles(codes), layout, fmt)
    if lora_down is None:
        lora_act = xf.new_zeros(x.shape[0], 0)
    else:
        lora_act = xf @ lora_down.float()
    return q, scales, lora_act


def _dequantize_weight_no_tensor_scale(qweight, wscales, fmt):
    spec = get_format(fmt)
    nibbles = _packing.unpack_nibbles(qweight)
    if spec.name == "int4":
        return dequantize_int4(_packing.nibbles_to_int4(nibbles), wscales.t(), spec.group_size)
    return dequantize_nvfp4(nibbles, wscales.t(), None, spec.group_size)


def gemm_w4a4_reference(
    q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, fmt, out_dtype,
    layout=CANONICAL, act_unsigned=False,
):  # fmt: skip
    """Reference of ``gemm_w4a4``: exact dequantization of both operands to float32, one float32
    matmul, the NVFP4 tensor scale on the product, then low-rank branch, bias and cast."""
    a = dequantize_activation(from_layout(q, layout, fmt), scales, fmt, act_unsigned)
    w = _dequantize_weight_no_tensor_scale(from_layout(qweight, layout, fmt), wscales, fmt)
    y = a @ w.t()
    if wtscale is not None:
        y = y * wtscale.float()
    if lora_act is not None and lora_act.shape[-1] > 0:
        y = y + lora_act.float() @ proj_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def gemm_w4a16_reference(x, qweight, wscales, bias, wtscale, fmt, layout=CANONICAL):
    """Reference of ``gemm_w4a16``: float32 matmul of x with the exactly dequantized weight."""
    w = _dequantize_weight_no_tensor_scale(from_layout(qweight, layout, fmt), wscales, fmt)
    y = x.float() @ w.t()
    if wtscale is not None:
        y = y * wtscale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def attention_reference(q, k, v, scale):
    """Reference of ``attention``: float32 softmax(q k^T * scale) v, non-causal."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), scale=scale
    )
    return o.to(q.dtype)


_REFERENCE = {
    "quantize_act": quantize_act_reference,
    "gemm_w4a4": gemm_w4a4_reference,
    "gemm_w4a16": gemm_w4a16_reference,
    "attention": attention_reference,
}


# --------------------------------------------------------------------------------------------
# the custom ops


@torch.library.custom_op("dcgen_quant::quantize_act", mutates_args=())
def quantize_act(
    x: Tensor,
    smooth: Tensor | None,
    lora_down: Tensor | None,
    fmt: str,
    layout: str = CANONICAL,
    act_unsigned: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Smooth, quantize to 4 bits per token and group, and project onto the low-rank branch.

    Parameters
    ----------
    x : Tensor [M, K], bfloat16 / float16 (float32 on the reference)
    smooth : Tensor [K], optional; x is divided by it before quantization
    lora_down : Tensor [K, r], optional; applied to the unsmoothed x
    fmt : "int4" | "nvfp4"
    layout : nibble order of q (formats/layouts.py)
    act_unsigned : INT4 only: quantize ``x + UNSIGNED_ACT_SHIFT`` to unsigned codes 0..15

    Returns
    -------
    q : Tensor [M, K/2] uint8; scales : Tensor [M, K/G] (x.dtype for INT4, float8_e4m3fn for
    NVFP4); lora_act : Tensor [M, r] float32 ([M, 0] without lora_down)
    """
    _check_quantize_act(x, smooth, lora_down, fmt, layout, act_unsigned)
    args = (x, smooth, lora_down, fmt, layout, act_unsigned)
    return _dispatch("quantize_act", x.device, *args)


@quantize_act.register_fake
def _(x, smooth, lora_down, fmt, layout=CANONICAL, act_unsigned=False):
    r = _check_quantize_act(x, smooth, lora_down, fmt, layout, act_unsigned)
    spec = get_format(fmt)
    m, k = x.shape
    scale_dtype = torch.float8_e4m3fn if spec.name == "nvfp4" else x.dtype
    return (
        x.new_empty((m, k // 2), dtype=torch.uint8),
        x.new_empty((m, k // spec.group_size), dtype=scale_dtype),
        x.new_empty((m, r), dtype=torch.float32),
    )


@torch.library.custom_op("dcgen_quant::gemm_w4a4", mutates_args=())
def gemm_w4a4(
    q: Tensor,
    scales: Tensor,
    qweight: Tensor,
    wscales: Tensor,
    lora_act: Tensor | None,
    proj_up: Tensor | None,
    bias: Tensor | None,
    wtscale: Tensor | None,
    fmt: str,
    out_dtype: torch.dtype,
    layout: str = CANONICAL,
    act_unsigned: bool = False,
) -> Tensor:
    """4-bit activations times 4-bit weights with the low-rank branch, bias and cast fused.

    ``y = sum_g sa[m,g] sw[g,n] dot(a[m,g], w[n,g]) * wtscale + lora_act @ proj_up^T + bias``

    Parameters
    ----------
    q : Tensor [M, K/2] uint8; scales : Tensor [M, K/G]   (from quantize_act)
    qweight : Tensor [N, K/2] uint8; wscales : Tensor [K/G, N]
    lora_act : Tensor [M, r] float32, optional; proj_up : Tensor [N, r], optional
    bias : Tensor [N], optional; wtscale : Tensor [] float32 (NVFP4 only)
    fmt : "int4" | "nvfp4"; out_dtype : dtype of y
    layout : nibble order of q and qweight (formats/layouts.py)
    act_unsigned : INT4 only: q holds unsigned codes 0..15 (``quantize_act(act_unsigned=True)``)

    Returns
    -------
    y : Tensor [M, N], ``out_dtype``
    """
    args = (
        q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, fmt, out_dtype, layout,
        act_unsigned,
    )  # fmt: skip
    _check_gemm_w4a4(*args)
    return _dispatch("gemm_w4a4", q.device, *args)


@gemm_w4a4.register_fake
def _(
    q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, fmt, out_dtype,
    layout=CANONICAL, act_unsigned=False,
):  # fmt: skip
    m, n, _ = _check_gemm_w4a4(
        q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, fmt, out_dtype, layout,
        act_unsigned,
    )  # fmt: skip
    return q.new_empty((m, n), dtype=out_dtype)


@torch.library.custom_op("dcgen_quant::gemm_w4a16", mutates_args=())
def gemm_w4a16(
    x: Tensor,
    qweight: Tensor,
    wscales: Tensor,
    bias: Tensor | None,
    wtscale: Tensor | None,
    fmt: str,
    layout: str = CANONICAL,
) -> Tensor:
    """16-bit activations times 4-bit weights (weight-only layers such as AdaLayerNorm linears).

    Parameters
    ----------
    x : Tensor [M, K], bfloat16 / float16 (float32 on the reference)
    qweight : Tensor [N, K/2] uint8; wscales : Tensor [K/G, N]
    bias : Tensor [N], optional; wtscale : Tensor [] float32 (NVFP4 only)
    fmt : "int4" | "nvfp4"
    layout : nibble order of qweight (formats/layouts.py)

    Returns
    -------
    y : Tensor [M, N], x.dtype
    """
    _check_gemm_w4a16(x, qweight, wscales, bias, wtscale, fmt, layout)
    return _dispatch("gemm_w4a16", x.device, x, qweight, wscales, bias, wtscale, fmt, layout)


@gemm_w4a16.register_fake
def _(x, qweight, wscales, bias, wtscale, fmt, layout=CANONICAL):
    m, n, _ = _check_gemm_w4a16(x, qweight, wscales, bias, wtscale, fmt, layout)
    return x.new_empty((m, n))


@torch.library.custom_op("dcgen_quant::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """Non-causal attention, ``softmax(q k^T * scale) v`` (DiT joint attention).

    Parameters
    ----------
    q : Tensor [B, H, S_q, D]; k, v : Tensor [B, H, S_kv, D]; same 16-bit dtype (float32 on the
    reference); D = 64 or 128 on the kernels
    scale : float, optional; default 1/sqrt(D)

    Returns
    -------
    o : Tensor [B, H, S_q, D], q.dtype
    """
    _check_attention(q, k, v)
    return _dispatch("attention", q.device, q, k, v, scale)


@attention.register_fake
def _(q, k, v, scale):
    _check_attention(q, k, v)
    return torch.empty_like(q)
