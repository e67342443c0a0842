"""``python -m dcgen_quant convert IN OUT --to dcgen_quant``: the import direction of the command
(in-process, through dcgen_quant.cli.main): a table or JSON on success, one ``error:`` line and
exit code 2 on bad input, nothing written."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from dcgen_quant.checkpoint import read_metadata
from dcgen_quant.cli import main

from .helpers import small_nunchaku_file

pytest.importorskip("deepcompressor.backend.nunchaku.convert")
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


def test_convert_to_dcgen_quant(tmp_path, capsys):
    src = small_nunchaku_file("int4")
    out = tmp_path / "ours.safetensors"
    assert main(["convert", str(src), str(out), "--to", "dcgen_quant", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    row = doc["rows"][0]
    assert row["precision"] == "int4" and row["input_format"] == "nunchaku" and row["blocks"] == 2
    assert read_metadata(out)["quantization_config"]["format"] == "int4"


def _broken(tmp_path, drop=None, cut=False):
    src = small_nunchaku_file("nvfp4")
    if cut:
        path = tmp_path / "cut.safetensors"
        data = src.read_bytes()
        path.write_bytes(data[: len(data) - 1000])
        return path
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}  # noqa: SIM118
        meta = f.metadata()
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("missing", "'single_transformer_blocks.0.mlp_fc2.lora_up'"),
        ("truncated", "truncated"),
    ],
)
def test_bad_input_is_one_error_line_and_no_output(tmp_path, capsys, kind, needle):
    bad = (
        _broken(tmp_path, drop="single_transformer_blocks.0.mlp_fc2.lora_up")
        if kind == "missing"
        else _broken(tmp_path, cut=True)
    )
    out = tmp_path / "out" / "ours.safetensors"
    assert main(["convert", str(bad), str(out), "--to", "dcgen_quant"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))
