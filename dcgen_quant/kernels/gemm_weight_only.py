"""W4A16 GEMM (weight-only layers, e.g. AdaLayerNorm linears): ``y = x dequant(W)^T + bias``.

Operands::

    x        [M, K]   bfloat16 / float16 / float32 (any strides)
    qweight  [N, K/2] uint8     INT4 or E2M1 codes      wscales [K/G, N]
    wtscale  []       float32   (NVFP4 only)             bias [N]

Like the W4A4 kernels, a packed weight tile [BLOCK_K/2, BLOCK_N] is split into its low and high
nibbles without a shuffle, and x is loaded as the two matching [BLOCK_M, BLOCK_K/2] tiles of the
elements those nibbles hold (layout ``canonical``: the even / odd elements of each group;
``split_halves``: the first / second half of each group).

Exactness against the float32 reference: the weight operand must be exact in the dot's input
dtype. INT4: ``code * scale`` has up to 12 significant bits, too many for bfloat16, so each
64-group is one dot of x against the raw codes (exact in any 16-bit type), rescaled by the
group's weight scale into the float32 accumulator. NVFP4: ``e2m1 * e4m3`` is exact in bfloat16
and float16 (nvfp4 module docstring), so the scales are folded into the weight before a single
dot per K step, and the per-tensor scale multiplies the accumulator at the end.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dcgen_quant.capabilities import triton_interpret

from . import tuning
from .gemm_epilogue import epilogue, tile_ids
from .numerics import e2m1_value, int4_high, int4_low, to_f32

INTERPRETED = triton_interpret()  # how this module's kernels were built (jit vs interpreter)


@triton.jit
def _operand(v, X_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """A dot operand in x's dtype (the weight values are exact in it), or float32 in the
    interpreter, whose bf16 dot is wrong."""
    if INTERPRET:
        return to_f32(v, INTERPRET)
    else:
        return v.to(X_DTYPE)


@triton.jit
def _dot(a, b, acc, X_DTYPE: tl.constexpr):
    """acc + a @ b in float32; float32 operands use the exact ("ieee") path, not TF32."""
    if tl.float32 == X_DTYPE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@tuning.even_tiles(M="M", N="N", K="K")
@triton.jit
def _gemm_w4a16_kernel(
    x_ptr, w_ptr, wscales_ptr, bias_ptr, wtscale_ptr, y_ptr,
    M, N, K, stride_xm, stride_xk,
    IS_NVFP4: tl.constexpr, SPLIT_HALVES: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    GROUP: tl.constexpr = 16 if IS_NVFP4 else 64
    HALF: tl.constexpr = GROUP // 2
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows / columns read row / column 0 (valid memory) and are never stored
    rm_safe = tl.where(rm < M, rm, 0) if not EVEN_M else rm
    rn_safe = tl.where(rn < N, rn, 0) if not EVEN_N else rn
    kb = K // 2
    n_groups = K // GROUP
    x_row = x_ptr + rm_safe[:, None].to(tl.int64) * stride_xm
    w_col = w_ptr + rn_safe[None, :].to(tl.int64) * kb
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if IS_NVFP4:
        jb = tl.arange(0, BLOCK_K // 2)
        # element index (within the K step) of the low nibble of byte jb and of its partner
        if SPLIT_HALVES:
            k_lo = (jb // HALF) * GROUP + jb % HALF
            k_hi = k_lo + HALF
        else:
            k_lo = 2 * jb
            k_hi = k_lo + 1
        for k0 in range(0, K, BLOCK_K):
            kbytes = k0 // 2 + jb
            kmask = kbytes < kb
            if EVEN_K:
                w = tl.load(w_col + kbytes[:, None])
                x_lo = tl.load(x_row + (k0 + k_lo)[None, :] * stride_xk)
                x_hi = tl.load(x_row + (k0 + k_hi)[None, :] * stride_xk)
            else:
                w = tl.load(w_col + kbytes[:, None], mask=kmask[:, None], other=0)
                x_lo = tl.load(x_row + (k0 + k_lo)[None, :] * stride_xk, mask=kmask[None, :],
                               other=0.0)  # fmt: skip
                x_hi = tl.load(x_row + (k0 + k_hi)[None, :] * stride_xk, mask=kmask[None, :],
                               other=0.0)  # fmt: skip
            gb = kbytes // HALF  # group of each byte (8 bytes per 16-group)
            sw = tl.load(wscales_ptr + gb[:, None] * N + rn_safe[None, :], mask=kmask[:, None],
                         other=0.0).to(tl.float32)  # fmt: skip
            w32 = w.to(tl.int32)
            w_lo = _operand(e2m1_value(w32 & 15) * sw, X_DTYPE, INTERPRET)
            w_hi = _operand(e2m1_value(w32 >> 4) * sw, X_DTYPE, INTERPRET)
            acc = _dot(_operand(x_lo, X_DTYPE, INTERPRET), w_lo, acc, X_DTYPE)
            acc = _dot(_operand(x_hi, X_DTYPE, INTERPRET), w_hi, acc, X_DTYPE)
    else:
        # one 64-group per step: a dot of x against the raw codes (exact in 16 bits), rescaled
        # by the group's weight scale into the float32 accumulator
        jb = tl.arange(0, HALF)
        if SPLIT_HALVES:
            k_lo = jb
            k_hi = jb + HALF
        else:
            k_lo = 2 * jb
            k_hi = 2 * jb + 1
        for g in range(0, n_groups):
            w = tl.load(w_col + (g * HALF + jb)[:, None])  # [32, BN]
            x_lo = tl.load(x_row + (g * GROUP + k_lo)[None, :] * stride_xk)  # [BM, 32]
            x_hi = tl.load(x_row + (g * GROUP + k_hi)[None, :] * stride_xk)
            w_lo = _operand(int4_low(w), X_DTYPE, INTERPRET)
            w_hi = _operand(int4_high(w), X_DTYPE, INTERPRET)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            part = _dot(_operand(x_lo, X_DTYPE, INTERPRET), w_lo, part, X_DTYPE)
            part = _dot(_operand(x_hi, X_DTYPE, INTERPRET), w_hi, part, X_DTYPE)
            sw = to_f32(tl.load(wscales_ptr + g * N + rn_safe), INTERPRET)
            acc += part * sw[None, :]

    if IS_NVFP4:
        acc = acc * tl.load(wtscale_ptr).to(tl.float32)
    epilogue(acc, rm, rn, y_ptr, y_ptr, bias_ptr, y_ptr, M, N, 0, 0, 0,
             False, HAS_BIAS, 16, INTERPRET)  # fmt: skip


@functools.cache
def _tuned(arch: str):
    return triton.autotune(
        configs=tuning.configs_for(tuning.GEMM_W4A16_CONFIGS, arch),
        key=["M", "N", "K", "IS_NVFP4"],
        prune_configs_by={"early_config_prune": tuning.prune_gemm_w4a16},
    )(_gemm_w4a16_kernel)


def gemm_w4a16(x, qweight, wscales, bias, wtscale, fmt, layout, interpret):
    """Launch the W4A16 GEMM (arguments as ``dcgen_quant.ops.gemm_w4a16``).

    Parameters
    ----------
    x : Tensor [M, K], bfloat16 / float16 / float32
    qweight : Tensor [N, K/2] uint8; wscales : Tensor [K/G, N]
    bias : Tensor [N] or None; wtscale : Tensor [] float32 (NVFP4) or None
    fmt : "int4" | "nvfp4"; layout : "canonical" | "split_halves"

    Returns
    -------
    y : Tensor [M, N], x.dtype
    """
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    nvfp4 = fmt == "nvfp4"
    qweight, wscales = qweight.contiguous(), wscales.contiguous()
    b = bias.contiguous() if bias is not None else y
    wt = wtscale.reshape(1).to(torch.float32) if nvfp4 else y
    kernel, cfg = tuning.launch_plan(
        _gemm_w4a16_kernel, _tuned, tuning.GEMM_W4A16_CONFIGS, tuning.prune_gemm_w4a16,
        {"y_ptr": y, "M": m, "N": n, "K": k}, x.device, interpret,
        tuning.gemm_interpret_config(m, n, block_k=256),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](
        x, qweight, wscales, b, wt, y,
        m, n, k, x.stride(0), x.stride(1),
        IS_NVFP4=nvfp4, SPLIT_HALVES=layout == "split_halves", HAS_BIAS=bias is not None,
        INTERPRET=interpret,
        **cfg,
    )  # fmt: skip
    return y
