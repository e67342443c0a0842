"""Fused activation quantization: smoothing, per-token per-group 4-bit quantization, packing, and
the low-rank down projection, in one pass over x.

Each program owns BLOCK_M rows and walks K in steps of GROUPS quantization groups. A group of G
codes packs into G/2 bytes; byte j of a group pairs two elements, which depend on the layout:

    canonical      byte j = element 2j (low nibble) | element 2j+1 (high nibble)
    split_halves   byte j = element j  (low nibble) | element j+G/2 (high nibble)

The kernel loads x directly as the two [BLOCK_M, GROUPS, G/2] tiles of low-nibble and
high-nibble elements (split_halves: two contiguous half-groups; canonical: one
[..., G/2, 2] tile split in registers), so packing is ``lo | hi << 4`` with no shuffle. The group
amax is the max over both tiles. The same unsmoothed tiles feed ``lora_act += x @ lora_down``
(two dots, one per nibble half, against the matching rows of lora_down).

Unsigned INT4 (``UNSIGNED``, for layers that read a GELU output): the quantized value is
``u = (x + UNSIGNED_ACT_SHIFT) / smooth``, the shift added in float32 to the widened x before the
smoothing division (the reference's order), then ``amax / 15`` and codes clamped to [0, 15]
(values below ``-UNSIGNED_ACT_SHIFT`` give code 0; their magnitude still counts in the amax, as
in the reference). ``lora_act`` reads the unshifted x.

Bit-exactness (formats/int4.py, formats/nvfp4.py): the smoothing division and ``amax / 7``,
``amax / 15`` or ``amax / 6`` use correctly rounded division (``div_rn``); ``x / scale``
multiplies by the group's correctly rounded reciprocal and applies Markstein's FMA correction
(numerics.div_by_reciprocal), which gives the IEEE quotient wherever it can affect a code; scales
are rounded with the exact helpers of numerics.py; codes round half to even. Scales are stored as
[M, K/G] (x.dtype for INT4, float8 E4M3 for NVFP4), codes as [M, K/2] uint8.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dcgen_quant.capabilities import triton_interpret
from dcgen_quant.formats.int4 import UNSIGNED_ACT_SHIFT

from . import tuning
from .numerics import (
    SCALE_BF16,
    SCALE_FP16,
    SCALE_FP32,
    cast_to,
    div_by_reciprocal,
    e2m1_code,
    rint,
    round_to_e4m3,
    round_to_scale_dtype,
    to_f32,
)

_SCALE_KIND = {torch.bfloat16: SCALE_BF16, torch.float16: SCALE_FP16, torch.float32: SCALE_FP32}

INTERPRETED = triton_interpret()  # how this module's kernels were built (jit vs interpreter)
SHIFT = tl.constexpr(UNSIGNED_ACT_SHIFT)  # 0.171875 = 11/64: exact in every float type


@triton.jit
def _lora_partial(acc, x_half, down_ptr, k_rows, R, stride_dk, stride_dr, k_mask,
                  BLOCK_R: tl.constexpr, DOT16: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """acc[BM, BLOCK_R] += x_half[BM, GK] @ lora_down[k_rows, :R] with float32 accumulation."""
    r = tl.arange(0, BLOCK_R)
    d_ptrs = down_ptr + k_rows[:, None] * stride_dk + r[None, :] * stride_dr
    down = tl.load(d_ptrs, mask=k_mask[:, None] & (r[None, :] < R), other=0.0)
    if DOT16:
        # same 16-bit dtype on both sides: exact products, float32 accumulation
        return tl.dot(x_half, down, acc)
    else:
        x32 = to_f32(x_half, INTERPRET)
        return tl.dot(x32, to_f32(down, INTERPRET), acc, input_precision="ieee")


@triton.jit
def _quantize_act_kernel(
    x_ptr, smooth_ptr, down_ptr, q_ptr, scales_ptr, lora_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_dk, stride_dr,
    GROUP: tl.constexpr, IS_NVFP4: tl.constexpr, UNSIGNED: tl.constexpr,
    SPLIT_HALVES: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr,
    SCALE_KIND: tl.constexpr, DOT16: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = GROUP // 2
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    GK: tl.constexpr = GROUPS * HALF  # elements per nibble half and step
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    n_groups = K // GROUP

    # 3-D index pieces: [BLOCK_M, GROUPS, HALF]
    r3 = rows[:, None, None]
    g3 = tl.arange(0, GROUPS)[None, :, None]
    e3 = tl.arange(0, HALF)[None, None, :]
    # the same element indices flattened to [GK], for the rows of lora_down
    j = tl.arange(0, GK)
    if SPLIT_HALVES:
        lo3 = e3
        hi3 = e3 + HALF
        lo1 = (j // HALF) * GROUP + (j % HALF)
        hi1 = lo1 + HALF
    else:
        lo3 = 2 * e3
        hi3 = 2 * e3 + 1
        lo1 = (j // HALF) * GROUP + 2 * (j % HALF)
        hi1 = lo1 + 1

    lora = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        gidx3 = k0 // GROUP + g3  # absolute group index
        k_lo3 = gidx3 * GROUP + lo3  # element index of each low-nibble element
        k_hi3 = gidx3 * GROUP + hi3  # and of its high-nibble partner
        mask3 = (r3 < M) & (gidx3 < n_groups)
        x_base = x_ptr + r3.to(tl.int64) * stride_xm
        if SPLIT_HALVES:
            x_lo = tl.load(x_base + k_lo3 * stride_xk, mask=mask3, other=0.0)
            x_hi = tl.load(x_base + k_hi3 * stride_xk, mask=mask3, other=0.0)
        else:
            pair = tl.arange(0, 2)[None, None, None, :]
            x_pair = tl.load(
                x_base[:, :, :, None] + (k_lo3[:, :, :, None] + pair) * stride_xk,
                mask=mask3[:, :, :, None],
                other=0.0,
            )
            x_lo, x_hi = tl.split(x_pair)

        if HAS_LORA:
            k_mask = (k0 + lo1) < K
            lora = _lora_partial(
                lora, tl.reshape(x_lo, (BLOCK_M, GK)), down_ptr, k0 + lo1, R, stride_dk,
                stride_dr, k_mask, BLOCK_R, DOT16, INTERPRET,
            )  # fmt: skip
            lora = _lora_partial(
                lora, tl.reshape(x_hi, (BLOCK_M, GK)), down_ptr, k0 + hi1, R, stride_dk,
                stride_dr, k_mask, BLOCK_R, DOT16, INTERPRET,
            )  # fmt: skip

        xs_lo = to_f32(x_lo, INTERPRET)
        xs_hi = to_f32(x_hi, INTERPRET)
        if UNSIGNED:
            # u = (x + shift) / smooth: one correctly rounded float32 add, then the division
            xs_lo = xs_lo + SHIFT
            xs_hi = xs_hi + SHIFT
        if HAS_SMOOTH:
            smask = gidx3 < n_groups
            s_lo = to_f32(tl.load(smooth_ptr + k_lo3, mask=smask, other=1.0), INTERPRET)
            s_hi = to_f32(tl.load(smooth_ptr + k_hi3, mask=smask, other=1.0), INTERPRET)
            xs_lo = tl.math.div_rn(xs_lo, s_lo)
            xs_hi = tl.math.div_rn(xs_hi, s_hi)

        amax = tl.maximum(tl.max(tl.abs(xs_lo), axis=2), tl.max(tl.abs(xs_hi), axis=2))
        rows2 = rows[:, None]
        gidx2 = k0 // GROUP + tl.arange(0, GROUPS)[None, :]
        mask2 = (rows2 < M) & (gidx2 < n_groups)
        s_ptrs = scales_ptr + rows2.to(tl.int64) * n_groups + gidx2
        if IS_NVFP4:
            # bs = e4m3(min(amax / 6, 448)); v = x / bs, or x * 0 where bs == 0
            bs = round_to_e4m3(tl.minimum(tl.math.div_rn(amax, 6.0), 448.0), INTERPRET)
            tl.store(s_ptrs, bs.to(scales_ptr.dtype.element_ty), mask=mask2)
            # |x| / bs by a per-group reciprocal (bs is 0 or in [2**-9, 448], so 1/bs is
            # normal); tiny |x| can only give magnitude code 0 either way. The sign bit is x's:
            # sign(x / bs) and sign(x * 0) both equal it, -0.0 included.
            d = tl.where(bs > 0, bs, 1.0)
            r = tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d)[:, :, None]
            d = d[:, :, None]
            nz = (bs > 0)[:, :, None]
            a_lo = tl.where(nz, tl.abs(div_by_reciprocal(xs_lo, d, r)), 0.0)
            a_hi = tl.where(nz, tl.abs(div_by_reciprocal(xs_hi, d, r)), 0.0)
            c_lo = e2m1_code(a_lo, xs_lo)
            c_hi = e2m1_code(a_hi, xs_hi)
        else:
            # scale = dtype(amax / QMAX); code = clamp(rne(x / scale), QMIN, QMAX), divisor 1 if
            # scale == 0; QMAX, QMIN = 7, -8 (signed) or 15, 0 (unsigned)
            QMAX: tl.constexpr = 15.0 if UNSIGNED else 7.0
            QMIN: tl.constexpr = 0.0 if UNSIGNED else -8.0
            s = round_to_scale_dtype(tl.math.div_rn(amax, QMAX), SCALE_KIND)
            tl.store(s_ptrs, cast_to(s, scales_ptr.dtype.element_ty, INTERPRET), mask=mask2)
            # x / scale by a per-group reciprocal. Groups with a tiny scale are first scaled by
            # 2**64 (exact) so that x, the scale and the residual stay normal; in the others a
            # tiny |x| gives a quotient far below 0.5, i.e. code 0 either way.
            d = tl.where(s == 0.0, 1.0, s)
            sc = tl.where(d < 8.077935669463161e-28, 1.8446744073709552e19, 1.0)  # 2**-90, 2**64
            d = d * sc
            r = tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d)[:, :, None]
            d = d[:, :, None]
            sc = sc[:, :, None]
            v_lo = rint(div_by_reciprocal(xs_lo * sc, d, r), INTERPRET)
            v_hi = rint(div_by_reciprocal(xs_hi * sc, d, r), INTERPRET)
            c_lo = tl.minimum(tl.maximum(v_lo, QMIN), QMAX).to(tl.int32) & 0xF
            c_hi = tl.minimum(tl.maximum(v_hi, QMIN), QMAX).to(tl.int32) & 0xF

        packed = (c_lo | (c_hi << 4)).to(tl.uint8)
        q_ptrs = q_ptr + r3.to(tl.int64) * (K // 2) + gidx3 * HALF + e3
        tl.store(q_ptrs, packed, mask=mask3)

    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)[None, :]
        l_ptrs = lora_ptr + rows[:, None].to(tl.int64) * R + rr
        tl.store(l_ptrs, lora, mask=(rows[:, None] < M) & (rr < R))


@functools.cache
def _tuned(arch: str):
    # UNSIGNED is not in the key: it adds one float32 add per element to a memory-bound kernel,
    # so a configuration tuned for either variant serves both (each still compiles separately)
    return triton.autotune(
        configs=tuning.configs_for(tuning.QUANTIZE_ACT_CONFIGS, arch),
        key=["M", "K", "R", "GROUP"],
        prune_configs_by={"early_config_prune": tuning.prune_quantize_act},
    )(_quantize_act_kernel)


def quantize_act(x, smooth, lora_down, fmt, layout, interpret, act_unsigned=False):
    """Launch the fused quantizer (arguments as ``dcgen_quant.ops.quantize_act``).

    Parameters
    ----------
    x : Tensor [M, K], bfloat16 / float16 / float32
    smooth : Tensor [K] or None
    lora_down : Tensor [K, r] or None
    fmt : "int4" | "nvfp4"; layout : "canonical" | "split_halves"
    interpret : bool, True under TRITON_INTERPRET=1
    act_unsigned : bool, INT4 only: codes 0..15 of ``(x + UNSIGNED_ACT_SHIFT) / smooth``

    Returns
    -------
    q : Tensor [M, K/2] uint8; scales : Tensor [M, K/G] (x.dtype / float8_e4m3fn);
    lora_act : Tensor [M, r] float32
    """
    m, k = x.shape
    nvfp4 = fmt == "nvfp4"
    group = 16 if nvfp4 else 64
    r = 0 if lora_down is None else lora_down.shape[1]
    q = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty(
        (m, k // group), dtype=torch.float8_e4m3fn if nvfp4 else x.dtype, device=x.device
    )
    lora_act = torch.empty((m, r), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales, lora_act
    dot16 = (
        not interpret
        and r > 0
        and x.dtype in (torch.bfloat16, torch.float16)
        and lora_down.dtype == x.dtype
    )
    smooth_arg = smooth.contiguous() if smooth is not None else x
    down_arg = lora_down if lora_down is not None else x
    kernel, cfg = tuning.launch_plan(
        _quantize_act_kernel, _tuned, tuning.QUANTIZE_ACT_CONFIGS, tuning.prune_quantize_act,
        {"M": m, "K": k}, x.device, interpret, tuning.quantize_act_interpret_config(m, k, group),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    kernel[grid](
        x, smooth_arg, down_arg, q, scales, lora_act,
        m, k, r,
        x.stride(0), x.stride(1),
        down_arg.stride(0) if r else 0, down_arg.stride(1) if r else 0,
        GROUP=group, IS_NVFP4=nvfp4, UNSIGNED=act_unsigned, SPLIT_HALVES=layout == "split_halves",
        HAS_SMOOTH=smooth is not None, HAS_LORA=r > 0, SCALE_KIND=_SCALE_KIND[x.dtype],
        DOT16=dot16, INTERPRET=interpret, BLOCK_R=tuning.pow2_at_least(r),
        **cfg,
    )  # fmt: skip
    return q, scales, lora_act
