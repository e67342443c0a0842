"""Unsigned INT4 activations for layers that read a GELU output (FLUX's ff.net.2).

The layer quantizes ``(x + UNSIGNED_ACT_SHIFT) / smooth`` to codes 0..15 and its bias cancels
the shift: the search simulates exactly that, the family plan picks the GELU-output layers, and
the checkpoint keeps the flag.
"""

import json

import pytest
import torch
from torch import nn

from dcgen_quant import ops
from dcgen_quant.checkpoint import CheckpointError, load_quantized, save_quantized
from dcgen_quant.formats import (
    UNSIGNED_ACT_SHIFT,
    dequantize_activation,
    quantize_activation,
)
from dcgen_quant.models.base import PlannedGroup, family_for
from dcgen_quant.models.tiny import tiny_flux, tiny_sana
from dcgen_quant.nn import SVDQLinear
from dcgen_quant.quantize import QuantConfig, quantize_linear
from dcgen_quant.quantize.fakequant import fake_quant_act
from dcgen_quant.quantize.model import _unsigned_ok

from ..quantized_models import FAST_QUANT, randomly_quantized_tiny_flux, tiny_flux_inputs
from ..test_checkpoint import _rewrite


def gelu_tokens(t: int, k: int, seed: int, outliers: int = 4) -> torch.Tensor:
    """GELU outputs [t, k] with a few outlier channels (the input of a FeedForward's net.2)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, k, generator=g) * torch.exp(0.5 * torch.randn(k, generator=g))
    h[:, :outliers] *= 8
    return nn.functional.gelu(h, approximate="tanh")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_search_fake_quant_equals_the_runtime_op_bit_for_bit(dtype):
    x = gelu_tokens(37, 192, seed=1).to(dtype)
    smooth = (torch.rand(192, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype)
    q, s, _ = ops.quantize_act(x, smooth, None, "int4", "canonical", True)
    runtime = dequantize_activation(q, s, "int4", unsigned=True)
    u = (x.float() + UNSIGNED_ACT_SHIFT) / smooth.float()
    assert torch.equal(fake_quant_act(u, "int4", dtype, unsigned=True), runtime)
    qf, sf = quantize_activation(u, "int4", unsigned=True, scale_dtype=dtype)
    assert torch.equal(qf, q) and torch.equal(sf, s)


def _linear(k=512, n=128, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_unsigned_layer_has_lower_error_and_its_bias_cancels_the_shift(bias):
    linear = _linear(bias=bias)
    x = gelu_tokens(1024, 512, seed=3)
    config = QuantConfig(**FAST_QUANT, dtype=torch.float32)
    signed = quantize_linear(linear, x, config)
    unsigned = quantize_linear(linear, x, config, act_unsigned=True)
    assert unsigned.act_unsigned and not signed.act_unsigned
    assert unsigned.bias is not None  # created when the linear had none: it holds the shift

    with torch.no_grad():
        y = linear(x)
        err = {m.act_unsigned: float((m(x) - y).norm() / y.norm()) for m in (signed, unsigned)}
        # the float32 layer computes Q((x + c) / s) R^T + x pd pu^T + b - c sum_k R / s
        s = unsigned.smooth_factor
        a = fake_quant_act((x + UNSIGNED_ACT_SHIFT) / s, "int4", torch.float32, True)
        r = unsigned.dequantized_weight()
        b = linear.bias if bias else 0.0
        expected = (
            a - UNSIGNED_ACT_SHIFT / s
        ) @ r.t() + x @ unsigned.proj_down @ unsigned.proj_up.t()
        torch.testing.assert_close(unsigned(x), expected + b, rtol=1e-4, atol=1e-4)
    assert err[True] < 0.8 * err[False], err


def test_unsigned_refuses_what_it_cannot_represent():
    linear = _linear()
    x = gelu_tokens(256, 512, seed=4)
    config = QuantConfig(**FAST_QUANT)
    low = x.clone()
    low[5, 7] = -0.25  # below -0.171875: would be clipped to code 0
    with pytest.raises(ValueError, match=r"act_unsigned needs inputs >= -0.171875.*-0.25"):
        quantize_linear(linear, low, config, act_unsigned=True)
    with pytest.raises(ValueError, match="unsigned activations exist for int4 only"):
        quantize_linear(linear, x, QuantConfig(format="nvfp4", **FAST_QUANT), act_unsigned=True)
    with pytest.raises(ValueError, match="act_unsigned applies to W4A4 layers"):
        quantize_linear(linear, x, config, weight_only=True, act_unsigned=True)
    with pytest.raises(ValueError, match="unsigned activations exist for int4 only"):
        SVDQLinear(64, 64, fmt="nvfp4", act_unsigned=True)


def _unsigned_plan(model, config):
    family = family_for(model)
    return {
        name: group.act_unsigned
        for block_name, block in family.blocks(model)
        for group in family.plan_block(block_name, block, config).groups
        for name in group.names
    }


def test_flux_plan_marks_exactly_the_gelu_output_layers():
    model = tiny_flux()
    plan = _unsigned_plan(model, QuantConfig())
    unsigned = sorted(name for name, flag in plan.items() if flag)
    assert unsigned == [
        f"transformer_blocks.{i}.{rel}" for i in (0, 1) for rel in ("ff.net.2", "ff_context.net.2")
    ]
    # the input of ff.net.2 really is a GELU: the activation module in front of it
    ff = model.transformer_blocks[0].ff.net
    assert type(ff[0]).__name__ == "GELU" and ff[0].approximate == "tanh"
    assert not any(_unsigned_plan(model, QuantConfig(unsigned_gelu=False)).values())
    assert not any(_unsigned_plan(model, QuantConfig(format="nvfp4")).values())
    assert not any(_unsigned_plan(tiny_sana(), QuantConfig()).values())  # GLU: not >= -0.17


def test_model_falls_back_to_signed_codes_when_inputs_contradict_the_plan():
    group = PlannedGroup("w4a4", ["blocks.0.ff.net.2"], act_unsigned=True)
    assert _unsigned_ok(group, gelu_tokens(64, 64, seed=5), group.names)
    with pytest.warns(UserWarning, match="signed activation codes instead of unsigned"):
        assert not _unsigned_ok(group, torch.full((4, 64), -0.5), group.names)
    assert not _unsigned_ok(PlannedGroup("w4a4", ["a"]), gelu_tokens(4, 64, seed=6), ["a"])


def _with_unsigned_ff(model):
    for block in model.transformer_blocks:
        for ff in (block.ff, block.ff_context):
            ff.net[2].act_unsigned = True
    return model


def test_checkpoint_keeps_the_flag_and_loads_bit_exact(tmp_path):
    model = _with_unsigned_ff(randomly_quantized_tiny_flux("int4", dtype=torch.bfloat16))
    path = save_quantized(model, tmp_path / "m.safetensors")
    loaded = load_quantized(path)
    flags = {n: m.act_unsigned for n, m in loaded.named_modules() if isinstance(m, SVDQLinear)}
    assert sum(flags.values()) == 4 and flags["transformer_blocks.1.ff_context.net.2"]
    inputs = tiny_flux_inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


@pytest.mark.parametrize(
    "layer,value,message",
    [
        ("transformer_blocks.0.norm1.linear", True, "needs a W4A4 \\(svdq\\) layer"),
        ("transformer_blocks.0.ff.net.2", "yes", "act_unsigned='yes'"),
    ],
)
def test_bad_act_unsigned_metadata_is_named(tmp_path, layer, value, message):
    model = _with_unsigned_ff(randomly_quantized_tiny_flux("int4", dtype=torch.bfloat16))
    path = save_quantized(model, tmp_path / "m.safetensors")

    def edit(meta):
        layers = json.loads(meta["layers"])
        layers[layer]["act_unsigned"] = value
        meta["layers"] = json.dumps(layers)

    _rewrite(path, edit_meta=edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(path)
