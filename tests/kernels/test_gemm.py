"""GEMM kernels (W4A4 INT4 / NVFP4 with the fused low-rank branch, W4A16): within twice the
reference's own error against float64, every layout, ragged M/N/K, optional terms, unsigned
INT4 activations."""

from __future__ import annotations

import pytest
import torch

from dcgen_quant import kernels, ops
from dcgen_quant.formats import dequantize_activation, quantize_weight
from dcgen_quant.formats.layouts import CANONICAL, from_layout, to_layout

from .accuracy import assert_within_reference_error
from .test_quantize_act import gelu_inputs

pytestmark = pytest.mark.interpreter

FMTS = ["int4", "nvfp4"]
# (M, N, K, r): every M in {1, 3, 97, 256}, N in {64, 192, 3072}, K in {64, 128, 3072}
SLOW = pytest.mark.slow
SHAPES = [
    (1, 64, 64, 32),
    (3, 192, 128, 0),
    (97, 3072, 128, 32),
    pytest.param(256, 192, 3072, 8, marks=SLOW),
]


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def make_w4a4(m, n, k, r, fmt, layout, dtype=torch.bfloat16, bias=True, seed=0,
              act_unsigned=False):  # fmt: skip
    """Quantized activations and weight in ``layout`` (all on CPU). ``act_unsigned``: GELU-like
    activations (some below -UNSIGNED_ACT_SHIFT) quantized to unsigned codes."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))).to(dtype)
    if act_unsigned:
        x = gelu_inputs(m, k, 0, dtype, seed)[0]
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype) if r else None
    up = (torch.randn(n, r, generator=g) / r**0.5).to(dtype) if r else None
    w = torch.randn(n, k, generator=g) / k**0.5
    qw = quantize_weight(w, fmt, dtype)
    q, s, la = ops.quantize_act_reference(x, smooth, down, fmt, layout, act_unsigned)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    la = la if r else None
    return q, s, to_layout(qw.qweight, layout, fmt), qw.wscales, la, up, b, qw.wtscale


def w4a4_truth(q, s, qweight, wscales, la, up, b, wt, fmt, layout, act_unsigned=False):
    """float64 result of the exact computation (exact dequantization, float64 matmuls)."""
    a = dequantize_activation(from_layout(q, layout, fmt), s, fmt, act_unsigned).double()
    w = ops._dequantize_weight_no_tensor_scale(from_layout(qweight, layout, fmt), wscales, fmt)
    y = a @ w.double().t()
    if wt is not None:
        y = y * wt.double()
    if la is not None:
        y = y + la.double() @ up.double().t()
    if b is not None:
        y = y + b.double()
    return y


def check_w4a4(args, fmt, out_dtype, layout, device, what, act_unsigned=False):
    y = kernels.gemm_w4a4(*on(device, *args), fmt, out_dtype, layout, act_unsigned).cpu()
    assert y.dtype == out_dtype
    baseline = ops.gemm_w4a4_reference(*args, fmt, out_dtype, layout, act_unsigned)
    truth = w4a4_truth(*args, fmt, layout, act_unsigned)
    return assert_within_reference_error(y, baseline, truth, what)


@pytest.mark.parametrize(
    "layout,out_dtype",
    [("preferred", torch.bfloat16), ("preferred", torch.float32), (CANONICAL, torch.float16)],
)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k,r", SHAPES)
def test_gemm_w4a4(m, n, k, r, fmt, layout, out_dtype, device):
    layout = kernels.preferred_layout(fmt) if layout == "preferred" else layout
    dtype = torch.float16 if out_dtype == torch.float16 else torch.bfloat16
    args = make_w4a4(m, n, k, r, fmt, layout, dtype, bias=r != 0, seed=m + n + k)
    check_w4a4(args, fmt, out_dtype, layout, device, f"{fmt}/{layout} M={m} N={n} K={k} r={r}")


# (M, N, K, r) for unsigned activations: every M in {1, 3, 97, 256}, N in {64, 192}, K in {64,
# 128, 3072}
UNSIGNED_SHAPES = [
    (1, 192, 3072, 32),
    (3, 64, 64, 0),
    (97, 192, 128, 16),
    (256, 64, 128, 8),
]


@pytest.mark.parametrize(
    "layout,out_dtype",
    [("split_halves", torch.bfloat16), ("split_halves", torch.float32), (CANONICAL, torch.float16)],
)
@pytest.mark.parametrize("m,n,k,r", UNSIGNED_SHAPES)
def test_gemm_w4a4_unsigned_activations(m, n, k, r, layout, out_dtype, device):
    dtype = torch.float16 if out_dtype == torch.float16 else torch.bfloat16
    args = make_w4a4(m, n, k, r, "int4", layout, dtype, bias=r != 0, seed=m + n + k,
                     act_unsigned=True)  # fmt: skip
    codes = from_layout(args[0], layout, "int4")
    assert (codes >> 4).max() == 15 or (codes & 15).max() == 15  # codes above 7 occur
    what = f"unsigned int4/{layout}/{out_dtype} M={m} N={n} K={k} r={r}"
    check_w4a4(args, "int4", out_dtype, layout, device, what, act_unsigned=True)
    # the same bytes read as signed codes give a different product, so the check above tells
    # the two readings apart
    signed = ops.gemm_w4a4_reference(*args, "int4", torch.float32, layout)
    assert not torch.equal(signed, ops.gemm_w4a4_reference(*args, "int4", torch.float32, layout,
                                                           True))  # fmt: skip


def test_gemm_w4a4_unsigned_extreme_codes(device):
    """Codes 15 against weight codes -8 in every element of a group: the largest int32 group
    partial, |64 * 15 * -8| = 7680, and the all-zero codes of groups below the shift."""
    m, n, k = 5, 64, 192
    q = torch.full((m, k // 2), 0xFF, dtype=torch.uint8)
    q[1] = 0  # codes 0 (a row that was all below -UNSIGNED_ACT_SHIFT)
    q[2, :32] = 0xF0  # high nibbles 15, low nibbles 0
    qweight = torch.full((n, k // 2), 0x88, dtype=torch.uint8)  # weight codes -8
    qweight[1::2, 32:] = 0x77  # codes 7 in odd rows beyond the first group
    g = torch.Generator().manual_seed(9)
    scales = (torch.rand(m, k // 64, generator=g) + 0.5).bfloat16()
    wscales = (torch.rand(k // 64, n, generator=g) + 0.5).bfloat16()
    args = (q, scales, qweight, wscales, None, None, None, None)
    for layout in (CANONICAL, "split_halves"):
        check_w4a4(args, "int4", torch.float32, layout, device, f"extreme codes {layout}", True)


@pytest.mark.parametrize("fmt", FMTS)
def test_gemm_w4a4_other_layout_and_lora_without_bias(fmt, device):
    other = "split_halves" if kernels.preferred_layout(fmt) == CANONICAL else CANONICAL
    args = list(make_w4a4(33, 80, 192, 16, fmt, other, seed=5))
    args[6] = None  # no bias, low-rank branch kept
    check_w4a4(args, fmt, torch.bfloat16, other, device, f"{fmt}/{other} no bias")


def _pow2_scales(shape, g):
    """Random power-of-two block scales 2**p, p in [-6, 3]: (E4M3 tensor, E8M0 bytes)."""
    p = torch.randint(-6, 4, shape, generator=g)
    e4m3 = ((p + 7) << 3).to(torch.uint8).view(torch.float8_e4m3fn)  # normal E4M3 2**p
    return e4m3, (p + 127).to(torch.uint8).view(torch.float8_e4m3fn)


def test_gemm_nvfp4_native_dot_scaled_path(device):
    """The dot_scaled main loop (what sm_100 / sm_120 run). The interpreter reads E4M3 scales as
    E8M0 (REFERENCE.md section 5), so there it is fed power-of-two scales re-encoded as E8M0:
    that checks the loop's operand layout (nibble order, transposed weight, scale indexing)."""
    from dcgen_quant.kernels import gemm_nvfp4

    if device == "cuda" and not gemm_nvfp4.native_fp4(torch.device(device)):
        pytest.skip("no block-scaled FP4 MMA on this GPU")
    g = torch.Generator().manual_seed(7)
    m, n, k, r = 70, 96, 320, 8  # ragged M, N and K (K is not a multiple of the 256 K step)
    q = torch.randint(0, 256, (m, k // 2), generator=g, dtype=torch.uint8)
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    s, s_e8m0 = _pow2_scales((m, k // 16), g)
    ws, ws_e8m0 = _pow2_scales((k // 16, n), g)
    wt = torch.tensor(0.37)
    la, up = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    fed = (s_e8m0, ws_e8m0) if device == "cpu" else (s, ws)
    y = gemm_nvfp4.gemm_w4a4_nvfp4(
        *on(device, q, fed[0], qweight, fed[1], la, up, b, wt), torch.float32, CANONICAL,
        interpret=device == "cpu", native=True,
    ).cpu()  # fmt: skip
    args = (q, s, qweight, ws, la, up, b, wt)
    baseline = ops.gemm_w4a4_reference(*args, "nvfp4", torch.float32, CANONICAL)
    truth = w4a4_truth(*args, "nvfp4", CANONICAL)
    assert_within_reference_error(y, baseline, truth, "nvfp4 native dot_scaled loop")


W4A16_CASES = [  # (M, N, K, dtype, layout)
    (1, 3072, 64, torch.bfloat16, "split_halves"),
    (3, 64, 128, torch.float16, CANONICAL),
    pytest.param(97, 192, 3072, torch.bfloat16, CANONICAL, marks=SLOW),
    (256, 64, 128, torch.float32, "split_halves"),
]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k,dtype,layout", W4A16_CASES)
def test_gemm_w4a16(m, n, k, dtype, layout, fmt, device):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    qw = quantize_weight(torch.randn(n, k, generator=g) / k**0.5, fmt, dtype)
    qweight = to_layout(qw.qweight, layout, fmt)
    b = torch.randn(n, generator=g).to(dtype) if m != 3 else None
    args = (x, qweight, qw.wscales, b, qw.wtscale)
    y = kernels.gemm_w4a16(*on(device, *args), fmt, layout).cpu()
    assert y.dtype == dtype
    baseline = ops.gemm_w4a16_reference(*args, fmt, layout)
    w = ops._dequantize_weight_no_tensor_scale(qw.qweight, qw.wscales, fmt).double()
    truth = x.double() @ w.t()
    if qw.wtscale is not None:
        truth = truth * qw.wtscale.double()
    if b is not None:
        truth = truth + b.double()
    assert_within_reference_error(y, baseline, truth, f"w4a16 {fmt}/{layout}/{dtype} M={m}")


def test_gemm_w4a16_strided_activations(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 256, generator=g).bfloat16().t().contiguous().t()  # column-major
    qw = quantize_weight(torch.randn(72, 256, generator=g), "int4", torch.bfloat16)
    y = kernels.gemm_w4a16(*on(device, x, qw.qweight, qw.wscales), None, None, "int4").cpu()
    baseline = ops.gemm_w4a16_reference(x, qw.qweight, qw.wscales, None, None, "int4")
    truth = (
        x.double()
        @ ops._dequantize_weight_no_tensor_scale(qw.qweight, qw.wscales, "int4").double().t()
    )
    assert_within_reference_error(y, baseline, truth, "w4a16 column-major x")


def test_gemm_unsupported_layout_raises(device):
    args = on(device, *make_w4a4(4, 64, 64, 0, "int4", CANONICAL, bias=False))
    with pytest.raises(ops.BackendUnsupported, match="layout 'tiles'"):
        kernels.gemm_w4a4(*args, "int4", torch.bfloat16, "tiles")
    with pytest.raises(ValueError, match="unsigned activations exist for int4 only"):
        kernels.gemm_w4a4(*args, "nvfp4", torch.bfloat16, CANONICAL, True)
