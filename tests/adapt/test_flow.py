"""Rectified-flow objective: sigma schedule, the guidance-distilled formula, stop-gradient."""

import math

import pytest
import torch

from dcgen_quant.adapt import family as fam
from dcgen_quant.adapt.family import TextBatch
from dcgen_quant.adapt.flow import (
    FlowObjective,
    eval_sigmas,
    flow_loss,
    heldout_flow_loss,
    heldout_flow_losses,
    resolution_shift,
    sample_sigma,
    shift_sigma,
)
from dcgen_quant.adapt.surgery import surgery
from dcgen_quant.models.tiny import tiny_flux, tiny_sana


def test_resolution_shift_is_fluxs_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (16, 256, 1024, 4096, 5000):
        assert resolution_shift(n) == pytest.approx(math.exp(calculate_shift(n)), rel=1e-12)


def test_shift_sigma_properties():
    s = torch.linspace(0, 1, 11)
    assert torch.equal(shift_sigma(s, 1.0), s)
    shifted = shift_sigma(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > s[1:-1]).all()  # shift > 1 moves mass to high noise
    assert (shifted.diff() > 0).all()


def test_sample_sigma_is_logit_normal():
    g = torch.Generator().manual_seed(0)
    s = sample_sigma(200_000, g, shift=1.0, mean=0.5, std=0.8).double()
    u = torch.log(s / (1 - s))
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert u.std().item() == pytest.approx(0.8, abs=0.01)


def test_eval_sigmas_are_symmetric_quantiles():
    s = eval_sigmas(8, 1.0)
    assert torch.allclose(s + s.flip(0), torch.ones(8), atol=1e-6)
    assert (s.diff() > 0).all()


def test_objective_validates():
    with pytest.raises(ValueError, match="guidance: got 'cfg'"):
        FlowObjective(guidance="cfg")
    with pytest.raises(ValueError, match="guidance_range"):
        FlowObjective(guidance_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="text_drop: got 1.5"):
        FlowObjective(text_drop=1.5)


def _setup(seed=0):
    model = surgery(tiny_flux(), 8, 1, head_init="default", seed=seed)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 8, 4, 6, generator=g)
    text = TextBatch(torch.randn(3, 5, 256, generator=g), torch.randn(3, 128, generator=g))
    empty = TextBatch(torch.randn(1, 5, 256, generator=g), torch.randn(1, 128, generator=g))
    return model, x0, text, empty


def test_distilled_loss_is_the_reference_formula_with_stop_gradient():
    model, x0, text, empty = _setup()
    obj = FlowObjective(guidance="distilled", text_drop=0.5)
    params = [model.proj_out.weight, model.x_embedder.weight]
    loss = flow_loss(model, x0, text, empty, torch.Generator().manual_seed(11), obj, 1)
    grads = torch.autograd.grad(loss, params)

    # Redo the same draws by hand, in the documented order: sigma, eps, drop, w.
    g = torch.Generator().manual_seed(11)
    sigma = sample_sigma(3, g, resolution_shift(24))
    eps = torch.randn(x0.shape, generator=g)
    drop = torch.rand(3, generator=g) < 0.5
    w = 1 + 13 * torch.rand(3, generator=g)
    assert drop.any() and not drop.all()  # the seed exercises both branches
    s = sigma.view(-1, 1, 1, 1)
    x_t = s * eps + (1 - s) * x0
    cond = TextBatch(
        torch.where(drop.view(-1, 1, 1), empty.embeds, text.embeds),
        torch.where(drop.view(-1, 1), empty.pooled, text.pooled),
    )
    v = fam.forward(model, x_t, cond, sigma, w, 1)
    v_u = fam.forward(model, x_t, empty.expand(3), sigma, torch.ones(3), 1).detach()
    wv = w.view(-1, 1, 1, 1)
    v_hat = (v - (1 - wv) * v_u) / wv
    ref = torch.mean((v_hat - (eps - x0)) ** 2)
    ref_grads = torch.autograd.grad(ref, params, retain_graph=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # without the stop-gradient the gradient would differ: make sure the test can tell
    v_u_live = fam.forward(model, x_t, empty.expand(3), sigma, torch.ones(3), 1)
    live = torch.mean(((v - (1 - wv) * v_u_live) / wv - (eps - x0)) ** 2)
    live_grads = torch.autograd.grad(live, params)
    assert not torch.allclose(live_grads[0], grads[0], rtol=1e-3)


def test_distilled_at_w_1_is_plain_flow_matching():
    model, x0, text, empty = _setup(1)
    a = flow_loss(
        model,
        x0,
        text,
        empty,
        torch.Generator().manual_seed(3),
        FlowObjective(guidance="distilled", guidance_range=(1.0, 1.0)),
        1,
    )
    b = flow_loss(
        model,
        x0,
        text,
        empty,
        torch.Generator().manual_seed(3),
        FlowObjective(guidance="fixed", guidance_range=(1.0, 1.0)),
        1,
    )
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_sana_without_guidance_uses_plain_loss():
    model = surgery(tiny_sana(), 16, 1, head_init="default")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 4, 4, generator=g)
    text = TextBatch(torch.randn(2, 6, 128, generator=g), None, torch.ones(2, 6))
    empty = TextBatch(torch.randn(1, 6, 128, generator=g), None, torch.ones(1, 6))
    a = flow_loss(
        model,
        x0,
        text,
        empty,
        torch.Generator().manual_seed(5),
        FlowObjective(guidance="distilled"),
        1,
    )
    b = flow_loss(
        model, x0, text, empty, torch.Generator().manual_seed(5), FlowObjective(guidance="fixed"), 1
    )
    assert a.item() == b.item()


