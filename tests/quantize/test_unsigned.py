"""Unsigned INT4 activations for layers that read a GELU output (FLUX's ff.net.2, and the GELU
columns of the single blocks' proj_out, which becomes a two-part SVDQSplitLinear).

The layer quantizes ``(x + UNSIGNED_ACT_SHIFT) / smooth`` to codes 0..15 and its bias cancels
the shift: the search simulates exactly that, the family plan picks the GELU-output layers, and
the checkpoint keeps the flag and the split layers.
"""

import json

import pytest
import torch
from torch import nn

from dcgen_quant import ops
from dcgen_quant.checkpoint import (
    CheckpointError,
    load_quantized,
    read_metadata,
    save_quantized,
)
from dcgen_quant.formats import (
    UNSIGNED_ACT_SHIFT,
    dequantize_activation,
    quantize_activation,
)
from dcgen_quant.models.base import PlannedGroup, family_for
from dcgen_quant.models.tiny import tiny_flux, tiny_sana
from dcgen_quant.nn import SVDQLinear, SVDQSplitLinear
from dcgen_quant.quantize import QuantConfig, quantize_linear
from dcgen_quant.quantize.block import _unsigned_ok
from dcgen_quant.quantize.fakequant import fake_quant_act
from dcgen_quant.quantize.layer import linear_spec, quantize_split

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
    # version 2: a version-1 reader would ignore act_unsigned and compute wrong outputs
    assert read_metadata(path)["format_version"] == 2
    loaded = load_quantized(path)
    flags = {n: m.act_unsigned for n, m in loaded.named_modules() if isinstance(m, SVDQLinear)}
    assert sum(flags.values()) == 4 and flags["transformer_blocks.1.ff_context.net.2"]
    inputs = tiny_flux_inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def test_version_1_file_with_unsigned_layers_is_refused(tmp_path):
    model = _with_unsigned_ff(randomly_quantized_tiny_flux("int4", dtype=torch.bfloat16))
    path = save_quantized(model, tmp_path / "m.safetensors")
    _rewrite(path, edit_meta=lambda meta: meta.update(format_version="1"))
    with pytest.raises(CheckpointError, match="format_version 1 cannot hold unsigned"):
        load_quantized(path)


