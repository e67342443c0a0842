"""Runtime q/k/v fusion (dcgen_quant/fusion.py) on really quantized tiny FLUX models."""

import pytest
import torch
from safetensors.torch import load_file

from dcgen_quant.checkpoint import load_quantized, read_metadata, save_quantized
from dcgen_quant.fusion import fuse_projections, is_fused, unfuse_projections
from dcgen_quant.models.calibration import synthetic_calibration
from dcgen_quant.models.tiny import tiny_flux
from dcgen_quant.nn import SVDQLinear
from dcgen_quant.quantize import quantize_model
from dcgen_quant.quantize.config import QuantConfig

from .quantized_models import FAST_QUANT, randomly_quantized_tiny_flux, tiny_flux_inputs


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def quantized(request):
    """(fmt, a SVDQuant-quantized tiny FLUX in float32, forward inputs)."""
    torch.manual_seed(0)
    model = tiny_flux(seed=1).eval()
    calib = synthetic_calibration(model, samples=2, steps=2, seed=1)
    quantize_model(model, calib, QuantConfig(format=request.param, **FAST_QUANT), progress=False)
    return request.param, model, tiny_flux_inputs(model, seed=3)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_fused_outputs_equal_unfused(quantized):
    fmt, model, inputs = quantized
    before = _run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    status = fuse_projections(model)
    try:
        # 2 double blocks (image + text q/k/v each) and 2 single blocks, all fused
        assert len(status) == 4 and set(status.values()) == {"fused"}, status
        attn = model.transformer_blocks[0].attn
        assert attn.fused_projections and not hasattr(attn, "to_q")
        assert isinstance(attn.to_qkv, SVDQLinear) and attn.to_qkv.out_features == 3 * 256
        assert isinstance(attn.to_added_qkv, SVDQLinear)
        # every output column is computed as in its own layer: the reference is bit-exact
        assert torch.equal(_run(model, inputs), before)
    finally:
        assert len(unfuse_projections(model)) == 4
    assert not is_fused(model)
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert torch.equal(_run(model, inputs), before)


def test_nvfp4_group_members_share_the_tensor_scale(quantized):
    fmt, model, _ = quantized
    attn = model.single_transformer_blocks[0].attn
    if fmt == "int4":
        assert attn.to_q.wtscale is None
    else:
        assert torch.equal(attn.to_q.wtscale, attn.to_k.wtscale)
        assert torch.equal(attn.to_q.wtscale, attn.to_v.wtscale)


def test_checkpoint_of_a_fused_model_holds_the_members(quantized, tmp_path):
    fmt, model, inputs = quantized
    plain = save_quantized(model, tmp_path / "plain.safetensors")
    fuse_projections(model)
    try:
        fused = save_quantized(model, tmp_path / "fused.safetensors")
        assert is_fused(model)  # saving leaves the model as it was
    finally:
        unfuse_projections(model)
    # the same tensors and metadata (safetensors orders its header keys differently per call)
    assert read_metadata(plain) == read_metadata(fused)
    a, b = load_file(str(plain)), load_file(str(fused))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_quantized(fused, fuse=True)
    assert is_fused(loaded) and hasattr(loaded.transformer_blocks[1].attn, "to_added_qkv")
    assert torch.equal(_run(loaded, inputs), _run(model, inputs))


def test_split_layout_fuses(quantized):
    fmt, model, inputs = quantized
    before = _run(model, inputs)
    for m in model.modules():
        if isinstance(m, SVDQLinear):
            m.set_layout("split_halves")
    try:
        fuse_projections(model)
        assert model.transformer_blocks[0].attn.to_qkv.layout == "split_halves"
        after = _run(model, inputs)
        unfuse_projections(model)
    finally:
        for m in model.modules():
            if isinstance(m, SVDQLinear):
                m.set_layout("canonical")
    assert torch.equal(after, before)


def test_layers_that_do_not_share_their_input_quantization_stay_separate():
    # independently filled layers: each has its own smoothing and down projection
    model = randomly_quantized_tiny_flux("int4").eval()
    inputs = tiny_flux_inputs(model)
    before = _run(model, inputs)
    status = fuse_projections(model)
    assert len(status) == 4
    assert all("different smooth_factor" in why for why in status.values()), status
    assert not is_fused(model) and isinstance(model.transformer_blocks[0].attn.to_q, SVDQLinear)
    assert torch.equal(_run(model, inputs), before)


def test_concat_errors_name_the_mismatch():
    a = SVDQLinear(64, 32, rank=4, fmt="int4", dtype=torch.float32)
    b = SVDQLinear(128, 32, rank=4, fmt="int4", dtype=torch.float32)
    with pytest.raises(ValueError, match="in_features=128"):
        SVDQLinear.concat([a, b])
    c = SVDQLinear(64, 32, rank=4, fmt="int4", bias=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="bias"):
        SVDQLinear.concat([a, c])
    with pytest.raises(ValueError, match="two or more"):
        SVDQLinear.concat([a])
    with pytest.raises(ValueError, match="partition"):
        SVDQLinear.concat([a, a]).split([32, 16])


def test_dcgen_attention_processor_reads_the_fused_projections(quantized):
    from dcgen_quant.attention_processor import use_dcgen_attention

    fmt, model, inputs = quantized
    saved = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert use_dcgen_attention(model) == 4
    try:
        before = _run(model, inputs)
        fuse_projections(model)
        after = _run(model, inputs)
        unfuse_projections(model)
    finally:
        for name, processor in saved.items():
            model.get_submodule(name).set_processor(processor)
    assert torch.equal(after, before)


def test_meta_layers_concat_only_when_they_hold_the_same_input_tensors():
    # meta tensors have no values: sharing is shown by identity (bench.w4a4.share_group_inputs_)
    layers = [SVDQLinear(64, 32, rank=4, fmt="nvfp4", device="meta") for _ in range(3)]
    assert "own smooth_factor on the meta device" in SVDQLinear.concat_mismatch(layers)
    for m in layers[1:]:
        m.smooth_factor, m.proj_down = layers[0].smooth_factor, layers[0].proj_down
    assert "own wtscale on the meta device" in SVDQLinear.concat_mismatch(layers)
    for m in layers[1:]:
        m.wtscale = layers[0].wtscale
    fused = SVDQLinear.concat(layers)
    assert fused.qweight.is_meta and fused.out_features == 96
    assert [m.out_features for m in fused.split([32, 32, 32])] == [32, 32, 32]
    on_cpu = SVDQLinear(64, 32, rank=4, fmt="nvfp4")
    assert "is on cpu, layer 0 on meta" in SVDQLinear.concat_mismatch([layers[0], on_cpu])