def test_heldout_loss_of_zero_head_is_the_zero_prediction_baseline():
    model = surgery(tiny_flux(), 8, 1)  # zero head: v = 0
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 8, 4, 4, generator=g) * 0.7
    text = TextBatch(torch.randn(5, 4, 256, generator=g), torch.randn(5, 128, generator=g))
    loss = heldout_flow_loss(model, x0, text, 1, k_sigmas=4, seed=2, batch_size=2)
    eps = torch.randn((4, *x0.shape), generator=torch.Generator().manual_seed(2))
    expected = torch.mean((eps - x0) ** 2).item()
    assert loss == pytest.approx(expected, rel=1e-6)
    again = heldout_flow_loss(model, x0, text, 1, k_sigmas=4, seed=2, batch_size=5)
    assert again == pytest.approx(loss, rel=1e-6)


def test_heldout_breakdown_matches_separate_evaluations():
    # heldout_flow_losses in one pass: each scale's loss, their mean and the empty-caption loss
    # (taken from the guided objective's unconditional term) must equal separate evaluations
    model, x0, text, empty = _setup(2)
    kw = {"k_sigmas": 3, "seed": 4, "batch_size": 2}
    scales = (1.0, 3.5, 14.0)
    res = heldout_flow_losses(model, x0, text, 1, empty=empty, guidance=scales, **kw)
    assert list(res["per_w"]) == list(scales)
    assert res["mean"] == heldout_flow_loss(model, x0, text, 1, empty=empty, guidance=scales, **kw)
    assert res["mean"] == pytest.approx(sum(res["per_w"].values()) / 3, rel=1e-12)
    for w in scales:
        alone = heldout_flow_loss(model, x0, text, 1, empty=empty, guidance=(w,), **kw)
        assert res["per_w"][w] == pytest.approx(alone, rel=1e-6), w
    uncond = heldout_flow_loss(model, x0, empty.expand(3), 1, **kw)
    assert res["empty"] == pytest.approx(uncond, rel=1e-6)
    values = [*res["per_w"].values(), res["empty"]]
    assert len(set(values)) == len(values)  # the scales and the caption change the loss
    assert heldout_flow_losses(model, x0, text, 1, **kw)["empty"] is None


def test_heldout_breakdown_without_guidance_embedding():
    # SANA: no scales but 1; the empty-caption loss is a pass of its own
    model = surgery(tiny_sana(), 16, 1, head_init="default")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 16, 4, 4, generator=g)
    text = TextBatch(torch.randn(3, 6, 128, generator=g), None, torch.ones(3, 6))
    empty = TextBatch(torch.randn(1, 6, 128, generator=g), None, torch.ones(1, 6))
    kw = {"k_sigmas": 2, "seed": 1, "batch_size": 2}
    res = heldout_flow_losses(model, x0, text, 1, empty=empty, **kw)
    assert res["per_w"] == {1.0: res["mean"]}
    assert res["mean"] == heldout_flow_loss(model, x0, text, 1, **kw)
    assert res["empty"] == pytest.approx(heldout_flow_loss(model, x0, empty.expand(3), 1, **kw))
    assert res["empty"] != res["mean"]
    with pytest.raises(ValueError, match="guidance-embedding model"):
        heldout_flow_losses(model, x0, text, 1, empty=empty, guidance=(1.0, 3.5), **kw)
