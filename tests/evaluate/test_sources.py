"""What --model / --reference name: described from files, the default reference, checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dcgen_quant.evaluate import sources as S


def test_embedded_and_transformer_dirs(tmp_path):
    from dcgen_quant.models.tiny import tiny_flux

    flux = S.describe_source("tiny-flux", "--model")
    assert (flux.kind, flux.family, flux.config["num_layers"]) == ("embedded", "flux", 2)
    assert S.embedded_origin(flux) == "tiny-flux"
    tiny_flux(seed=0).save_pretrained(tmp_path / "same")
    tiny_flux(seed=1).save_pretrained(tmp_path / "other")
    same = S.describe_source(str(tmp_path / "same"), "--model")
    other = S.describe_source(str(tmp_path / "other"), "--model")
    assert same.kind == "transformer" and same.fingerprint != other.fingerprint
    # same config, same weights -> made from the embedded model; other weights -> not
    assert S.embedded_origin(same) == "tiny-flux" and S.embedded_origin(other) is None
    assert S.default_reference([same]) == "tiny-flux"
    with pytest.raises(ValueError, match="--reference: required"):
        S.default_reference([same, other])
    S.assign_labels(srcs := [flux, same, other, S.describe_source("tiny-flux", "--model")])
    assert [s.label for s in srcs] == ["tiny-flux", "same", "other", "tiny-flux-2"]
    with pytest.raises(ValueError, match="mismatched model families"):
        S.check_compatible(flux, [S.describe_source("tiny-sana", "--model")])


def test_a_foreign_safetensors_file_goes_through_load_quantized(tmp_path, monkeypatch):
    """A 4-bit file without our metadata (another engine's format) is described from what
    load_quantized returns for it, once load_quantized imports that format."""
    import dcgen_quant.checkpoint as C
    from dcgen_quant.models.tiny import tiny_flux
    from dcgen_quant.quantize import QuantConfig

    path = tmp_path / "foreign.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.qweight": torch.zeros(4, 2, dtype=torch.uint8)},
              str(path), metadata={"format": "other-engine"})  # fmt: skip
    with pytest.raises(C.CheckpointError, match="'format' is 'other-engine'"):
        S.describe_source(str(path), "--model")  # not importable today: our format's message

    def importer(p, model=None, device="cpu", layout="auto", verify=True, fuse=False):
        m = tiny_flux(seed=3, dtype=torch.bfloat16)
        m.dcgen_quant_config = QuantConfig(format="nvfp4")
        m.dcgen_quant_report = None
        return m

    monkeypatch.setattr(C, "load_quantized", importer)
    source = S.describe_source(str(path), "--model")
    assert (source.kind, source.model_class, source.quant_dtype) == (
        "checkpoint", "FluxTransformer2DModel", "bfloat16")  # fmt: skip
    assert source.extra["quantization"] == {"format": "nvfp4", "imported": True}
    first = source.fingerprint
    save_file({"x": torch.ones(3)}, str(path), metadata={"format": "other-engine"})
    assert S.describe_source(str(path), "--model").fingerprint != first  # content changed
