"""The block-by-block runner reproduces the full model forward exactly (nothing quantized)."""

import pytest
import torch

from dcgen_quant.models import family_for, synthetic_calibration
from dcgen_quant.models.tiny import tiny_flux, tiny_sana
from dcgen_quant.quantize.calibration import capture_block_inputs, run_block


@pytest.mark.parametrize("build", [tiny_flux, tiny_sana], ids=["flux", "sana"])
def test_block_runner_is_exact(build):
    model = build()
    calib = synthetic_calibration(model, samples=2, steps=2, seed=3, latent_size=6, text_tokens=7)
    family = family_for(model)
    # what the full forward feeds its final norm: the last block's hidden states
    final_inputs = []
    hook = model.norm_out.register_forward_pre_hook(lambda m, a: final_inputs.append(a[0]))
    with torch.no_grad():
        outputs = [model(**kw)[0] for kw in calib]
    hook.remove()

    inputs = capture_block_inputs(model, family, calib)
    assert len(inputs) == len(calib)
    assert set(inputs[0]) >= {"hidden_states", "encoder_hidden_states"}
    # FLUX hands the double blocks' (encoder_hidden_states, hidden_states) to the single blocks
    for _, block in family.blocks(model):
        inputs = run_block(family, block, inputs)
    for got, want in zip(inputs, final_inputs):
        assert torch.equal(got["hidden_states"], want)
    # and capturing stopped the forward without touching the model
    with torch.no_grad():
        again = model(**calib[0])[0]
    assert torch.equal(again, outputs[0])


def test_capture_reports_a_forward_that_skips_the_blocks():
    model = tiny_flux()
    family = family_for(model)
    calib = synthetic_calibration(model, 1, 1, latent_size=2, text_tokens=3)
    stub = torch.nn.Module()  # a "model" whose forward returns before its blocks
    stub.forward = lambda **kw: None
    stub.transformer_blocks = model.transformer_blocks
    with pytest.raises(RuntimeError, match="never reached its first transformer block"):
        capture_block_inputs(stub, family, calib)
