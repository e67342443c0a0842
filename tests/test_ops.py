"""Custom ops: opcheck, reference semantics against float64, argument errors, backends."""

import pytest
import torch

from dcgen_quant import ops
from dcgen_quant.formats import (
    UNSIGNED_ACT_SHIFT,
    dequantize_activation,
    dequantize_weight,
    quantize_int4,
    quantize_weight,
)
from dcgen_quant.formats.packing import pack_nibbles

FMTS = ["int4", "nvfp4"]


def make_gemm_args(m, n, k, r, fmt, dtype=torch.bfloat16, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype)
    up = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    qw = quantize_weight(w, fmt, dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, smooth, down, up, qw, b


@pytest.mark.parametrize("fmt", FMTS)
def test_opcheck_all_ops(fmt):
    x, smooth, down, up, qw, b = make_gemm_args(5, 24, 128, 8, fmt)
    ops_args = [
        (ops.quantize_act, (x, smooth, down, fmt)),
        (ops.quantize_act, (x, None, None, fmt)),
    ]
    q, s, la = ops.quantize_act(x, smooth, down, fmt)
    w_args = (qw.qweight, qw.wscales)
    ops_args += [
        (ops.gemm_w4a4, (q, s, *w_args, la, up, b, qw.wtscale, fmt, torch.bfloat16)),
        (ops.gemm_w4a4, (q, s, *w_args, None, None, None, qw.wtscale, fmt, torch.float32)),
        (ops.gemm_w4a16, (x, *w_args, b, qw.wtscale, fmt)),
    ]
    for op, args in ops_args:
        if fmt == "nvfp4":
            # torch's schema check compares inputs with allclose, which has no float8 kernel on
            # CPU; run the other checks and verify "no input mutated" bitwise ourselves.
            before = [a.view(torch.uint8).clone() if _is_fp8(a) else a for a in args]
            torch.library.opcheck(op, args, test_utils=OPCHECK_WITHOUT_SCHEMA)
            op(*args)
            for a, b in zip(args, before):
                if _is_fp8(a):
                    assert torch.equal(a.view(torch.uint8), b)
        else:
            torch.library.opcheck(op, args)


OPCHECK_WITHOUT_SCHEMA = (
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def _is_fp8(a):
    return isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn


def test_opcheck_unsigned_int4():
    x, smooth, down, up, qw, b = make_gemm_args(5, 24, 128, 8, "int4")
    x = torch.nn.functional.gelu(x.float()).to(x.dtype)
    torch.library.opcheck(ops.quantize_act, (x, smooth, down, "int4", "canonical", True))
    q, s, la = ops.quantize_act(x, smooth, down, "int4", "canonical", True)
    args = (q, s, qw.qweight, qw.wscales, la, up, b, None, "int4", torch.bfloat16)
    torch.library.opcheck(ops.gemm_w4a4, (*args, "canonical", True))


def gelu_input(m, k, seed):
    """GELU outputs (the input of a FeedForward's second linear): >= -0.17, heavy right tail."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, k, generator=g) * torch.exp(0.5 * torch.randn(k, generator=g))
    return torch.nn.functional.gelu(h, approximate="tanh").to(torch.bfloat16)


def test_unsigned_quantize_act_is_the_shifted_unsigned_contract():
    x = gelu_input(9, 192, 0)
    smooth = (torch.rand(192, generator=torch.Generator().manual_seed(1)) + 0.5).bfloat16()
    down = torch.randn(192, 4, generator=torch.Generator().manual_seed(2)).bfloat16()
    q, s, la = ops.quantize_act(x, smooth, down, "int4", "canonical", True)
    u = (x.float() + UNSIGNED_ACT_SHIFT) / smooth.float()
    assert u.min() >= 0  # GELU >= -0.16997 > -shift
    codes, scales = quantize_int4(u, 64, torch.bfloat16, unsigned=True)
    assert torch.equal(q, pack_nibbles(codes)) and torch.equal(s, scales)
    assert codes.max() == 15 and s.dtype == torch.bfloat16
    torch.testing.assert_close(la, x.float() @ down.float())  # lora_act: unshifted, unsmoothed


def test_unsigned_gemm_reads_codes_0_to_15_and_halves_the_gelu_error():
    """y = dequant(q, unsigned) @ W^T: with the shift folded into the bias, the layer output
    approximates x W^T + b with about half the error of signed codes on GELU inputs."""
    m, n, k = 64, 96, 256
    x = gelu_input(m, k, 3)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    qw = quantize_weight(w, "int4", torch.float32)
    w_q = dequantize_weight(qw).double()
    exact = x.double() @ w.double().t() + b.double()
    errors = {}
    for unsigned in (False, True):
        bias = b.double() - (UNSIGNED_ACT_SHIFT * w_q.sum(1) if unsigned else 0)
        q, s, _ = ops.quantize_act(x, None, None, "int4", "canonical", unsigned)
        args = (q, s, qw.qweight, qw.wscales, None, None, bias.float(), None, "int4")
        y = ops.gemm_w4a4(*args, torch.float32, "canonical", unsigned).double()
        a = dequantize_activation(q, s, "int4", unsigned).double()
        assert ((y - (a @ w_q.t() + bias)).norm() / y.norm()).item() < 1e-6
        errors[unsigned] = ((y - exact).norm() / exact.norm()).item()
    assert errors[True] < 0.75 * errors[False], errors


def test_unsigned_is_int4_only():
    x, smooth, down, up, qw, b = make_gemm_args(4, 64, 128, 4, "nvfp4")
    with pytest.raises(ValueError, match="unsigned activations exist for int4 only"):
        ops.quantize_act(x, smooth, down, "nvfp4", "canonical", True)
    q, s, la = ops.quantize_act(x, smooth, down, "nvfp4")
    args = (q, s, qw.qweight, qw.wscales, la, up, b, qw.wtscale, "nvfp4", torch.bfloat16)
    with pytest.raises(ValueError, match="unsigned activations exist for int4 only"):
        ops.gemm_w4a4(*args, "canonical", True)


def test_opcheck_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    torch.library.opcheck(ops.attention, (q, k, v, None))
    torch.library.opcheck(ops.attention, (q, k[:, :, :5], v[:, :, :5], 0.3))


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_act_semantics(fmt):
    x, smooth, down, _, _, _ = make_gemm_args(7, 8, 192, 4, fmt)
    q, s, la = ops.quantize_act(x, smooth, down, fmt)
    # dequantized activations approximate x / smooth; lora_act is the unsmoothed projection
    xs = x.float() / smooth.float()
    deq = dequantize_activation(q, s, fmt)
    assert (deq - xs).norm() / xs.norm() < 0.15
    torch.testing.assert_close(la, x.float() @ down.float())
    assert la.dtype == torch.float32 and la.shape == (7, 4)
    _, _, la0 = ops.quantize_act(x, None, None, fmt)
    assert la0.shape == (7, 0)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (3, 192, 128), (97, 64, 3072)])
def test_gemm_w4a4_reference_against_float64(fmt, m, n, k):
    x, smooth, down, up, qw, b = make_gemm_args(m, n, k, 8, fmt, seed=m + n + k)
    q, s, la = ops.quantize_act(x, smooth, down, fmt)
    y = ops.gemm_w4a4(q, s, qw.qweight, qw.wscales, la, up, b, qw.wtscale, fmt, torch.float32)
    a64 = dequantize_activation(q, s, fmt).double()
    w64 = dequantize_weight(qw).double()
    ref = a64 @ w64.t() + la.double() @ up.double().t() + b.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("fmt", FMTS)
def test_gemm_w4a16_reference_against_float64(fmt):
    x, _, _, _, qw, b = make_gemm_args(33, 64, 256, 0, fmt)
    y = ops.gemm_w4a16(x, qw.qweight, qw.wscales, b, qw.wtscale, fmt)
    assert y.dtype == x.dtype
    ref = x.double() @ dequantize_weight(qw).double().t() + b.double()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    bf16_rounding = ((ref.to(torch.bfloat16).double() - ref).norm() / ref.norm()).item()
    assert err <= 2 * bf16_rounding


def test_attention_reference_matches_float64_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 77, 64, generator=g) for _ in range(3))
    o = ops.attention(q, k, v, None)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8.0, dim=-1)
    torch.testing.assert_close(o.double(), p @ v.double(), rtol=1e-5, atol=1e-5)


def test_argument_errors_name_the_argument():
    x, smooth, down, up, qw, b = make_gemm_args(4, 64, 128, 4, "int4")
    with pytest.raises(ValueError, match="multiple of int4 group 64"):
        ops.quantize_act(x[:, :96], None, None, "int4")
    with pytest.raises(ValueError, match="smooth must be"):
        ops.quantize_act(x, smooth[:64], down, "int4")
    with pytest.raises(ValueError, match="unsupported format 'int8'"):
        ops.quantize_act(x, smooth, down, "int8")
    q, s, la = ops.quantize_act(x, smooth, down, "int4")
    with pytest.raises(ValueError, match="proj_up must be"):
        ops.gemm_w4a4(q, s, qw.qweight, qw.wscales, la, up[:, :2], b, None, "int4", torch.bfloat16)
    with pytest.raises(ValueError, match="wscales must be"):
        ops.gemm_w4a4(q, s, qw.qweight, qw.wscales[:1], la, up, b, None, "int4", torch.bfloat16)
    with pytest.raises(ValueError, match="nvfp4 needs wtscale"):
        qn = quantize_weight(torch.randn(64, 128), "nvfp4")
        qa, sa, _ = ops.quantize_act(x, None, None, "nvfp4")
        ops.gemm_w4a4(
            qa, sa, qn.qweight, qn.wscales, None, None, None, None, "nvfp4", torch.bfloat16
        )


def test_backend_selection_errors():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.set_backend("fast")
    if ops.backend_unavailable("cuda"):
        with pytest.raises(RuntimeError, match="cannot use backend 'cuda'"):
            ops.set_backend("cuda")
    ops.set_backend("reference")
    assert ops.get_backend() == "reference"
    ops.set_backend("auto")
