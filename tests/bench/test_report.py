"""The measured-results report on a full-size result as the GPU run would produce it.

The timings below are made up (no GPU here); the test checks the report's arithmetic and its
predicted columns, not any speed.
"""

from __future__ import annotations

import json

import pytest

from dcgen_quant.bench import hardware, latency, report


def _run(kind, model, prec, ae, median):
    return {"kind": kind, "model": model, "precision": prec, "resolution": 1024,
            "autoencoder": ae, "times_s": [median], "median_s": median, "warmup": 1, "reps": 1,
            "note": ""}  # fmt: skip


@pytest.fixture
def result():
    return {
        "env": {"date": "2026-11-28", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0",
                "diffusers": "0.42.1", "python": "3.12.3", "device": "cuda",
                "gpu_name": "NVIDIA H200", "driver": "580.159.04"},  # fmt: skip
        "gpu": "h200", "tiny": False, "format": "int4", "w4a4_backend": "triton",
        "w4a4_unavailable": None, "skipped": [], "wall_s": 100.0,
        "ceilings": {"matmul_bf16_tflops": 790.0, "sdpa_bf16_tflops": 450.0, "copy_tbs": 4.3},
        "runs": [
            _run("step", "flux", "bf16", "flux-vae", 0.150),
            _run("decode", "flux-vae", "bf16", "flux-vae", 0.050),
            _run("step", "dcgen-flux-f32c32", "bf16", "dc-ae-f32c32", 0.040),
            _run("decode", "dc-ae-f32c32", "bf16", "dc-ae-f32c32", 0.030),
            _run("step", "dcgen-flux-f32c32", "int4", "dc-ae-f32c32", 0.030),
        ],
    }  # fmt: skip


def test_rows_whole_image_and_predictions(result):
    rows = report.measured_rows(result)
    assert [r["precision"] for r in rows] == ["bf16", "bf16 vs int4"]
    bf16, w4 = rows
    assert bf16["base_s"] == pytest.approx(28 * 0.150 + 0.050)
    assert bf16["dcgen_s"] == pytest.approx(20 * 0.040 + 0.030)
    assert w4["dcgen_s"] == pytest.approx(20 * 0.030 + 0.030)
    assert bf16["speedup"] == pytest.approx(bf16["base_s"] / bf16["dcgen_s"])
    assert bf16["published_speedup_h100"] == 4.2
    # predicted = the latency model's steps x step + decode, text excluded
    p = latency.predict_image(hardware.get_gpu("h200"), "flux", 1024, 28)
    assert bf16["predicted_base_s"] == pytest.approx(p.total_s - p.text_s)
    # calibrated: the measured ceilings replace the efficiencies (attention 450 / 989)
    assert bf16["calibrated_predicted_base_s"] > bf16["predicted_base_s"]  # 0.455 < 0.50
    effs = report.implied_efficiencies(result)
    assert effs["attn_eff"] == pytest.approx(450 / 989)
    assert effs["bw_eff"] == pytest.approx(4.3 / 4.8)


def test_files(result, tmp_path):
    rows, runs, paths = report.write_results(result, tmp_path)
    assert paths["md"].name == "h200-2026-11-28.md"
    md = paths["md"].read_text()
    assert "NVIDIA H200" in md and "580.159.04" in md and "triton 3.6.0" in md
    assert "Implied efficiencies: mm_eff 0.80" in md and "'triton' backend" in md
    doc = json.loads(paths["json"].read_text())
    assert doc["rows"][0]["base_s"] == pytest.approx(rows[0]["base_s"])
    assert all("measured/predicted" in r and "calibrated_ms" in r for r in doc["per_run"])
    assert paths["png"].stat().st_size > 1000
