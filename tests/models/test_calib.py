"""Calibration inputs: synthetic for any FLUX / SANA config, and captured from real pipelines."""

import pytest
import torch

from dcgen_quant.models import capture_pipeline_calibration, synthetic_calibration
from dcgen_quant.models.calibration import flow_matching_sigmas
from dcgen_quant.models.tiny import tiny_flux, tiny_sana
from dcgen_quant.quantize import QuantConfig, quantize_model

FAST = QuantConfig(rank=4, smooth_grid=2, lowrank_iters=1, calib_tokens=128)


def test_flow_matching_sigmas():
    assert flow_matching_sigmas(4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert flow_matching_sigmas(1) == [1.0]
    shifted = flow_matching_sigmas(4, shift=3.0)
    assert shifted[0] == pytest.approx(1.0) and shifted[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(shifted, shifted[1:]))
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        flow_matching_sigmas(0)


def test_synthetic_flux_inputs_have_the_models_shapes():
    model = tiny_flux(guidance_embeds=False, in_channels=32, joint_attention_dim=128)
    calib = synthetic_calibration(model, samples=3, steps=2, seed=0, latent_size=5, text_tokens=9)
    assert len(calib) == 6
    kw = calib[0]
    assert kw["hidden_states"].shape == (1, 25, 32)
    assert kw["encoder_hidden_states"].shape == (1, 9, 128)
    assert kw["pooled_projections"].shape == (1, 128)
    assert kw["img_ids"].shape == (25, 3) and kw["txt_ids"].shape == (9, 3)
    assert "guidance" not in kw  # this config does not embed guidance
    assert [float(c["timestep"]) for c in calib[:2]][0] > float(calib[1]["timestep"])
    assert "guidance" in synthetic_calibration(tiny_flux(), 1, 1, latent_size=2)[0]
    # deterministic in the seed, different across seeds
    again = synthetic_calibration(model, samples=3, steps=2, seed=0, latent_size=5, text_tokens=9)
    other = synthetic_calibration(model, samples=3, steps=2, seed=1, latent_size=5, text_tokens=9)
    assert torch.equal(again[4]["hidden_states"], calib[4]["hidden_states"])
    assert not torch.equal(other[4]["hidden_states"], calib[4]["hidden_states"])
    with torch.no_grad():
        assert model(**kw)[0].shape == (1, 25, 32)


def test_synthetic_sana_inputs_run_the_model():
    model = tiny_sana(sample_size=8)
    calib = synthetic_calibration(model, samples=2, steps=3, seed=0, text_tokens=5)
    assert len(calib) == 6 and calib[0]["hidden_states"].shape == (1, 32, 8, 8)
    assert calib[0]["encoder_hidden_states"].shape == (1, 5, 128)
    assert 0 < float(calib[-1]["timestep"]) < float(calib[0]["timestep"]) <= 1000
    with torch.no_grad():
        assert model(**calib[0])[0].shape == (1, 32, 8, 8)
    guided = tiny_sana(guidance_embeds=True)
    assert "guidance" in synthetic_calibration(guided, 1, 1)[0]


@pytest.mark.slow
def test_capture_from_a_flux_pipeline_and_quantize_with_it():
    from dcgen_quant.models.tiny_pipeline import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calib = capture_pipeline_calibration(
        pipe, ["a red cube", "a cat on a mat"], steps=3, height=32, width=32,
        max_sequence_length=16, guidance_scale=3.5,
    )  # fmt: skip
    assert len(calib) == 6
    kw = calib[0]
    assert kw["hidden_states"].shape == (1, 64, 64) and kw["encoder_hidden_states"].shape[1] == 16
    assert kw["return_dict"] is False and float(kw["guidance"]) == 3.5
    # different prompts give different text embeddings; steps of one prompt share them
    assert not torch.equal(calib[0]["encoder_hidden_states"], calib[3]["encoder_hidden_states"])
    assert torch.equal(calib[0]["encoder_hidden_states"], calib[2]["encoder_hidden_states"])
    assert float(calib[0]["timestep"]) > float(calib[2]["timestep"])
    report = quantize_model(pipe.transformer, calib, FAST, progress=False)
    assert report.summary()["layers_quantized"] == 40


@pytest.mark.slow
def test_capture_from_a_sana_pipeline_with_classifier_free_guidance():
    from dcgen_quant.models.tiny_pipeline import tiny_sana_pipeline

    pipe = tiny_sana_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calib = capture_pipeline_calibration(
        pipe, "a lighthouse at dusk", steps=2, height=32, width=32, max_sequence_length=16,
        complex_human_instruction=None, use_resolution_binning=False, guidance_scale=4.5,
    )  # fmt: skip
    assert len(calib) == 2
    # the pipeline passes the latents positionally; the capture names them
    assert calib[0]["hidden_states"].shape == (2, 32, 16, 16)  # CFG: uncond + cond
    assert calib[0]["encoder_attention_mask"].shape == (2, 16)
    report = quantize_model(pipe.transformer, calib, FAST, progress=False)
    assert report.summary()["layers_quantized"] == 20
