"""bench/quantizer_bound.py: the oracle sweep runs on a small layer and records what it found."""

import json

import pytest
import torch

from dcgen_quant.bench import quantizer_bound as qb


def test_quick_sweep_records_the_best_point_and_its_parts(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert qb.main(["--out", str(tmp_path), "--quick", "--formats", "int4"]) == 0
    finally:
        torch.set_num_threads(threads)
    (entry,) = json.loads((tmp_path / "quantizer_bound.json").read_text())["entries"]
    assert entry["layer"] == "256->512" and entry["format"] == "int4"
    points = entry["points"]
    assert len(points) == 5  # a = 0, 0.5 (two betas), 1; outliers x10
    assert entry["best"] == min(points, key=lambda p: p["total"])
    for p in points:
        # each 4-bit side alone errs less than both together, and never nothing
        assert 0 < p["weight"] < p["total"] and 0 < p["activation"] < p["total"], p
    # no smoothing at all leaves the 30x channels in the activations: worse than the best
    assert points[0]["smoothing"] == "a=0.0, b=0" and points[0]["total"] > entry["best"]["total"]
    assert 0 < entry["baseline"] < 0.5 and 0 < entry["default"] < 0.5
    assert "| 256->512 | iid | int4 |" in (tmp_path / "quantizer_bound.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [(["--formats", "int8"], "--formats: unknown format(s) int8"),
     (["--inputs", "uniform"], "--inputs: expected iid and/or correlated")],
)  # fmt: skip
def test_bad_flags_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        qb.main(["--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
