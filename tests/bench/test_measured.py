"""The measured path, on tiny models on the CPU (timings meaningless; the code path is real)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dcgen_quant.bench import configs, measured, report


@pytest.mark.slow
def test_tiny_measure_writes_md_json_png(tmp_path):
    result = measured.measure("cpu", resolutions=(64,), tiny=True, progress=False)
    assert not result["skipped"], result["skipped"]
    kinds = {(r["kind"], r["model"], r["precision"]) for r in result["runs"]}
    assert ("step", "flux", "bf16") in kinds and ("step", "dcgen-flux-f64c128", "int4") in kinds
    assert ("decode", "flux-vae", "bf16") in kinds and (
        "decode",
        "dc-ae-1.5-f64c128",
        "bf16",
    ) in kinds
    for r in result["runs"]:
        assert len(r["times_s"]) == r["reps"] and all(t > 0 for t in r["times_s"])
    # W4A4 DC-Gen-FLUX runs with q/k/v fused, as load_quantized(fuse=True) would run it
    int4 = next(r for r in result["runs"] if r["precision"] == "int4" and r["kind"] == "step")
    assert "q/k/v fused in" in int4["note"], int4["note"]
    rows, runs, paths = report.write_results(result, tmp_path)
    assert {p.suffix for p in paths.values()} == {".md", ".json", ".png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(paths["json"].read_text())
    assert doc["env"]["torch"] == torch.__version__ and doc["env"]["date"]
    assert {r["precision"] for r in rows} == {"bf16", "bf16 vs int4"}
    bf16 = next(r for r in rows if r["precision"] == "bf16")
    assert bf16["base_s"] == pytest.approx(28 * bf16["base_step_s"] + bf16["base_decode_s"])
    assert bf16["dcgen_s"] == pytest.approx(20 * bf16["dcgen_step_s"] + bf16["dcgen_decode_s"])
    assert "timings meaningless" in paths["md"].read_text()


def test_budget_skips_rows_with_the_reason():
    result = measured.measure("cpu", resolutions=(64,), tiny=True, budget_s=0.0, progress=False)
    assert result["runs"] == [] and result["skipped"]
    assert all("time budget" in s["reason"] for s in result["skipped"])


def test_init_random_gives_finite_scaled_weights():
    model = configs.build_transformer("flux", "meta", torch.float32,
                                      **measured.TINY_TRANSFORMER["flux"])  # fmt: skip
    model = measured.init_random_(model.to_empty(device="cpu"), seed=3)
    w = model.transformer_blocks[0].ff.net[2].weight  # [hidden, 4 * hidden]
    assert torch.isfinite(w).all()
    assert w.std().item() == pytest.approx(1 / math.sqrt(w.shape[1]), rel=0.1)
    assert (model.transformer_blocks[0].ff.net[2].bias == 0).all()


def test_a_model_that_fails_to_build_skips_its_rows_once(monkeypatch):
    calls = []

    def broken(model, fmt, **kwargs):
        calls.append(fmt)
        raise RuntimeError("no kernel for this layout")

    monkeypatch.setattr("dcgen_quant.bench.w4a4.convert_to_w4a4", broken)
    row = ("step", "dcgen-flux-f64c128", "int4", 64, "dc-ae-1.5-f64c128")
    monkeypatch.setattr(measured, "_plan", lambda *a: [row, row[:3] + (128, row[4])])
    result = measured.measure("cpu", tiny=True, progress=False)
    assert result["runs"] == [] and calls == ["int4"]  # built once, not once per row
    assert [s["resolution"] for s in result["skipped"]] == [64, 128]
    assert all(s["reason"] == "model set-up failed: no kernel for this layout"
               for s in result["skipped"])  # fmt: skip
