"""An imported Nunchaku FLUX is an ordinary model of our layers: it runs, fuses q/k/v with the
same outputs, and converts (streamed) to a dcgen_quant checkpoint that loads back to the same
tensors and outputs."""

from __future__ import annotations

import pytest
import torch

from dcgen_quant import load_quantized
from dcgen_quant.checkpoint import read_metadata
from dcgen_quant.interop.nunchaku.importer import convert_to_dcgen_quant, load_foreign
from dcgen_quant.nn import SVDQLinear, SVDQSplitLinear, W4A16Linear

from ..quantized_models import tiny_flux_inputs
from .helpers import small_known, small_nunchaku_file

pytest.importorskip("deepcompressor.backend.nunchaku.convert")
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


def _equal(a: dict, b: dict) -> list[str]:
    def bits(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(bits(a[k]), bits(b[k]))]


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def nunchaku_file(request):
    return small_known(request.param), small_nunchaku_file(request.param)


def test_imported_model_runs_and_fuses(nunchaku_file):
    kn, path = nunchaku_file
    model = load_quantized(path)
    kinds = {type(m) for m in model.modules()}
    assert {SVDQLinear, SVDQSplitLinear, W4A16Linear} <= kinds
    assert model.transformer_blocks[0].ff.net[2].act_unsigned == (kn.fmt == "int4")
    inputs = tiny_flux_inputs(model, tokens=16, text=8)
    with torch.no_grad():
        y = model(**inputs).sample
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    from dcgen_quant.fusion import fuse_projections

    fused = load_quantized(path)
    result = fuse_projections(fused)
    if kn.fmt == "int4":
        assert set(result.values()) == {"fused"}, result
    else:
        # DeepCompressor gives q, k and v their own NVFP4 tensor scales (wcscales): each member
        # keeps its own wtscale and the attention stays unfused (docs/INTEROP.md)
        assert all("different wtscale" in r for r in result.values()), result
    with torch.no_grad():
        yf = fused(**inputs).sample
    assert torch.equal(y, yf)


def test_convert_streams_a_checkpoint_that_loads_back_identically(nunchaku_file, tmp_path):
    kn, path = nunchaku_file
    out = tmp_path / "ours.safetensors"
    summary = convert_to_dcgen_quant(path, out, progress=False)
    assert summary["precision"] == kn.fmt and summary["input_format"] == "nunchaku"
    assert summary["blocks"] == 2 and summary["tensors"] > 0
    meta = read_metadata(out)
    assert meta["format_version"] == (2 if kn.fmt == "int4" else 2)  # split proj_out: version 2
    assert meta["quantization_config"]["format"] == kn.fmt
    direct = load_foreign(path)
    loaded = load_quantized(out)  # verifies every CRC-32 the stream writer wrote
    assert _equal(direct.state_dict(), loaded.state_dict()) == []
    inputs = tiny_flux_inputs(direct, tokens=16, text=8)
    with torch.no_grad():
        assert torch.equal(direct(**inputs).sample, loaded(**inputs).sample)
    # a second conversion replaces our own earlier output; a foreign file is never overwritten
    convert_to_dcgen_quant(path, out, progress=False)
    foreign = tmp_path / "weights.safetensors"
    foreign.write_bytes(path.read_bytes())
    with pytest.raises(FileExistsError):
        convert_to_dcgen_quant(path, foreign, progress=False)
    assert foreign.read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="same file"):
        convert_to_dcgen_quant(path, path, progress=False)


def test_load_into_a_given_model(nunchaku_file):
    """``load_quantized(path, model=...)`` checks the model against the file's config first."""
    from dcgen_quant.checkpoint import CheckpointError
    from dcgen_quant.models.tiny import tiny_flux

    kn, path = nunchaku_file
    model = tiny_flux(num_layers=1, num_single_layers=1)
    loaded = load_quantized(path, model=model)
    assert loaded is model and isinstance(model.transformer_blocks[0].attn.to_q, SVDQLinear)
    with pytest.raises(CheckpointError, match="num_layers"):
        load_quantized(path, model=tiny_flux())
