"""Per-family knowledge: block lists, fused groups, W4A16 and skipped layers."""

import pytest
from torch import nn

from dcgen_quant.models import family_for, supported_classes
from dcgen_quant.models.tiny import TINY_FLUX_CONFIG, tiny_flux, tiny_sana
from dcgen_quant.quantize import QuantConfig


def _plans(model, config=None):
    config = config or QuantConfig()
    family = family_for(model)
    return [family.plan_block(name, block, config) for name, block in family.blocks(model)]


def test_flux_plan():
    model = tiny_flux()
    family = family_for(model)
    assert family.name == "flux"
    names = [n for n, _ in family.blocks(model)]
    assert names == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    double, _, single, _ = _plans(model)
    groups = {tuple(g.names): g.kind for g in double.groups}
    p = "transformer_blocks.0."
    assert groups[(p + "attn.to_q", p + "attn.to_k", p + "attn.to_v")] == "w4a4"
    assert groups[(p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj")] == "w4a4"
    assert groups[(p + "norm1.linear",)] == groups[(p + "norm1_context.linear",)] == "w4a16"
    for alone in ("attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                  "ff_context.net.0.proj", "ff_context.net.2"):  # fmt: skip
        assert groups[(p + alone,)] == "w4a4"
    assert len(groups) == 10 and not double.skipped
    s = "single_transformer_blocks.0."
    groups = {tuple(g.names): g.kind for g in single.groups}
    assert groups == {
        (s + "norm.linear",): "w4a16",
        (s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"): "w4a4",
        (s + "proj_out",): "w4a4",
    }
    outside = {name: why for name, _, why in family.outside_layers(model)}
    assert set(outside) == {
        "x_embedder", "context_embedder", "norm_out.linear", "proj_out",
        *(f"time_text_embed.{e}.linear_{i}" for e in
          ("timestep_embedder", "guidance_embedder", "text_embedder") for i in (1, 2)),
    }  # fmt: skip
    assert "embedder" in outside["x_embedder"] and "final" in outside["proj_out"]


def test_sana_plan_treats_pointwise_convs_as_linears():
    model = tiny_sana()
    family = family_for(model)
    assert family.name == "sana" and len(family.blocks(model)) == 2
    plan = _plans(model)[0]
    p = "transformer_blocks.0."
    groups = {tuple(g.names): g.kind for g in plan.groups}
    assert groups == {
        (p + "attn1.to_q", p + "attn1.to_k", p + "attn1.to_v"): "w4a4",
        (p + "attn1.to_out.0",): "w4a4",
        (p + "attn2.to_q",): "w4a4",
        (p + "attn2.to_k", p + "attn2.to_v"): "w4a4",
        (p + "attn2.to_out.0",): "w4a4",
        (p + "ff.conv_inverted",): "w4a4",
        (p + "ff.conv_point",): "w4a4",
    }
    assert [(n, why) for n, _, why in plan.skipped] == [
        (p + "ff.conv_depth", "depthwise 3x3 convolution (kept in 16 bits)")
    ]
    outside = {name for name, _, _ in family.outside_layers(model)}
    assert {"patch_embed.proj", "time_embed.linear", "proj_out"} <= outside
    assert not any(n.startswith("transformer_blocks") for n in outside)


def test_config_skips_and_group_size_skips():
    model = tiny_flux()
    cfg = QuantConfig(skip=("*.ff.net.2", "transformer_blocks.0.attn.to_k"))
    double = _plans(model, cfg)[0]
    skipped = {n: why for n, _, why in double.skipped}
    assert skipped == {
        "transformer_blocks.0.attn.to_k": "skipped by QuantConfig.skip",
        "transformer_blocks.0.ff.net.2": "skipped by QuantConfig.skip",
    }
    # the rest of the fused group still shares its input
    assert ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"] in [
        g.names for g in double.groups
    ]
    # AdaLayerNorm linears become W4A4 when weight-only mode is off
    kinds = {
        g.names[0]: g.kind for g in _plans(model, QuantConfig(weight_only_adanorm=False))[0].groups
    }
    assert kinds["transformer_blocks.0.norm1.linear"] == "w4a4"
    # hidden 96: K=96 is not a multiple of the INT4 group (64) but is of NVFP4's (16)
    small = tiny_flux(num_attention_heads=3, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
    plan = _plans(small)[0]
    why = {n: r for n, _, r in plan.skipped}["transformer_blocks.0.attn.to_q"]
    assert why == "in_features=96 is not a multiple of the int4 group size 64; kept in 16 bits"
    # only the feed-forward down projections (K = 4 * 96 = 384) fit
    assert [g.names for g in plan.groups] == [
        ["transformer_blocks.0.ff.net.2"],
        ["transformer_blocks.0.ff_context.net.2"],
    ]
    assert not _plans(small, QuantConfig(format="nvfp4"))[0].skipped


def test_unknown_model_class_lists_the_supported_ones():
    assert supported_classes() == ["FluxTransformer2DModel", "SanaTransformer2DModel"]
    with pytest.raises(ValueError, match="unsupported model class Sequential; supported: Flux"):
        family_for(nn.Sequential(nn.Linear(64, 64)))


def test_subclass_is_recognized():
    from diffusers import FluxTransformer2DModel

    class MyFlux(FluxTransformer2DModel):
        pass

    model = MyFlux(**TINY_FLUX_CONFIG)
    assert family_for(model).name == "flux"
