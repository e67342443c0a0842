"""W4A4 INT4 GEMM with the fused low-rank branch: ``y = sum_g sa sw (a_g . w_g) + L1 L2^T + b``.

Operands (K along the packed dimension, group G = 64, so 32 bytes per group and row)::

    q        [M, K/2] uint8     activation codes      scales  [M, K/64]  16-bit
    qweight  [N, K/2] uint8     weight codes          wscales [K/64, N]  16-bit
    lora_act [M, r]   float32   proj_up [N, r]        bias [N]

One program computes a BLOCK_M x BLOCK_N tile of y. Per 64-wide group it loads 32 bytes per row
of both operands and unpacks them into int8 *without any shuffle*: the low nibbles of the 32
bytes form one [*, 32] int8 operand and the high nibbles another. The group's dot product is the
sum of the two half dots ``dot(a_lo, w_lo) + dot(a_hi, w_hi)`` (int8 x int8 -> int32 on the
INT8 tensor cores: wgmma s8 on sm_90, mma.sync s8 on sm_80/sm_120), because the low nibble of
byte j in q and in qweight hold the same element k. This holds for any nibble layout in which
activations and weights agree, so the kernel reads ``canonical`` and ``split_halves`` alike.

With ``ACT_UNSIGNED`` the activation nibbles are read as unsigned codes 0..15
(``quantize_act(act_unsigned=True)``); they are valid int8 values, so the same int8 dots apply
(weights stay signed -8..7).

The int32 partial of each group is exact (|sum| <= 64 * 8 * 8 signed, 64 * 15 * 8 unsigned);
it is converted to float32 and added into the float32 accumulator times ``sa[m, g] * sw[g, n]``
(two-level accumulation, as in FP8 block-scaled GEMMs). The epilogue adds
``lora_act @ proj_up^T`` (float32 operands, 3xTF32 on GPUs: float32-level accuracy on the tensor
cores), the bias, and casts to ``out_dtype``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dcgen_quant.capabilities import triton_interpret

from . import tuning
from .gemm_epilogue import epilogue, tile_ids
from .numerics import int4_high, int4_low, int_to_float, to_f32, uint4_high, uint4_low

INTERPRETED = triton_interpret()  # how this module's kernels were built (jit vs interpreter)


@tuning.even_tiles(M="M", N="N")
@triton.jit
def _gemm_w4a4_int4_kernel(
    q_ptr, scales_ptr, w_ptr, wscales_ptr, la_ptr, up_ptr, bias_ptr, y_ptr,
    M, N, K, R, stride_upn, stride_upr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    ACT_UNSIGNED: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 32)  # byte within a 64-wide group
    kb = K // 2
    n_groups = K // 64
    # clamp out-of-range rows / columns onto valid memory so EVEN loads need no mask; their
    # results are never stored
    rm_safe = tl.where(rm < M, rm, 0) if not EVEN_M else rm
    rn_safe = tl.where(rn < N, rn, 0) if not EVEN_N else rn
    a_ptrs = q_ptr + rm_safe[:, None].to(tl.int64) * kb + j[None, :]  # [BM, 32]
    w_ptrs = w_ptr + rn_safe[None, :].to(tl.int64) * kb + j[:, None]  # [32, BN]
    sa_ptrs = scales_ptr + rm_safe.to(tl.int64) * n_groups
    sw_ptrs = wscales_ptr + rn_safe

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, n_groups):
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        if ACT_UNSIGNED:  # codes 0..15 (valid int8): still an s8 x s8 dot
            a_lo, a_hi = uint4_low(a), uint4_high(a)
        else:
            a_lo, a_hi = int4_low(a), int4_high(a)
        part = tl.dot(a_lo, int4_low(w), out_dtype=tl.int32)
        part = tl.dot(a_hi, int4_high(w), part, out_dtype=tl.int32)
        sa = to_f32(tl.load(sa_ptrs + g), INTERPRET)
        sw = to_f32(tl.load(sw_ptrs + g * N), INTERPRET)
        # |part| <= 64 * 8 * 8 = 4096 (signed codes) or 64 * 15 * 8 = 7680 (unsigned activation
        # codes times signed weights), far below int_to_float's 2**22: the magic-number
        # conversion (no I2F unit) stays exact for both
        acc += int_to_float(part) * (sa[:, None] * sw[None, :])
        a_ptrs += 32
        w_ptrs += 32

    epilogue(acc, rm, rn, la_ptr, up_ptr, bias_ptr, y_ptr, M, N, R, stride_upn, stride_upr,
             HAS_LORA, HAS_BIAS, BLOCK_R, INTERPRET)  # fmt: skip


@functools.cache
def _tuned(arch: str):
    # ACT_UNSIGNED is not in the key: it changes two bit operations per loaded byte, not the
    # tile trade-offs, so one tuned configuration serves both variants (each compiles apart)
    return triton.autotune(
        configs=tuning.configs_for(tuning.GEMM_INT4_CONFIGS, arch),
        key=["M", "N", "K", "R"],
        prune_configs_by={"early_config_prune": tuning.prune_gemm_int4},
    )(_gemm_w4a4_int4_kernel)


def gemm_w4a4_int4(
    q, scales, qweight, wscales, lora_act, proj_up, bias, out_dtype, interpret, act_unsigned=False
):
    """Launch the INT4 W4A4 GEMM (arguments as ``dcgen_quant.ops.gemm_w4a4``, fmt="int4").

    Parameters
    ----------
    q : Tensor [M, K/2] uint8; scales : Tensor [M, K/64] 16-bit
    qweight : Tensor [N, K/2] uint8; wscales : Tensor [K/64, N] 16-bit
    lora_act : Tensor [M, r] float32 or None; proj_up : Tensor [N, r] or None
    bias : Tensor [N] or None; out_dtype : torch.dtype
    interpret : bool, True under TRITON_INTERPRET=1
    act_unsigned : bool, q holds unsigned codes 0..15 (weights stay signed)

    Returns
    -------
    y : Tensor [M, N], ``out_dtype``
    """
    m, n, k = q.shape[0], qweight.shape[0], q.shape[1] * 2
    y = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m == 0 or n == 0:
        return y
    r = 0 if lora_act is None else lora_act.shape[1]
    q, scales, qweight, wscales = (t.contiguous() for t in (q, scales, qweight, wscales))
    la = lora_act.contiguous() if r else y
    up = proj_up if r else y
    b = bias.contiguous() if bias is not None else y
    kernel, cfg = tuning.launch_plan(
        _gemm_w4a4_int4_kernel, _tuned, tuning.GEMM_INT4_CONFIGS, tuning.prune_gemm_int4,
        {"y_ptr": y, "M": m, "N": n, "K": k}, q.device, interpret,
        tuning.gemm_interpret_config(m, n),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](
        q, scales, qweight, wscales, la, up, b, y,
        m, n, k, r, up.stride(0) if r else 0, up.stride(1) if r else 0,
        HAS_LORA=r > 0, HAS_BIAS=bias is not None, BLOCK_R=tuning.pow2_at_least(r),
        ACT_UNSIGNED=act_unsigned, INTERPRET=interpret,
        **cfg,
    )  # fmt: skip
    return y
