"""What every GEMM kernel here shares: the program -> output tile mapping and the fused epilogue.

The epilogue takes the float32 accumulator of a BLOCK_M x BLOCK_N tile (already multiplied by
any per-tensor scale) and adds, in the order of the pure-torch reference, the low-rank branch
``lora_act [M, r] (float32) @ proj_up [N, r]^T`` and the bias [N], then casts and stores y [M, N]
(row-major) under the M/N masks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dcgen_quant.capabilities import triton_interpret

from .numerics import cast_to, to_f32

INTERPRETED = triton_interpret()  # how this module's kernels were built (jit vs interpreter)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n) in GROUP_M-row bands, so neighbouring programs share
    weight tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_band = GROUP_M * num_n
    band = pid // in_band
    first_m = band * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_band) % band_m
    pid_n = (pid % in_band) // band_m
    return pid_m, pid_n


@triton.jit
def epilogue(acc, rm, rn, la_ptr, up_ptr, bias_ptr, y_ptr, M, N, R, stride_upn, stride_upr,
             HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
             INTERPRET: tl.constexpr):  # fmt: skip
    """acc [BM, BN] float32 -> y: + lora_act @ proj_up^T, + bias, cast, masked store."""
    m_mask = rm < M
    n_mask = rn < N
    if HAS_LORA:
        r = tl.arange(0, BLOCK_R)
        la = tl.load(
            la_ptr + rm[:, None].to(tl.int64) * R + r[None, :],
            mask=m_mask[:, None] & (r[None, :] < R),
            other=0.0,
        )
        up = tl.load(
            up_ptr + rn[None, :] * stride_upn + r[:, None] * stride_upr,
            mask=n_mask[None, :] & (r[:, None] < R),
            other=0.0,
        )
        acc = tl.dot(la, to_f32(up, INTERPRET), acc, input_precision="tf32x3")
    if HAS_BIAS:
        acc += to_f32(tl.load(bias_ptr + rn, mask=n_mask, other=0.0), INTERPRET)[None, :]
    y = cast_to(acc, y_ptr.dtype.element_ty, INTERPRET)
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(y_ptrs, y, mask=m_mask[:, None] & n_mask[None, :])
