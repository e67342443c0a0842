"""The reproduction table: the issue's acceptance bars and the model's honesty checks."""

from __future__ import annotations

import dataclasses

import pytest

from dcgen_quant.bench import hardware, reproduce

PAPER_H100 = {1024: 4.2, 2048: 16.9, 4096: 52.9}


@pytest.fixture(scope="module")
def h100_rows():
    return reproduce.predicted_rows(hardware.get_gpu("h100"))


def test_h100_speedups_within_20_percent_of_paper(h100_rows):
    for row in h100_rows:
        paper = PAPER_H100[row["resolution"]]
        assert row["published_speedup"] == paper
        assert row["speedup"] == pytest.approx(paper, rel=0.20), row["resolution"]


@pytest.mark.slow
def test_rtx5090_nvfp4_4k_total_reduction_within_25_percent_of_138x():
    rows = reproduce.predicted_rows(hardware.get_gpu("rtx5090"), w4a4=True, resolutions=(4096,))
    (row,) = rows
    assert row["precision"] == "bf16 vs nvfp4"
    assert row["published_speedup"] == 138.0 and row["published_dcgen_s"] == 3.5
    assert row["speedup"] == pytest.approx(138.0, rel=0.25)


def test_published_numbers_do_not_feed_the_prediction(h100_rows, monkeypatch):
    """No per-row fitting: predictions are identical when the published table changes."""
    monkeypatch.setitem(reproduce.PUBLISHED, ("h100", "bf16"), {1024: (1.0, 1.0, 1.0)})
    again = reproduce.predicted_rows(hardware.get_gpu("h100"))
    for a, b in zip(h100_rows, again):
        assert (a["base_s"], a["dcgen_s"]) == (b["base_s"], b["dcgen_s"])
    assert again[0]["published_speedup"] == 1.0 and again[1]["published_speedup"] is None


def test_breakdown_explains_the_ratio(h100_rows):
    by_res = {r["resolution"]: r for r in h100_rows}
    for row in h100_rows:
        for which in ("base", "dcgen"):
            parts = row[f"{which}_breakdown"]
            assert sum(parts.values()) == pytest.approx(row[f"{which}_s"], rel=1e-9)
    # 4K base is attention-bound (REFERENCE.md: ~78% of its FLOPs); DC-Gen at 4K is not
    b4 = by_res[4096]["base_breakdown"]
    assert b4["attention"] / by_res[4096]["base_s"] > 0.6
    d4 = by_res[4096]["dcgen_breakdown"]
    assert d4["attention"] / by_res[4096]["dcgen_s"] < 0.3
    # the speedup grows with resolution, as the token ratio and attention share grow
    assert by_res[1024]["speedup"] < by_res[2048]["speedup"] < by_res[4096]["speedup"]


def test_assumptions_move_the_table_the_physical_way(h100_rows):
    g = hardware.get_gpu("h100")
    fewer = reproduce.predicted_rows(g, assumptions=reproduce.Assumptions(base_steps=20))
    for a, b in zip(h100_rows, fewer):
        assert b["base_s"] < a["base_s"] and b["dcgen_s"] == a["dcgen_s"]
    faster_attn = reproduce.predicted_rows(dataclasses.replace(g, attn_eff=0.66))
    assert faster_attn[2]["speedup"] < h100_rows[2]["speedup"]  # 4K: attention-bound base
    f64 = reproduce.Assumptions(dcgen_autoencoders={1024: "dc-ae-1.5-f64c128"})
    at1k = reproduce.predicted_rows(g, assumptions=f64, resolutions=(1024,))[0]
    assert at1k["dcgen_tokens"] == 256 and at1k["dcgen_s"] < h100_rows[0]["dcgen_s"]


def test_w4a4_uses_the_gpu_native_format():
    assert hardware.get_gpu("h100").lowbit_format == "int4"
    assert hardware.get_gpu("b200").lowbit_format == "nvfp4"
    row = reproduce.predicted_rows(hardware.get_gpu("h200"), w4a4=True, resolutions=(2048,))[0]
    assert row["precision"] == "bf16 vs int4"
    assert row["dcgen_s"] < row["dcgen_bf16_s"] and row["base_w4a4_s"] < row["base_s"]


def test_bad_assumptions_raise():
    g = hardware.get_gpu("h100")
    with pytest.raises(ValueError, match="base_steps=0"):
        reproduce.predicted_rows(g, assumptions=reproduce.Assumptions(base_steps=0))
    with pytest.raises(ValueError, match="autoencoder 'flux-vae'"):
        reproduce.Assumptions(dcgen_autoencoders={1024: "flux-vae"}).resolved()
    with pytest.raises(ValueError, match="unknown gpu 'a100'"):
        hardware.get_gpu("a100")
    with pytest.raises(ValueError, match="attn_eff=1.5"):
        hardware.get_gpu("h100", attn_eff=1.5)
