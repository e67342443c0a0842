"""bench/interop_speed.py runs end to end (tiny geometry): it writes a valid random checkpoint
of our format, converts it in a subprocess and records the figures."""

import json

import pytest

from dcgen_quant.bench import interop_speed


@pytest.mark.slow
def test_interop_speed_tiny(tmp_path):
    assert interop_speed.main(["--tiny", "--out", str(tmp_path)]) == 0
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("interop_speed-int4-*.json")]
    (row,) = [r for r in record["rows"] if r["direction"] == "dcgen_quant -> nunchaku"]
    assert row["seconds"] > 0 and row["peak_rss_mib"] > 0 and row["output_gib"] > 0
    assert record["geometry"].startswith("tiny")
