"""bench/quantizer_quality.py runs end to end on one small layer and records what it measured
and the command that reproduces it."""

import json

import pytest
import torch

from dcgen_quant.bench import quantizer_quality as qq


@pytest.mark.slow  # ~19 s wall at load 9 on 2 cores (a few seconds of CPU)
def test_quantizer_quality_small_layer(tmp_path):
    argv = ["--out", str(tmp_path), "--parts", "layers", "--sizes", "64x64"]
    argv += ["--formats", "int4", "--inputs", "correlated", "--repeats", "1"]
    argv += ["--variants", "default"]
    threads = torch.get_num_threads()
    try:
        assert qq.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "quantizer_quality.json").read_text())
    assert record["command"] == "python -m dcgen_quant.bench.quantizer_quality " + " ".join(argv)
    (entry,) = record["layers"]
    assert entry["layer"] == "64->64" and entry["format"] == "int4"
    rows = entry["rows"]
    assert set(rows) == {"baseline", "default"}  # baseline is always run: ratios are against it
    for row in rows.values():
        assert 0 < row["err_fresh"] < 0.5 and row["seconds"] > 0 and row["runs"] == 1
    assert rows["baseline"]["err_heldout"] is None  # nothing held out
    assert rows["default"]["err_heldout"] is not None
    text = (tmp_path / "quantizer_quality.md").read_text()
    assert record["command"] in text and "### Linear 64->64, correlated inputs, int4" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "fast"], "--variants: unknown variant(s) fast"),
        (["--inputs", "uniform"], "--inputs: expected iid and/or correlated"),
        (["--sizes", "12x"], "--sizes: expected KxN"),
    ],
)
def test_quantizer_quality_bad_flags(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        qq.main(["--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
