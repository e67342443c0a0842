"""Backward compatibility: checkpoints written before the header checksum (format versions 1 and
2, by dcgen_quant at commit dd83c74: tests/data/make_legacy_fixtures.py) still load, with a
warning, and reproduce the outputs their writer computed bit for bit; saved again, they carry
the header checksum and load without one."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcgen_quant.checkpoint import load_quantized, read_metadata, save_quantized
from dcgen_quant.cli import main

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = [("legacy_v1_nvfp4", 1, "nvfp4"), ("legacy_v2_int4", 2, "int4")]


def _outputs(name):
    saved = load_file(str(DATA / f"{name}.outputs.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in saved.items() if k != "output"}
    return inputs, saved["output"]


@pytest.mark.parametrize("name,version,fmt", FIXTURES)
def test_a_file_of_the_previous_format_loads_and_reproduces_its_outputs(tmp_path, name, version,
                                                                        fmt):  # fmt: skip
    path = DATA / f"{name}.safetensors"
    meta = read_metadata(path)
    assert meta["format_version"] == version and "integrity" not in meta
    assert meta["quantization_config"]["format"] == fmt
    with pytest.warns(UserWarning, match="no header checksum"):
        model = load_quantized(path)
    inputs, expected = _outputs(name)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["inspect", str(path)]) == 0
    assert "not authenticated" in out.getvalue() and "verified" in out.getvalue()

    # written again by this version: the same tensors, now with a header checksum
    again = save_quantized(model, tmp_path / "again.safetensors")
    assert read_metadata(again)["integrity"]["sha256"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a file with a header checksum
        reloaded = load_quantized(again)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, expected)
    assert read_metadata(again)["format_version"] == version
