"""Flash attention forward (non-causal, DiT joint attention): ``o = softmax(q k^T * scale) v``.

Layout [B, H, S, D] as ``dcgen_quant.ops.attention`` (any strides; text and image tokens are
simply one sequence). One program owns BLOCK_M query rows of one (batch, head) and streams
the keys / values in BLOCK_N blocks with the online softmax:

    s = q k^T * scale * log2(e)        (float32 accumulator of a 16-bit dot)
    m_new = max(m, rowmax(s));  p = exp2(s - m_new);  alpha = exp2(m - m_new)
    l = l * alpha + rowsum(p);  acc = acc * alpha + p v   (p rounded to the input dtype)

Softmax statistics m, l and the accumulator are float32; the output is ``acc / l``. Ragged
tails: keys beyond S_kv get a score of -inf (only when S_kv is not a multiple of BLOCK_N), query
rows beyond S_q are computed on row 0 and never stored. Head dims up to 128; D is padded to a
power of two >= 16 with masked loads when needed.

Interpreter: its bf16 dot is wrong and its float32 -> bf16 cast truncates, so there the
operands stay float32 and p and the output are rounded to bf16 with numerics.round_to_bf16,
which keeps the same rounding steps as on a GPU.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from dcgen_quant.capabilities import triton_interpret

from . import tuning
from .numerics import cast_to, round_to_bf16, to_f32

INTERPRETED = triton_interpret()  # how this module's kernels were built (jit vs interpreter)

LOG2E = 1.4426950408889634


@triton.jit
def _as_dot_operand(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> the 16-bit dot operand dtype, rounded to nearest even (float32 holding the
    rounded values in the interpreter)."""
    if INTERPRET:
        if tl.bfloat16 == DTYPE:
            return round_to_bf16(x)
        else:
            return x.to(DTYPE).to(tl.float32)
    else:
        return x.to(DTYPE)


@tuning.even_tiles(M="S_q", N="S_kv")
@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    S_q, S_kv, H, qk_scale,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d, so_b, so_h, so_s, so_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    FP32: tl.constexpr = tl.float32 == DTYPE

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm_safe = tl.where(rm < S_q, rm, 0) if not EVEN_M else rm
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_ptrs = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    q_ptrs = q_ptrs + rm_safe[:, None].to(tl.int64) * sq_s + d[None, :] * sq_d
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=d_mask[None, :], other=0.0)
    if INTERPRET:
        q = to_f32(q, INTERPRET)

    k_base = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
    rn0 = tl.arange(0, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, S_kv, BLOCK_N):
        rn = n0 + rn0
        rn_safe = tl.where(rn < S_kv, rn, 0) if not EVEN_N else rn
        k_ptrs = k_base + rn_safe[:, None].to(tl.int64) * sk_s + d[None, :] * sk_d
        v_ptrs = v_base + rn_safe[:, None].to(tl.int64) * sv_s + d[None, :] * sv_d
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        if INTERPRET:
            k = to_f32(k, INTERPRET)
            v = to_f32(v, INTERPRET)
        if FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where((rn < S_kv)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(_as_dot_operand(p, DTYPE, INTERPRET), v, acc * alpha[:, None])
        m_i = m_new

    out = cast_to(acc / l_i[:, None], DTYPE, INTERPRET)
    o_ptrs = o_ptr + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    o_ptrs = o_ptrs + rm[:, None].to(tl.int64) * so_s + d[None, :] * so_d
    tl.store(o_ptrs, out, mask=(rm < S_q)[:, None] & d_mask[None, :])


@functools.cache
def _tuned(arch: str):
    return triton.autotune(
        configs=tuning.configs_for(tuning.ATTENTION_CONFIGS, arch),
        key=["S_q", "S_kv", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": tuning.prune_attention},
    )(_attention_kernel)


def prepare(q, k, scale, name: str):
    """The output and softmax scale of an attention call (shared with flash_attn_8bit).

    Returns (o, scale): o [B, H, S_q, D] empty, contiguous, q.dtype; scale 1/sqrt(D) unless
    given, or None when o is empty (nothing to compute). ValueError when k has no tokens.
    """
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    if o.numel() == 0:
        return o, None
    if k.shape[2] == 0:
        raise ValueError(f"{name}: k and v have no tokens (S_kv = 0); softmax is undefined")
    return o, 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)


def attention(q, k, v, scale, interpret):
    """Launch flash attention (arguments as ``dcgen_quant.ops.attention``).

    Parameters
    ----------
    q : Tensor [B, H, S_q, D]; k, v : Tensor [B, H, S_kv, D]; one dtype (bf16 / fp16 / fp32)
    scale : float or None (1/sqrt(D))

    Returns
    -------
    o : Tensor [B, H, S_q, D], q.dtype, contiguous
    """
    bsz, heads, s_q, d = q.shape
    s_kv = k.shape[2]
    o, scale = prepare(q, k, scale, "attention")
    if scale is None:
        return o
    kernel, cfg = tuning.launch_plan(
        _attention_kernel, _tuned, tuning.ATTENTION_CONFIGS, tuning.prune_attention,
        {"o_ptr": o, "S_q": s_q, "HEAD_DIM": d}, q.device, interpret,
        tuning.attention_interpret_config(s_q, s_kv),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(s_q, meta["BLOCK_M"]), bsz * heads)

    kernel[grid](
        q, k, v, o,
        s_q, s_kv, heads, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        HEAD_DIM=d, BLOCK_D=tuning.pow2_at_least(d), INTERPRET=interpret,
        **cfg,
    )  # fmt: skip
    return o
