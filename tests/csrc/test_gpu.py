"""The CUDA kernels against the pure-torch references, on a GPU (skipped without one).

Tolerances (DESIGN.md): quantize_act bit for bit (codes and scales; lora_act to float32
rounding); GEMMs within 2x of the error the reference computation itself has in the output
dtype, both measured against a float64 result. Shapes include 1, odd, non-power-of-two and
tile-boundary sizes; inputs are seeded random; outputs are fresh allocations the kernels must
fully overwrite (torch.empty, checked against NaN-free references). Unsigned INT4 activations
(act_unsigned) mirror the signed cases on GELU-like inputs.
"""

import pytest
import torch

from dcgen_quant import ops
from dcgen_quant.formats import (
    UNSIGNED_ACT_SHIFT,
    dequantize_activation,
    dequantize_weight,
    quantize_weight,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cb():
    from dcgen_quant import cuda_backend

    if reason := cuda_backend.unavailable_reason():
        pytest.skip(reason)
    return cuda_backend


def _cc():
    return torch.cuda.get_device_capability()


def _fmt_ok(cb, op, fmt):
    from dcgen_quant import _C

    code = {"quantize_act": _C.OP_QUANTIZE_ACT, "gemm_w4a4": _C.OP_GEMM_W4A4,
            "gemm_w4a16": _C.OP_GEMM_W4A16}[op]  # fmt: skip
    fcode = _C.FORMAT_NVFP4 if fmt == "nvfp4" else _C.FORMAT_INT4
    if _C.check_compute_capability(code, fcode, *_cc()):
        pytest.skip(_C.last_error_message())


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("layout", ["canonical", "split_halves"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (7, 192, 4), (33, 320, 32), (129, 3072, 32),
                                   (300, 1088, 13), (64, 256, 128)])  # fmt: skip
def test_quantize_act_bit_exact(cb, fmt, layout, dtype, m, k, r):
    _fmt_ok(cb, "quantize_act", fmt)
    g = torch.Generator().manual_seed(m + k + r)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 8).to(dtype)
    smooth = (torch.rand(k, generator=g) * 2 + 0.05).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype) if r else None
    want = ops.quantize_act_reference(x, smooth, down, fmt, layout)
    dev = [t.cuda() if t is not None else None for t in (x, smooth, down)]
    q, s, la = cb.quantize_act(*dev, fmt, layout)
    assert torch.equal(q.cpu(), want[0])
    assert torch.equal(_bits(s.cpu()), _bits(want[1]))
    assert la.shape == want[2].shape
    if r:
        torch.testing.assert_close(la.cpu(), want[2], rtol=1e-5, atol=1e-5)


def _gelu_like(m, k, dtype, g):
    """GELU outputs (>= -0.16997) with about 3% of the entries below -0.171875 (code 0)."""
    x = torch.nn.functional.gelu(torch.randn(m, k, generator=g) * 3 * torch.rand(m, 1, generator=g))
    low = torch.rand(m, k, generator=g) < 0.03
    return torch.where(low, -UNSIGNED_ACT_SHIFT - torch.rand(m, k, generator=g), x).to(dtype)


@pytest.mark.parametrize("layout", ["canonical", "split_halves"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (7, 192, 4), (33, 320, 32), (129, 3072, 32),
                                   (300, 1088, 13), (64, 256, 128)])  # fmt: skip
def test_quantize_act_unsigned_bit_exact(cb, layout, dtype, m, k, r):
    _fmt_ok(cb, "quantize_act", "int4")
    g = torch.Generator().manual_seed(m + k + r + 1)
    x = _gelu_like(m, k, dtype, g)
    smooth = (torch.rand(k, generator=g) * 2 + 0.05).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype) if r else None
    for s_ in (smooth, None):
        want = ops.quantize_act_reference(x, s_, down, "int4", layout, True)
        dev = [t.cuda() if t is not None else None for t in (x, s_, down)]
        q, s, la = cb.quantize_act(*dev, "int4", layout, True)
        assert torch.equal(q.cpu(), want[0])
        assert torch.equal(_bits(s.cpu()), _bits(want[1]))
        assert la.shape == want[2].shape
        if r:  # on the unshifted x
            torch.testing.assert_close(la.cpu(), want[2], rtol=1e-5, atol=1e-5)


