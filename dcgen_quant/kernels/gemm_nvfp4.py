"""W4A4 NVFP4 GEMM with the fused low-rank branch:
``y = wtscale * sum_k (a_k sa) (w_k sw) + lora_act @ proj_up^T + bias``.

Operands (group G = 16 along K: 8 bytes per group and row)::

    q        [M, K/2] uint8   E2M1 activation codes   scales  [M, K/16]  float8 E4M3
    qweight  [N, K/2] uint8   E2M1 weight codes       wscales [K/16, N]  float8 E4M3
    wtscale  []       float32 per-tensor weight scale

Two main loops, chosen by the constexpr NATIVE:

* NATIVE (sm_100, sm_120; ``canonical`` layout): ``tl.dot_scaled`` on the packed codes with the
  E4M3 scales per 16, which the compiler lowers to block-scaled FP4 MMA
  (``tcgen05.mma ... mxf4nvf4`` on sm_100, ``mma.sync ... kind::mxf4nvf4.block_scale`` on
  sm_120). dot_scaled reads E2M1 with element 2i in the low nibble, i.e. the canonical layout;
  its rhs is [K/2, N] (a transposed view of qweight) and its rhs scale [N, K/16].
* Upcast (Hopper, every other GPU, and the interpreter, whose dot_scaled misreads E4M3 scales):
  decode each nibble to its float value, multiply by its block scale and feed a bf16 dot. This is
  exact: an E2M1 value (2 significant bits) times an E4M3 scale (4 bits, >= 2**-9) has at most 6
  significant bits and lies in [2**-10, 2688], so it is a bfloat16 number, and bf16 x bf16
  products are exact in the float32 accumulator. As in the INT4 kernel, the low and the high
  nibbles of a byte tile are two separate dot operands; byte j of a row belongs to group
  j // 8 in every layout, so the scales are gathered per byte without reordering.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dcgen_quant.capabilities import triton_interpret

from . import tuning
from .gemm_epilogue import epilogue, tile_ids
from .numerics import e2m1_value

INTERPRETED = triton_interpret()  # how this module's kernels were built (jit vs interpreter)


@triton.jit
def _upcast(nibbles, scale, INTERPRET: tl.constexpr):
    """E2M1 codes (int32) times their block scale (float32) -> exact bf16 dot operand."""
    v = e2m1_value(nibbles) * scale
    if INTERPRET:
        return v  # the interpreter's bf16 dot is wrong; float32 holds the same exact values
    else:
        return v.to(tl.bfloat16)


@tuning.even_tiles(M="M", N="N", K="K")
@triton.jit
def _gemm_w4a4_nvfp4_kernel(
    q_ptr, scales_ptr, w_ptr, wscales_ptr, la_ptr, up_ptr, bias_ptr, wtscale_ptr, y_ptr,
    M, N, K, R, stride_upn, stride_upr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    NATIVE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_safe = tl.where(rm < M, rm, 0) if not EVEN_M else rm
    rn_safe = tl.where(rn < N, rn, 0) if not EVEN_N else rn
    kb = K // 2
    n_groups = K // 16
    jb = tl.arange(0, BLOCK_K // 2)  # byte within the K step
    a_row = q_ptr + rm_safe[:, None].to(tl.int64) * kb  # [BM, 1]
    w_col = w_ptr + rn_safe[None, :].to(tl.int64) * kb  # [1, BN]
    sa_row = scales_ptr + rm_safe[:, None].to(tl.int64) * n_groups

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kbytes = k0 // 2 + jb
        if EVEN_K:
            a = tl.load(a_row + kbytes[None, :])  # [BM, BK/2]
            w = tl.load(w_col + kbytes[:, None])  # [BK/2, BN]
        else:
            kmask = kbytes < kb
            a = tl.load(a_row + kbytes[None, :], mask=kmask[None, :], other=0)
            w = tl.load(w_col + kbytes[:, None], mask=kmask[:, None], other=0)
        if NATIVE:
            js = k0 // 16 + tl.arange(0, BLOCK_K // 16)
            smask = js < n_groups
            sa = tl.load(sa_row + js[None, :], mask=smask[None, :], other=0.0)  # [BM, BK/16]
            sw = tl.load(wscales_ptr + js[None, :] * N + rn_safe[:, None], mask=smask[None, :],
                         other=0.0)  # [BN, BK/16]  # fmt: skip
            acc = tl.dot_scaled(a, sa, "e2m1", w, sw, "e2m1", acc)
        else:
            gb = kbytes // 8  # group of each byte (8 bytes per 16-group in every layout)
            gmask = gb < n_groups
            sa = tl.load(sa_row + gb[None, :], mask=gmask[None, :], other=0.0).to(tl.float32)
            sw = tl.load(wscales_ptr + gb[:, None] * N + rn_safe[None, :], mask=gmask[:, None],
                         other=0.0).to(tl.float32)  # fmt: skip
            a32 = a.to(tl.int32)
            w32 = w.to(tl.int32)
            acc = tl.dot(_upcast(a32 & 15, sa, INTERPRET), _upcast(w32 & 15, sw, INTERPRET), acc)
            acc = tl.dot(_upcast(a32 >> 4, sa, INTERPRET), _upcast(w32 >> 4, sw, INTERPRET), acc)

    acc = acc * tl.load(wtscale_ptr).to(tl.float32)
    epilogue(acc, rm, rn, la_ptr, up_ptr, bias_ptr, y_ptr, M, N, R, stride_upn, stride_upr,
             HAS_LORA, HAS_BIAS, BLOCK_R, INTERPRET)  # fmt: skip


@functools.cache
def _tuned(arch: str):
    return triton.autotune(
        configs=tuning.configs_for(tuning.GEMM_NVFP4_CONFIGS, arch),
        key=["M", "N", "K", "R", "NATIVE"],
        prune_configs_by={"early_config_prune": tuning.prune_gemm_nvfp4},
    )(_gemm_w4a4_nvfp4_kernel)


def native_fp4(device: torch.device) -> bool:
    """True where ``tl.dot_scaled`` maps to block-scaled FP4 MMA (sm_100 family, sm_120)."""
    if device.type != "cuda":
        return False
    cap, _ = tuning.device_limits(device.index if device.index is not None else 0)
    return cap[0] in (10, 12)


def gemm_w4a4_nvfp4(
    q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, out_dtype, layout, interpret,
    native=None,
):  # fmt: skip
    """Launch the NVFP4 W4A4 GEMM (arguments as ``dcgen_quant.ops.gemm_w4a4``, fmt="nvfp4").

    Parameters
    ----------
    q : Tensor [M, K/2] uint8; scales : Tensor [M, K/16] float8_e4m3fn
    qweight : Tensor [N, K/2] uint8; wscales : Tensor [K/16, N] float8_e4m3fn
    lora_act : Tensor [M, r] float32 or None; proj_up : Tensor [N, r] or None
    bias : Tensor [N] or None; wtscale : Tensor [] float32; out_dtype : torch.dtype
    layout : nibble layout of q and qweight
    native : force the dot_scaled loop on or off (tests); default: where the GPU has it and the
        layout is canonical

    Returns
    -------
    y : Tensor [M, N], ``out_dtype``
    """
    m, n, k = q.shape[0], qweight.shape[0], q.shape[1] * 2
    y = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m == 0 or n == 0:
        return y
    if native is None:
        native = not interpret and layout == "canonical" and native_fp4(q.device)
    r = 0 if lora_act is None else lora_act.shape[1]
    q, scales, qweight, wscales = (t.contiguous() for t in (q, scales, qweight, wscales))
    la = lora_act.contiguous() if r else y
    up = proj_up if r else y
    b = bias.contiguous() if bias is not None else y
    wt = wtscale.reshape(1).to(torch.float32)
    kernel, cfg = tuning.launch_plan(
        _gemm_w4a4_nvfp4_kernel, _tuned, tuning.GEMM_NVFP4_CONFIGS, tuning.prune_gemm_nvfp4,
        {"y_ptr": y, "M": m, "N": n, "K": k, "NATIVE": native}, q.device, interpret,
        tuning.gemm_interpret_config(m, n, block_k=256),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](
        q, scales, qweight, wscales, la, up, b, wt, y,
        m, n, k, r, up.stride(0) if r else 0, up.stride(1) if r else 0,
        HAS_LORA=r > 0, HAS_BIAS=bias is not None, BLOCK_R=tuning.pow2_at_least(r),
        NATIVE=native, INTERPRET=interpret,
        **cfg,
    )  # fmt: skip
    return y
