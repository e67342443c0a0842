"""Attention processors on tiny diffusers FLUX / SANA models (CPU): outputs match the stock
processors, through the reference op and through the Triton kernels (interpreter)."""

from __future__ import annotations

import pytest
import torch

from dcgen_quant import kernels
from dcgen_quant.attention_processor import (
    DcgenFluxAttnProcessor,
    DcgenSanaAttnProcessor,
    use_dcgen_attention,
)
from dcgen_quant.models.tiny import TINY_FLUX_CONFIG, TINY_SANA_CONFIG, tiny_flux, tiny_sana

pytestmark = pytest.mark.interpreter


def flux_inputs(batch=1, img=16, txt=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = TINY_FLUX_CONFIG
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(img / 4),
                                         indexing="ij"), dim=-1).reshape(-1, 3)  # fmt: skip
    return {
        "hidden_states": torch.randn(batch, img, c["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, txt, c["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, c["pooled_projection_dim"], generator=g),
        "timestep": torch.full((batch,), 0.7),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(txt, 3),
        "guidance": torch.full((batch,), 3.5),
    }


def sana_inputs(batch=2, txt=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = TINY_SANA_CONFIG
    mask = torch.ones(batch, txt)
    mask[1, 7:] = 0  # padded caption of the second sample
    return {
        "hidden_states": torch.randn(batch, c["in_channels"], 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, txt, c["caption_channels"], generator=g),
        "timestep": torch.tensor([500, 20]),
        "encoder_attention_mask": mask,
    }


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.slow  # first diffusers import in a worker: ~10 s on 2 cores
def test_flux_processors_match_stock():
    model = tiny_flux()
    inputs = flux_inputs()
    expected = run(model, inputs)
    n = use_dcgen_attention(model)
    assert n == TINY_FLUX_CONFIG["num_layers"] + TINY_FLUX_CONFIG["num_single_layers"]
    kinds = {type(m.processor) for m in model.modules() if hasattr(m, "processor")}
    assert kinds == {DcgenFluxAttnProcessor}
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-5, atol=1e-5)
    assert use_dcgen_attention(model) == 0  # already switched


def test_sana_cross_attention_switched_self_attention_kept():
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    model = tiny_sana()
    inputs = sana_inputs()
    expected = run(model, inputs)
    assert use_dcgen_attention(model) == TINY_SANA_CONFIG["num_layers"]
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, SanaLinearAttnProcessor2_0)
        assert isinstance(block.attn2.processor, DcgenSanaAttnProcessor)
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flux_and_sana_through_triton_kernels(triton_backend, device, monkeypatch):
    # the whole tiny models, float32, attention in the Triton kernel (interpreter on CPU)
    calls = []
    kernel = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a: calls.append(1) or kernel(*a))
    for build, inputs in ((tiny_flux, flux_inputs(batch=2)), (tiny_sana, sana_inputs())):
        model = build().to(device)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        expected = run(model, inputs)
        use_dcgen_attention(model)
        before = len(calls)
        got = run(model, inputs)
        assert len(calls) > before, "the Triton attention kernel was not called"
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mask_that_is_not_key_padding_falls_back_to_stock():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_flux()
    attn = model.transformer_blocks[0].attn
    stock = attn.processor
    assert type(stock) is FluxAttnProcessor
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(1, 16, 256, generator=g)
    enc = torch.randn(1, 8, 256, generator=g)
    soft = torch.randn(1, 1, 24, 24, generator=g)  # a soft bias varying over queries
    expected = stock(attn, hs, enc, soft)
    got = DcgenFluxAttnProcessor(fallback=stock)(attn, hs, enc, soft)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    padding = torch.zeros(1, 1, 1, 24)
    padding[..., 20:] = -1e4
    for a, b in zip(
        DcgenFluxAttnProcessor()(attn, hs, enc, padding), stock(attn, hs, enc, padding)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_use_dcgen_attention_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        use_dcgen_attention("flux")