def _gemm_problem(m, n, k, r, fmt, dtype, bias, seed, act_unsigned=False):
    g = torch.Generator().manual_seed(seed)
    if act_unsigned:
        x = _gelu_like(m, k, dtype, g)
    else:
        x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(dtype)
    q, s, _ = ops.quantize_act_reference(x, None, None, fmt, "canonical", act_unsigned)
    qw = quantize_weight(torch.randn(n, k, generator=g) / k**0.5, fmt, dtype)
    la = torch.randn(m, r, generator=g) if r else None
    up = (torch.randn(n, r, generator=g) / r**0.5).to(dtype) if r else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return q, s, qw, la, up, b


def _float64_gemm(q, s, qw, la, up, b, fmt, act_unsigned=False):
    a = dequantize_activation(q, s, fmt, act_unsigned).double()
    y = a @ dequantize_weight(qw, apply_tensor_scale=False).double().t()
    if qw.wtscale is not None:
        y = y * qw.wtscale.double()
    if la is not None:
        y = y + la.double() @ up.double().t()
    return y + b.double() if b is not None else y


GEMM_SHAPES = [(1, 8, 64, 0), (7, 97, 192, 4), (127, 128, 128, 32), (129, 200, 3072, 32),
               (300, 3072, 1088, 13), (256, 256, 4096, 32)]  # fmt: skip


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("m,n,k,r", GEMM_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("variant", ["auto", "mma", "wgmma"])
def test_gemm_w4a4_within_twice_the_reference_error(cb, monkeypatch, fmt, m, n, k, r, out_dtype,
                                                    variant):  # fmt: skip
    _fmt_ok(cb, "gemm_w4a4", fmt)
    if variant == "wgmma" and (_cc() != (9, 0) or fmt != "int4"):
        pytest.skip("wgmma is the sm_90a INT4 kernel")
    if fmt == "nvfp4":
        k = max(16, k - 48)  # K % 64 != 0 for NVFP4: ragged k64 steps
    monkeypatch.setenv("DCGEN_QUANT_CUDA_GEMM", variant)
    dtype = torch.float16 if out_dtype == torch.float16 else torch.bfloat16
    for bias in (True, False):
        q, s, qw, la, up, b = _gemm_problem(m, n, k, r, fmt, dtype, bias, m * n + k)
        y64 = _float64_gemm(q, s, qw, la, up, b, fmt)
        args = [q, s, qw.qweight, qw.wscales, la, up, b, qw.wtscale]
        ref = ops.gemm_w4a4_reference(*args, fmt, out_dtype)
        dev_args = [t.cuda() if t is not None else None for t in args]
        y = cb.gemm_w4a4(*dev_args, fmt, out_dtype, "canonical")
        assert y.dtype == out_dtype and y.shape == (m, n)
        assert torch.isfinite(y).all()
        err, ref_err = rel(y.cpu(), y64), rel(ref, y64)
        assert err <= 2 * ref_err + 1e-12, (err, ref_err)


@pytest.mark.parametrize("m,n,k,r", GEMM_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("variant", ["auto", "mma", "wgmma"])
def test_gemm_w4a4_unsigned_within_twice_the_reference_error(cb, monkeypatch, m, n, k, r,
                                                             out_dtype, variant):  # fmt: skip
    """INT4 with unsigned activation codes 0..15 (u4.s4 / u8.s8 MMAs), against the reference
    that reads q as unsigned; a kernel that read the codes as signed would be off by 16 * scale
    on every code >= 8."""
    _fmt_ok(cb, "gemm_w4a4", "int4")
    if variant == "wgmma" and _cc() != (9, 0):
        pytest.skip("wgmma is the sm_90a INT4 kernel")
    monkeypatch.setenv("DCGEN_QUANT_CUDA_GEMM", variant)
    dtype = torch.float16 if out_dtype == torch.float16 else torch.bfloat16
    for bias in (True, False):
        q, s, qw, la, up, b = _gemm_problem(m, n, k, r, "int4", dtype, bias, m * n + k + 1, True)
        if m * k >= 1024:  # codes 8..15, which a signed reading would get wrong, do occur
            assert ((q & 15) >= 8).any() and ((q >> 4) >= 8).any()
        y64 = _float64_gemm(q, s, qw, la, up, b, "int4", True)
        args = [q, s, qw.qweight, qw.wscales, la, up, b, qw.wtscale]
        ref = ops.gemm_w4a4_reference(*args, "int4", out_dtype, "canonical", True)
        dev_args = [t.cuda() if t is not None else None for t in args]
        y = cb.gemm_w4a4(*dev_args, "int4", out_dtype, "canonical", True)
        assert y.dtype == out_dtype and y.shape == (m, n)
        assert torch.isfinite(y).all()
        err, ref_err = rel(y.cpu(), y64), rel(ref, y64)
        assert err <= 2 * ref_err + 1e-12, (err, ref_err)


@pytest.mark.parametrize("fmt,act_unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_gemm_w4a4_split_halves_and_strided_inputs(cb, fmt, act_unsigned):
    """The same GEMM on split_halves-laid operands, and on non-contiguous views."""
    _fmt_ok(cb, "gemm_w4a4", fmt)
    from dcgen_quant.formats.layouts import to_layout

    m, n, k, r = 45, 130, 512, 32
    q, s, qw, la, up, b = _gemm_problem(m, n, k, r, fmt, torch.bfloat16, True, 7, act_unsigned)
    args = [q, s, qw.qweight, qw.wscales, la, up, b, qw.wtscale]
    dev = [t.cuda() if t is not None else None for t in args]
    want = cb.gemm_w4a4(*dev, fmt, torch.float32, "canonical", act_unsigned)
    laid = list(dev)
    laid[0] = to_layout(q, "split_halves", fmt).cuda()
    laid[2] = to_layout(qw.qweight, "split_halves", fmt).cuda()
    torch.testing.assert_close(cb.gemm_w4a4(*laid, fmt, torch.float32, "split_halves",
                                            act_unsigned), want, rtol=0, atol=0)  # fmt: skip
    wide = torch.zeros(m, k // 2 + 16, dtype=torch.uint8, device=dev[0].device)
    wide[:, 8 : 8 + k // 2] = dev[0]
    strided = list(dev)
    strided[0] = wide[:, 8 : 8 + k // 2]  # row stride k/2 + 16, 8-byte offset: 8-byte copies
    torch.testing.assert_close(cb.gemm_w4a4(*strided, fmt, torch.float32, "canonical",
                                            act_unsigned), want, rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("layout", ["canonical", "split_halves"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 1, 64), (1, 3072, 3072), (2, 97, 192), (5, 200, 1088),
                                   (64, 128, 256)])  # fmt: skip
def test_gemm_w4a16_within_twice_the_reference_error(cb, fmt, layout, dtype, m, n, k):
    _fmt_ok(cb, "gemm_w4a16", fmt)
    from dcgen_quant.formats.layouts import to_layout

    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    qw = quantize_weight(torch.randn(n, k, generator=g) / k**0.5, fmt, dtype)
    b = torch.randn(n, generator=g).to(dtype)
    w64 = dequantize_weight(qw, apply_tensor_scale=False).double()
    y64 = x.double() @ w64.t()
    if qw.wtscale is not None:
        y64 = y64 * qw.wtscale.double()
    y64 = y64 + b.double()
    ref = ops.gemm_w4a16_reference(x, qw.qweight, qw.wscales, b, qw.wtscale, fmt)
    laid = to_layout(qw.qweight, layout, fmt)
    dev = [t.cuda() if t is not None else None for t in (x, laid, qw.wscales, b, qw.wtscale)]
    y = cb.gemm_w4a16(*dev, fmt, layout)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y.cpu(), y64) <= 2 * rel(ref, y64) + 1e-12


@pytest.mark.parametrize("fmt,act_unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_svdq_linear_through_the_cuda_backend(cb, fmt, act_unsigned):
    """A whole SVDQLinear forward with backend cuda equals the reference backend's codes and
    stays within twice its error (act_unsigned: a GELU-output layer with unsigned codes)."""
    _fmt_ok(cb, "gemm_w4a4", fmt)
    from dcgen_quant.nn import SVDQLinear

    g = torch.Generator().manual_seed(3)
    layer = SVDQLinear(256, 192, rank=16, fmt=fmt, dtype=torch.bfloat16, act_unsigned=act_unsigned)
    qw = quantize_weight(torch.randn(192, 256, generator=g) / 16, fmt, torch.bfloat16)
    layer.qweight.copy_(qw.qweight)
    layer.wscales.copy_(qw.wscales)
    if qw.wtscale is not None:
        layer.wtscale.copy_(qw.wtscale)
    layer.smooth_factor.copy_((torch.rand(256, generator=g) + 0.5).to(torch.bfloat16))
    layer.proj_down.copy_((torch.randn(256, 16, generator=g) / 16).to(torch.bfloat16))
    layer.proj_up.copy_((torch.randn(192, 16, generator=g) / 4).to(torch.bfloat16))
    layer.bias.copy_(torch.randn(192, generator=g).to(torch.bfloat16))
    layer = layer.cuda()
    if act_unsigned:
        x = _gelu_like(3 * 37, 256, torch.bfloat16, g).reshape(3, 37, 256).cuda()
    else:
        x = torch.randn(3, 37, 256, generator=g).to(torch.bfloat16).cuda()
    try:
        ops.set_backend("reference")
        ref = layer(x)
        ops.set_backend("cuda")
        y = layer(x)
    finally:
        ops.set_backend("auto")
    assert y.shape == ref.shape and y.dtype == ref.dtype
    flat = x.reshape(-1, 256).cpu()
    q, s, la = ops.quantize_act_reference(
        flat, layer.smooth_factor.cpu(), layer.proj_down.cpu(), fmt, "canonical", act_unsigned
    )
    y64 = _float64_gemm(q, s, qw, la, layer.proj_up.cpu(), layer.bias.cpu(), fmt, act_unsigned)
    assert rel(y.reshape(-1, 192).cpu(), y64) <= 2 * rel(ref.reshape(-1, 192).cpu(), y64) + 1e-12


def test_unsupported_calls_raise_backend_unsupported(cb):
    x = torch.randn(4, 64, device="cuda")  # float32 activations: not served by the kernels
    with pytest.raises(ops.BackendUnsupported, match="bfloat16 or float16"):
        cb.quantize_act(x, None, None, "int4", "canonical")
    qw = quantize_weight(torch.randn(8, 64), "int4", torch.bfloat16)
    big = torch.randn(cb.W4A16_MAX_M + 1, 64, device="cuda").to(torch.bfloat16)
    with pytest.raises(ops.BackendUnsupported, match="GEMV"):
        cb.gemm_w4a16(big, qw.qweight.cuda(), qw.wscales.cuda(), None, None, "int4", "canonical")
    with pytest.raises(ops.BackendUnsupported, match="no attention kernel"):
        cb.attention(x[None, None], x[None, None], x[None, None], None)
    # unsigned activation codes exist for INT4 only: the library's INVALID_ARGUMENT
    xb = x.to(torch.bfloat16)
    with pytest.raises(ValueError, match="unsigned activations exist for DCGQ_FORMAT_INT4"):
        cb.quantize_act(xb, None, None, "nvfp4", "canonical", True)


def test_c_example_end_to_end_on_the_gpu(cb, tmp_path):
    """examples/abi_example.c on the GPU: quantize_act equals the CPU bit for bit, and the INT4
    W4A4 GEMM with low-rank branch and bias matches a float64 host computation, with signed and
    with unsigned activation codes."""
    import subprocess

    _fmt_ok(cb, "gemm_w4a4", "int4")
    from ._build import compile_example

    proc = subprocess.run([str(compile_example(tmp_path))], capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for kind in ("signed", "unsigned"):
        assert f"GPU codes and scales equal the CPU's bit for bit ({kind}): yes" in out
        assert f"gemm_w4a4 on the GPU ({kind} activations)" in out
    assert out.rstrip().endswith("OK")
