"""QuantConfig(nunchaku_compatible=True) / ``quantize --nunchaku-compatible``: AdaLayerNorm
(W4A16) layers in INT4 group 64 with codes -7..7, also in NVFP4 models, so that
``convert --to nunchaku`` changes no value."""

import pytest
import torch
from torch import nn

import dcgen_quant.quantize.model as model_module
import dcgen_quant.quantize.streaming as streaming_module
from dcgen_quant.checkpoint import save_quantized
from dcgen_quant.formats.int4 import unpack_int4
from dcgen_quant.models import synthetic_calibration
from dcgen_quant.models.tiny import tiny_flux
from dcgen_quant.nn import W4A16Linear
from dcgen_quant.quantize import QuantConfig, quantize_linear, quantize_model
from dcgen_quant.quantize.streaming import StreamOptions, StreamSource, quantize_streaming

from ..quantized_models import MINIMAL_QUANT
from .test_streaming import assert_same_checkpoint


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


@pytest.mark.slow
def test_resumed_runs_keep_the_int4_adaln_layers(tmp_path, monkeypatch, one_thread):
    """NVFP4 with nunchaku_compatible: a resumed run rebuilds the finished blocks' adaLN layers in
    INT4 (block.module_from_entry), streamed (the CLI's path) and in memory (quantize_model with a
    state_dir), and both end bit-identical to an uninterrupted in-memory run."""
    config = QuantConfig(**MINIMAL_QUANT, format="nvfp4", nunchaku_compatible=True)
    model = tiny_flux(dtype=torch.bfloat16)
    calib = synthetic_calibration(model, samples=2, steps=1, latent_size=4, text_tokens=4)
    quantize_model(model, calib, config, progress=False)
    adaln = [m for m in model.modules() if isinstance(m, W4A16Linear)]
    assert adaln and all(m.fmt == "int4" for m in adaln)
    save_quantized(model, tmp_path / "memory.safetensors")

    real = model_module.quantize_block
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # after 3 of the 4 blocks (2 double, 1 single)
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return real(*args, **kwargs)

    source = StreamSource.from_module(tiny_flux(dtype=torch.bfloat16))
    out, state = tmp_path / "stream.safetensors", tmp_path / "stream-state"
    options = StreamOptions(progress=False, log=lambda line: None)
    monkeypatch.setattr(streaming_module, "quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(source, calib, config, out, state, options)
    monkeypatch.setattr(streaming_module, "quantize_block", real)
    quantize_streaming(source, calib, config, out, state, options)
    assert_same_checkpoint(tmp_path / "memory.safetensors", out)

    calls["n"] = 0
    monkeypatch.setattr(model_module, "quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_flux(dtype=torch.bfloat16), calib, config, progress=False,
                       state_dir=tmp_path / "memory-state")  # fmt: skip
    monkeypatch.setattr(model_module, "quantize_block", real)
    resumed = tiny_flux(dtype=torch.bfloat16)
    quantize_model(resumed, calib, config, progress=False, state_dir=tmp_path / "memory-state")
    save_quantized(resumed, tmp_path / "resumed.safetensors")
    assert_same_checkpoint(tmp_path / "memory.safetensors", tmp_path / "resumed.safetensors")
