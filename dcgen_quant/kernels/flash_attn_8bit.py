"""8-bit flash attention: INT8 Q.K^T and FP8 (E4M3) P.V, float32 softmax statistics.

Quantization (two small kernels before the attention kernel; SageAttention-style):

* K is centred per (batch, head) on its mean over the sequence, ``k - mean_s(k)``: every score
  of a query row shifts by the same ``q . mean``, which softmax ignores, and the centred keys
  quantize better (DiT keys carry large per-channel offsets).
* Q and the centred K are quantized to INT8 per token (a block of one row): ``s = amax / 127``,
  ``code = rne(x / s)``; the scales are float32 [B, H, S]; the softmax scale * log2(e) is folded
  into the Q scales.
* V is centred the same way (``v - mean_s(v)``; softmax rows sum to one, so the mean is added
  back to the output) and quantized to E4M3 per channel over the sequence:
  ``sv[d] = amax_s |v_c[:, d]| / 448``.

Attention kernel (same tiling as flash_attn.py): ``s = dot_int8(q8, k8^T) * sq[:, None] *
sk[None, :]`` (int32 -> float32), online softmax in float32, then P (in [0, 1]) times 256 is
rounded to E4M3 (a power-of-two scale keeps small probabilities out of the E4M3 subnormals)
and ``acc += dot_fp8(p8, v8)``; the output is ``acc * sv / (256 * l) + mean_s(v)``. Row sums l
use the unquantized p.

Accuracy: E4M3 keeps 3 mantissa bits, so each quantized V element carries a relative rounding
error of up to 2**-4; attention outputs are averages of V rows, so this error does not average
away relative to the output. On random Gaussian inputs the output's relative L2 error is about
3.5% (cosine similarity to the 16-bit kernel about 0.9994; tests/kernels/test_attention.py
measures it), against about 0.2% for the 16-bit kernel.

Tensor cores: s8 wgmma for Q.K^T and e4m3 wgmma for P.V on sm_90; mma.sync on sm_89/sm_120.
In the interpreter the dots run in float32 on the exactly decoded 8-bit values and E4M3
rounding uses numerics.round_to_e4m3 (the interpreter's float8 cast truncates).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dcgen_quant.capabilities import triton_interpret

from . import tuning
from .flash_attn import prepare
from .numerics import cast_to, int_to_float, rint, round_to_e4m3, to_f32

INTERPRETED = triton_interpret()  # how this module's kernels were built (jit vs interpreter)

LOG2E = 1.4426950408889634
P_SCALE = 256.0  # P * 256 in E4M3: p >= 2**-17 stays normal-ish, p = 1 -> 256 <= 448


@triton.jit
def _to_e4m3(x, INTERPRET: tl.constexpr):
    """float32 (|x| <= 448) -> float8 E4M3, round to nearest even."""
    if INTERPRET:
        mag = round_to_e4m3(tl.minimum(tl.abs(x), 448.0), INTERPRET)
        return tl.where(x < 0, -mag, mag).to(tl.float8e4nv)
    else:
        return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _load_rows(x_ptr, bh, H, rs, d, S, s_b, s_h, s_s, s_d, INTERPRET: tl.constexpr):
    """Rows ``rs`` (all of head dim ``d``) of head ``bh`` = b * H + h of a strided
    [B, H, S, D] tensor, as float32 [len(rs), len(d)]; rows >= S read as 0."""
    base = x_ptr + (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h
    x = tl.load(base + rs[:, None].to(tl.int64) * s_s + d[None, :] * s_d,
                mask=(rs < S)[:, None], other=0.0)  # fmt: skip
    return to_f32(x, INTERPRET)


@triton.jit
def _quantize_rows_int8_kernel(
    x_ptr, mean_ptr, out_ptr, scale_ptr,
    S, H, extra_scale,
    sx_b, sx_h, sx_s, sx_d,
    HEAD_DIM: tl.constexpr, CENTER: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """x [B, H, S, D] -> out [B, H, S, D] int8 (contiguous), scale [B, H, S] float32."""
    bh = tl.program_id(1)
    rs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    s_mask = rs < S
    x = _load_rows(x_ptr, bh, H, rs, d, S, sx_b, sx_h, sx_s, sx_d, INTERPRET)
    if CENTER:
        x = x - tl.load(mean_ptr + bh.to(tl.int64) * HEAD_DIM + d)[None, :]
    amax = tl.max(tl.abs(x), axis=1)
    s = amax / 127.0
    s = tl.where(s > 0, s, 1.0)
    code = tl.minimum(tl.maximum(rint(x / s[:, None], INTERPRET), -127.0), 127.0)
    row = bh.to(tl.int64) * S + rs
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], code.to(tl.int8),
             mask=s_mask[:, None])  # fmt: skip
    tl.store(scale_ptr + row, s * extra_scale, mask=s_mask)


@triton.jit
def _quantize_v_fp8_kernel(
    v_ptr, vmean_ptr, vscale_ptr, out_ptr, S, H,
    sv_b, sv_h, sv_s, sv_d,
    HEAD_DIM: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """(v [B, H, S, D] - vmean [B, H, D]) / vscale [B, H, D] -> out [B, H, S, D] float8 E4M3
    (contiguous)."""
    bh = tl.program_id(1)
    rs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    s_mask = rs < S
    v = _load_rows(v_ptr, bh, H, rs, d, S, sv_b, sv_h, sv_s, sv_d, INTERPRET)
    sv = tl.load(vscale_ptr + bh.to(tl.int64) * HEAD_DIM + d)
    vm = tl.load(vmean_ptr + bh.to(tl.int64) * HEAD_DIM + d)
    row = bh.to(tl.int64) * S + rs
    v8 = _to_e4m3((v - vm[None, :]) / sv[None, :], INTERPRET)
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], v8, mask=s_mask[:, None])


@tuning.even_tiles(M="S_q", N="S_kv")
@triton.jit
def _attention_8bit_kernel(
    q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, vmean_ptr, o_ptr,
    S_q, S_kv, H,
    so_b, so_h, so_s, so_d,
    HEAD_DIM: tl.constexpr, P_SCALE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """q8, k8 [B, H, S, D] int8, v8 [B, H, S_kv, D] e4m3, all contiguous; qs, ks [B, H, S]
    float32 (qs includes scale * log2(e)); vs, vmean [B, H, D] float32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm_safe = tl.where(rm < S_q, rm, 0) if not EVEN_M else rm
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (bh * S_q + rm_safe)[:, None] * HEAD_DIM + d[None, :])
    qs = tl.load(qs_ptr + bh * S_q + rm_safe)
    if INTERPRET:
        q = q.to(tl.float32)
    rn0 = tl.arange(0, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for n0 in range(0, S_kv, BLOCK_N):
        rn = n0 + rn0
        rn_safe = tl.where(rn < S_kv, rn, 0) if not EVEN_N else rn
        kv_rows = (bh * S_kv + rn_safe)[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(k_ptr + kv_rows)
        v = tl.load(v_ptr + kv_rows)
        ks = tl.load(ks_ptr + bh * S_kv + rn_safe)
        if INTERPRET:
            s = tl.dot(q, tl.trans(k.to(tl.float32)))
        else:
            s = int_to_float(tl.dot(q, tl.trans(k), out_dtype=tl.int32))  # |s| < 127**2 * 128
        s = s * qs[:, None] * ks[None, :]
        if not EVEN_N:
            s = tl.where((rn < S_kv)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p8 = _to_e4m3(p * P_SCALE, INTERPRET)
        if INTERPRET:
            acc = tl.dot(p8.to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
        else:
            acc = tl.dot(p8, v, acc * alpha[:, None])
        m_i = m_new

    vs = tl.load(vs_ptr + bh * HEAD_DIM + d)
    vm = tl.load(vmean_ptr + bh * HEAD_DIM + d)
    out = acc * vs[None, :] / (l_i[:, None] * P_SCALE) + vm[None, :]
    DTYPE: tl.constexpr = o_ptr.dtype.element_ty
    out = cast_to(out, DTYPE, INTERPRET)
    o_ptrs = o_ptr + b * so_b + h * so_h + rm[:, None].to(tl.int64) * so_s + d[None, :] * so_d
    tl.store(o_ptrs, out, mask=(rm < S_q)[:, None])


@functools.cache
def _tuned(arch: str):
    return triton.autotune(
        configs=tuning.configs_for(tuning.ATTENTION_CONFIGS, arch),
        key=["S_q", "S_kv", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": tuning.prune_attention},
    )(_attention_8bit_kernel)


def quantize_qkv(q, k, v, scale, interpret, block_s=128):
    """The 8-bit operands of :func:`attention_8bit` (exposed for tests and the benchmark).

    Returns
    -------
    q8 [B, H, S_q, D] int8, qs [B, H, S_q] float32 (times scale * log2 e),
    k8 [B, H, S_kv, D] int8 (mean-centred), ks [B, H, S_kv] float32,
    v8 [B, H, S_kv, D] float8_e4m3fn (mean-centred), vs, vmean [B, H, D] float32
    """
    bsz, heads, s_q, d = q.shape
    s_kv = k.shape[2]
    dev = q.device
    k_mean = k.float().mean(dim=2).contiguous()  # [B, H, D]
    v_mean = v.float().mean(dim=2, keepdim=True)  # [B, H, 1, D]
    vs = ((v.float() - v_mean).abs().amax(dim=2) / 448.0).clamp_min(1e-30).contiguous()
    v_mean = v_mean.squeeze(2).contiguous()  # [B, H, D]
    q8 = torch.empty((bsz, heads, s_q, d), dtype=torch.int8, device=dev)
    k8 = torch.empty((bsz, heads, s_kv, d), dtype=torch.int8, device=dev)
    v8 = torch.empty((bsz, heads, s_kv, d), dtype=torch.float8_e4m3fn, device=dev)
    qs = torch.empty((bsz, heads, s_q), dtype=torch.float32, device=dev)
    ks = torch.empty((bsz, heads, s_kv), dtype=torch.float32, device=dev)
    for x, mean, out, sc, extra, s in (
        (q, k_mean, q8, qs, scale * LOG2E, s_q),
        (k, k_mean, k8, ks, 1.0, s_kv),
    ):
        _quantize_rows_int8_kernel[(triton.cdiv(s, block_s), bsz * heads)](
            x, mean, out, sc, s, heads, extra, *x.stride(),
            HEAD_DIM=d, CENTER=x is k, INTERPRET=interpret, BLOCK_S=block_s,
        )  # fmt: skip
    _quantize_v_fp8_kernel[(triton.cdiv(s_kv, block_s), bsz * heads)](
        v, v_mean, vs, v8, s_kv, heads, *v.stride(),
        HEAD_DIM=d, INTERPRET=interpret, BLOCK_S=block_s,
    )  # fmt: skip
    return q8, qs, k8, ks, v8, vs, v_mean


def attention_8bit(q, k, v, scale, interpret):
    """8-bit attention (see the module docstring); arguments as ``dcgen_quant.ops.attention``.

    Parameters
    ----------
    q : Tensor [B, H, S_q, D]; k, v : Tensor [B, H, S_kv, D]; bfloat16 / float16; D = 64 / 128
    scale : float or None (1/sqrt(D))

    Returns
    -------
    o : Tensor [B, H, S_q, D], q.dtype, contiguous
    """
    bsz, heads, s_q, d = q.shape
    s_kv = k.shape[2]
    o, scale = prepare(q, k, scale, "attention_8bit")
    if scale is None:
        return o
    q8, qs, k8, ks, v8, vs, v_mean = quantize_qkv(q, k, v, scale, interpret)
    kernel, cfg = tuning.launch_plan(
        _attention_8bit_kernel, _tuned, tuning.ATTENTION_CONFIGS, tuning.prune_attention,
        {"o_ptr": o, "S_q": s_q, "HEAD_DIM": d}, q.device, interpret,
        tuning.attention_interpret_config(s_q, s_kv),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(s_q, meta["BLOCK_M"]), bsz * heads)

    kernel[grid](
        q8, qs, k8, ks, v8, vs, v_mean, o,
        s_q, s_kv, heads, *o.stride(),
        HEAD_DIM=d, P_SCALE=P_SCALE, INTERPRET=interpret,
        **cfg,
    )  # fmt: skip
    return o
