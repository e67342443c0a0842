"""``python -m dcgen_quant bench table``: text and JSON output, errors."""

from __future__ import annotations

import json

import pytest

from dcgen_quant.cli import main


def test_table_json_records(capsys):
    assert main(["bench", "table", "--gpu", "h100", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpu"] == "h100" and doc["mode"] == "predicted"
    assert set(doc["parameters"]) == {"mm_eff", "lowbit_eff", "attn_eff", "bw_eff", "dispatch_us"}
    rows = doc["rows"]
    assert [r["resolution"] for r in rows] == [1024, 2048, 4096]
    for r in rows:
        for key in ("resolution", "base_s", "dcgen_s", "speedup", "published_speedup"):
            assert key in r
        assert r["speedup"] == pytest.approx(r["base_s"] / r["dcgen_s"])
    assert [r["published_speedup"] for r in rows] == [4.2, 16.9, 52.9]


def test_table_text_has_paper_columns_and_breakdown(capsys):
    assert main(["bench", "table"]) == 0
    out = capsys.readouterr().out
    assert "paper" in out and "Breakdown" in out and "attention s" in out
    assert "52.9" in out and "213.81" in out


@pytest.mark.slow
def test_table_w4a4_rtx5090_json(capsys):
    assert main(["bench", "table", "--gpu", "rtx5090", "--w4a4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    row4k = rows[-1]
    assert row4k["precision"] == "bf16 vs nvfp4" and row4k["published_speedup"] == 138.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--base-steps", "0"], "--base-steps=0 must be >= 1"),
        (["--measured"], "--measured needs a CUDA GPU"),
        (["--attn-eff", "2"], "attn_eff=2.0 must be in (0, 1]"),
    ],
)
def test_bad_arguments_give_one_line_errors(capsys, argv, message):
    assert main(["bench", "table", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