@pytest.mark.parametrize(
    "layer,value,message",
    [
        ("transformer_blocks.0.norm1.linear", True, "only on an int4 W4A4 \\(svdq\\) layer"),
        ("transformer_blocks.0.ff.net.2", "yes", "act_unsigned' is 'yes'; expected true or false"),
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


# --------------------------------------------------------------------------------------------
# split layers: FLUX single blocks' proj_out reads cat([attention output, GELU(proj_mlp(x))])


def test_split_layer_quantizes_the_gelu_columns_unsigned_and_beats_the_whole_layer():
    g = torch.Generator().manual_seed(7)
    attention = torch.randn(1024, 128, generator=g) * 0.5  # signed, down to about -2
    x = torch.cat([attention, gelu_tokens(1024, 512, seed=8)], dim=1)
    torch.manual_seed(9)
    linear = nn.Linear(640, 96)
    config = QuantConfig(**FAST_QUANT, dtype=torch.float32)
    spec = linear_spec(linear, "proj_out")
    module, report = quantize_split(spec, x, config, split_at=128)
    assert isinstance(module, SVDQSplitLinear) and module.splits == [128, 512]
    assert [p.act_unsigned for p in module.parts] == [False, True]
    assert module.parts[0].bias is not None and report.split_at == 128
    whole = quantize_linear(linear, x, config)
    with torch.no_grad():
        y = linear(x)
        err_whole = float((whole(x) - y).norm() / y.norm())
        err_split = float((module(x) - y).norm() / y.norm())
        # the report: the first 3/4 of the tokens fitted, the last 1/4 held out
        err_fit = float((module(x[:768]) - y[:768]).norm() / y[:768].norm())
        err_heldout = float((module(x[768:]) - y[768:]).norm() / y[768:].norm())
        # the sum of the parts is the layer: each part on its own columns
        parts = module.parts[0](x[:, :128]) + module.parts[1](x[:, 128:])
        torch.testing.assert_close(module(x), parts, rtol=0, atol=0)
    assert report.err_svdq == pytest.approx(err_fit, rel=1e-5)
    assert report.err_heldout == pytest.approx(err_heldout, rel=1e-5)
    assert report.heldout_tokens == 256 and report.calib_tokens == 1024
    assert err_split < 0.8 * err_whole, (err_split, err_whole)
    assert report.err_rtn > report.err_svdq and report.err_smooth > report.err_svdq


def test_split_refuses_bad_positions():
    linear = nn.Linear(256, 64)
    x = gelu_tokens(128, 256, seed=10)
    spec = linear_spec(linear, "proj_out")
    for split_at in (0, 256, 96):
        with pytest.raises(ValueError, match=f"split_at={split_at} must lie inside"):
            quantize_split(spec, x, QuantConfig(**FAST_QUANT), split_at)
    with pytest.raises(ValueError, match="needs two or more SVDQLinear parts"):
        SVDQSplitLinear([SVDQLinear(64, 64)])
    with pytest.raises(ValueError, match="part 1 has out_features=32"):
        SVDQSplitLinear([SVDQLinear(64, 64), SVDQLinear(64, 32)])


def test_flux_plan_splits_single_block_proj_out_at_the_attention_width():
    model = tiny_flux()
    family = family_for(model)
    for config, expected in ((QuantConfig(), 256), (QuantConfig(format="nvfp4"), None),
                             (QuantConfig(unsigned_gelu=False), None)):  # fmt: skip
        plan = family.plan_block("single_transformer_blocks.0", model.single_transformer_blocks[0],
                                 config)  # fmt: skip
        split = {g.names[0].rsplit(".", 1)[-1]: g.split_at for g in plan.groups}
        assert split["proj_out"] == expected
        assert all(v is None for k, v in split.items() if k != "proj_out")
    block = model.single_transformer_blocks[0]
    assert block.proj_out.in_features - block.proj_mlp.out_features == 256


def _with_split_proj_out(model):
    """Replace each single block's proj_out with a split layer of two random-ish parts (the
    float weights of a fresh tiny FLUX, rounded to nearest; random low-rank factors)."""
    from ..quantized_models import fill_from_linear

    g = torch.Generator().manual_seed(11)
    dtype = model.dtype
    for block, source in zip(model.single_transformer_blocks,
                             tiny_flux(dtype=dtype).single_transformer_blocks):  # fmt: skip
        linear = source.proj_out
        k0 = linear.in_features - source.proj_mlp.out_features
        parts = []
        for lo, hi, unsigned in ((0, k0, False), (k0, linear.in_features, True)):
            piece = nn.Linear(hi - lo, linear.out_features, dtype=dtype)
            piece.weight.data.copy_(linear.weight.data[:, lo:hi])
            layer = SVDQLinear(hi - lo, linear.out_features, 4, "int4", True, dtype,
                               act_unsigned=unsigned)  # fmt: skip
            fill_from_linear(layer, piece, 4, g)
            parts.append(layer)
        block.proj_out = SVDQSplitLinear(parts)
    return model


def test_checkpoint_round_trips_split_layers_bit_exact(tmp_path):
    model = _with_split_proj_out(randomly_quantized_tiny_flux("int4", dtype=torch.bfloat16))
    path = save_quantized(model, tmp_path / "m.safetensors")
    loaded = load_quantized(path)
    split = loaded.single_transformer_blocks[1].proj_out
    assert type(split) is SVDQSplitLinear and split.splits == [256, 1024]
    assert [p.act_unsigned for p in split.parts] == [False, True]
    inputs = tiny_flux_inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def _edit_layers(fn):
    def edit(meta):
        layers = json.loads(meta["layers"])
        fn(layers)
        meta["layers"] = json.dumps(layers)

    return edit


SPLIT = "single_transformer_blocks.0.proj_out"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m[SPLIT].update(splits=[256, 1000]), r"splits' is \[256, 1000\]; expected two"),
        (lambda m: m.pop(f"{SPLIT}.parts.1"), "has no valid 'layers' entry for its part"),
    ],
)  # fmt: skip
def test_bad_split_metadata_is_named(tmp_path, edit, message):
    model = _with_split_proj_out(randomly_quantized_tiny_flux("int4", dtype=torch.bfloat16))
    path = save_quantized(model, tmp_path / "m.safetensors")
    _rewrite(path, edit_meta=_edit_layers(edit))
    with pytest.raises(CheckpointError, match=message):
        load_quantized(path)


def test_unsigned_gelu_lowers_the_whole_model_error():
    """End to end: the tiny FLUX quantized with unsigned GELU inputs (and split proj_out) is
    closer to its 16-bit model on unseen inputs than the same run with signed codes."""
    from dcgen_quant.models import synthetic_calibration
    from dcgen_quant.quantize import quantize_model

    reference = tiny_flux(dtype=torch.bfloat16)
    calib = synthetic_calibration(reference, samples=2, steps=2, seed=0)
    held_out = synthetic_calibration(reference, samples=2, steps=2, seed=123)

    def output(model, kw):
        out = model(**kw)
        return (out[0] if isinstance(out, tuple) else out.sample).float()

    with torch.no_grad():
        targets = [output(reference, kw) for kw in held_out]
    errors = {}
    for unsigned in (False, True):
        model = tiny_flux(dtype=torch.bfloat16)
        config = QuantConfig(**FAST_QUANT, unsigned_gelu=unsigned)
        quantize_model(model, calib, config, progress=False)
        with torch.no_grad():
            errors[unsigned] = sum(
                float((output(model, kw) - y).norm() / y.norm()) for kw, y in zip(held_out, targets)
            ) / len(held_out)
    assert errors[True] < 0.95 * errors[False], errors  # measured 0.0137 vs 0.0158
