"""QuantConfig(nunchaku_compatible=True) / ``quantize --nunchaku-compatible``: AdaLayerNorm
(W4A16) layers in INT4 group 64 with codes -7..7, also in NVFP4 models, so that
``convert --to nunchaku`` changes no value."""

import pytest
import torch
from torch import nn

from dcgen_quant.formats.int4 import unpack_int4
from dcgen_quant.quantize import QuantConfig, quantize_linear


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("gptq", [False, True])
def test_weight_only_layers_are_int4_without_code_minus_8(fmt, gptq):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(128, 96)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 128, generator=g))
        linear.weight[:, ::7] *= 8  # outliers: GPTQ's error feedback pushes codes to the limits
    x = torch.randn(256, 128, generator=g)
    config = QuantConfig(format=fmt, nunchaku_compatible=True, gptq=gptq)
    layer = quantize_linear(linear, x, config, weight_only=True)
    assert layer.fmt == "int4" and layer.wscales.dtype == torch.bfloat16
    assert int(unpack_int4(layer.qweight).min()) >= -7
    plain = quantize_linear(linear, x, QuantConfig(format=fmt, gptq=gptq), weight_only=True)
    assert plain.fmt == fmt


def test_needs_unsigned_gelu():
    with pytest.raises(ValueError, match="signed-gelu"):
        QuantConfig(nunchaku_compatible=True, unsigned_gelu=False)
    assert QuantConfig(format="nvfp4", nunchaku_compatible=True).weight_only_format == "int4"
    assert QuantConfig(format="nvfp4").weight_only_format == "nvfp4"


def test_code_minus_8_becomes_minus_7():
    """GPTQ may end on code -8 (round to nearest never does: |x| / (amax / 7) <= 7.03)."""
    from dcgen_quant.formats import QuantizedWeight
    from dcgen_quant.formats.int4 import pack_int4
    from dcgen_quant.quantize.layer import _without_code_minus_8

    codes = torch.randint(-8, 8, (8, 64), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    assert int((codes == -8).sum()) > 0
    qw = QuantizedWeight(pack_int4(codes), torch.ones(1, 8, dtype=torch.bfloat16), None, "int4")
    out = unpack_int4(_without_code_minus_8(qw).qweight)
    assert torch.equal(out, codes.clamp(min=-7))
