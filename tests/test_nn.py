"""Runtime modules: shapes, dtype pinning, forward == ops composition, torch.compile."""

import pytest
import torch
from torch import nn

from dcgen_quant import ops
from dcgen_quant.formats import quantize_weight
from dcgen_quant.nn import SVDQConv1x1, SVDQLinear, SVDQSplitLinear, W4A16Linear


def random_svdq(k, n, r, fmt, dtype=torch.bfloat16, seed=0, act_unsigned=False):
    g = torch.Generator().manual_seed(seed)
    layer = SVDQLinear(k, n, rank=r, fmt=fmt, dtype=dtype, act_unsigned=act_unsigned)
    qw = quantize_weight(torch.randn(n, k, generator=g) / k**0.5, fmt, dtype)
    layer.qweight.copy_(qw.qweight)
    layer.wscales.copy_(qw.wscales)
    if qw.wtscale is not None:
        layer.wtscale.copy_(qw.wtscale)
    layer.smooth_factor.copy_(torch.rand(k, generator=g) + 0.5)
    layer.proj_down.copy_(torch.randn(k, r, generator=g) / k**0.5)
    layer.proj_up.copy_(torch.randn(n, r, generator=g) / r**0.5)
    layer.bias.copy_(torch.randn(n, generator=g))
    return layer


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_svdq_forward_is_the_two_ops(fmt):
    layer = random_svdq(128, 48, 8, fmt)
    x = torch.randn(2, 5, 128).to(torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.bfloat16
    q, s, la = ops.quantize_act(x.reshape(10, 128), layer.smooth_factor, layer.proj_down, fmt)
    y2 = ops.gemm_w4a4(
        q, s, layer.qweight, layer.wscales, la, layer.proj_up, layer.bias, layer.wtscale, fmt,
        torch.bfloat16,
    )  # fmt: skip
    assert torch.equal(y.reshape(10, 48), y2)


def test_buffers_are_the_checkpoint_keys():
    keys = set(random_svdq(64, 16, 4, "nvfp4").state_dict())
    assert keys == {
        "qweight",
        "wscales",
        "wtscale",
        "bias",
        "smooth_factor",
        "proj_down",
        "proj_up",
    }
    assert set(W4A16Linear(64, 16, fmt="int4", bias=False).state_dict()) == {"qweight", "wscales"}


def test_dtype_cast_keeps_format_buffers():
    layer = random_svdq(64, 16, 4, "nvfp4")
    wtscale = layer.wtscale.clone()
    layer.to(torch.float16)
    assert layer.wscales.dtype == torch.float8_e4m3fn
    assert layer.wtscale.dtype == torch.float32 and torch.equal(layer.wtscale, wtscale)
    assert layer.qweight.dtype == torch.uint8 and layer.proj_up.dtype == torch.float16
    layer.half().float()
    assert layer.wtscale.dtype == torch.float32 and layer.smooth_factor.dtype == torch.float32


def test_constructor_errors():
    with pytest.raises(ValueError, match="multiple of the int4 group size 64"):
        SVDQLinear(100, 16)
    with pytest.raises(ValueError, match="unsupported format"):
        SVDQLinear(64, 16, fmt="fp4")
    with pytest.raises(ValueError, match="input has 32 features"):
        random_svdq(64, 16, 4, "int4")(torch.randn(3, 32))


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_w4a16_matches_dequantized_linear(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    qw = quantize_weight(w, fmt, torch.float32)
    layer = W4A16Linear(64, 24, fmt=fmt, bias=False, dtype=torch.float32)
    layer.qweight.copy_(qw.qweight)
    layer.wscales.copy_(qw.wscales)
    if qw.wtscale is not None:
        layer.wtscale.copy_(qw.wtscale)
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t())


def test_conv1x1_matches_linear_over_channels():
    lin = random_svdq(64, 32, 4, "int4", dtype=torch.float32)
    conv = SVDQConv1x1(64, 32, rank=4, dtype=torch.float32)
    conv.load_state_dict(lin.state_dict())
    x = torch.randn(2, 64, 3, 5)
    expected = lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(conv(x), expected)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_layout_is_in_memory_only(fmt):
    layer = random_svdq(128, 24, 4, fmt)
    x = torch.randn(5, 128).to(torch.bfloat16)
    canonical_state = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    layer.set_layout("split_halves")
    assert not torch.equal(layer.qweight, canonical_state["qweight"])
    assert torch.equal(layer(x), y)  # the reference reads any layout
    for k, v in layer.state_dict().items():
        assert torch.equal(v.float(), canonical_state[k].float()), k
    other = SVDQLinear(128, 24, rank=4, fmt=fmt)
    other.set_layout("split_halves")
    other.load_state_dict(canonical_state)
    assert torch.equal(other.qweight, layer.qweight)


@pytest.mark.slow
def test_torch_compile_fullgraph_on_cpu():
    torch._dynamo.reset()
    # a signed INT4 layer, an unsigned one on its GELU output, a split layer, an NVFP4 layer
    split = SVDQSplitLinear(
        [
            random_svdq(64, 64, 8, "int4", seed=1),
            random_svdq(64, 64, 8, "int4", seed=2, act_unsigned=True),
        ]
    )
    model = nn.Sequential(
        random_svdq(128, 64, 8, "int4"), nn.GELU(),
        random_svdq(64, 128, 8, "int4", act_unsigned=True), split,
        random_svdq(64, 32, 8, "nvfp4"),
    )  # fmt: skip
    x = torch.randn(7, 128).to(torch.bfloat16)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.equal(compiled(x), expected)
