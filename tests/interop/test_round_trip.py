"""Round trip: ours -> Nunchaku -> ours. A tiny FLUX quantized by our quantizer
(``nunchaku_compatible``) comes back with bit-identical layer tensors and a bit-identical
reference forward. The one value Nunchaku's format cannot carry is the adaLN bias of the scale
chunks, stored as ``b + 1`` in 16 bits: it comes back as ``round(round(b + 1) - 1)``, exactly
the values the exporter counts; with biases where ``b + 1`` is exact, everything is identical."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import dcgen_quant
from dcgen_quant.interop.nunchaku import packing
from dcgen_quant.interop.nunchaku.exporter import convert_to_nunchaku
from dcgen_quant.interop.nunchaku.importer import load_foreign
from dcgen_quant.models import synthetic_calibration
from dcgen_quant.models.tiny import tiny_flux
from dcgen_quant.nn import SVDQLinear, SVDQSplitLinear

from ..quantized_models import tiny_flux_inputs

ADALN = {"norm1.linear": 6, "norm1_context.linear": 6, "norm.linear": 3}


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _adaln(name: str) -> int | None:
    return next((c for suffix, c in ADALN.items() if name.endswith(f".{suffix}.bias")), None)


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def ours(request, tmp_path_factory):
    torch.set_num_threads(1)
    model = tiny_flux(seed=1, dtype=torch.bfloat16, num_layers=1, num_single_layers=1)
    calib = synthetic_calibration(model, samples=1, steps=1, seed=0)
    config = dcgen_quant.QuantConfig(
        format=request.param, rank=16, nunchaku_compatible=True, smooth_grid=2,
        lowrank_iters=1, calib_tokens=128, search_tokens=64,
    )  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        dcgen_quant.quantize_model(model, calib, config)
    path = tmp_path_factory.mktemp(f"rt-{request.param}") / "ours.safetensors"
    dcgen_quant.save_quantized(model, path)
    return path


def _round_trip(path):
    out = path.with_name(path.stem + "-nunchaku.safetensors")
    result = convert_to_nunchaku(path, out)
    return load_foreign(out), result


@pytest.mark.slow
def test_ours_to_nunchaku_to_ours(ours):
    original = dcgen_quant.load_quantized(ours)
    if original.dcgen_quant_config.format == "int4":
        assert isinstance(original.single_transformer_blocks[0].proj_out, SVDQSplitLinear)
    else:  # our NVFP4 proj_out is one layer; Nunchaku cuts it in two; the import joins them
        assert type(original.single_transformer_blocks[0].proj_out) is SVDQLinear
    back, result = _round_trip(ours)
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    changed = 0
    for key, t in a.items():
        chunks = _adaln(key)
        if chunks is None:
            assert t.dtype == b[key].dtype and torch.equal(_bits(t), _bits(b[key])), key
            continue
        expected = packing.unfold_adanorm_bias(packing.fold_adanorm_bias(t, chunks), chunks)
        assert torch.equal(b[key], expected), key
        changed += int((b[key] != t).sum())
    folds = [c for c in result["changes"] if c["kind"] == "adaln-bias-fold"]
    assert changed == (folds[0]["values_changed"] if folds else 0) and changed > 0

    # the original with those biases as Nunchaku stores them: identical forward, and a second
    # round trip changes nothing at all
    for name, module in original.named_modules():
        if (chunks := _adaln(f"{name}.bias")) is not None:
            module.bias = packing.unfold_adanorm_bias(
                packing.fold_adanorm_bias(module.bias, chunks), chunks
            )
    assert all(torch.equal(_bits(t), _bits(b[k])) for k, t in original.state_dict().items())
    inputs = tiny_flux_inputs(original, tokens=16, text=8)
    with torch.no_grad():
        assert torch.equal(original(**inputs).sample, back(**inputs).sample)
    exact = ours.with_name("exact.safetensors")
    dcgen_quant.save_quantized(original, exact)
    again, result2 = _round_trip(exact)
    assert not [c for c in result2["changes"] if c["kind"] == "adaln-bias-fold"]
    assert all(torch.equal(_bits(t), _bits(again.state_dict()[k])) for k, t in b.items())
