"""bench/kernel_bench.py on CPU: a clear refusal without --quick, and the interpreter smoke run
(tiny shapes through the same code path) writing its markdown + JSON, one failing case recorded
without ending the run."""

from __future__ import annotations

import json

import pytest

from dcgen_quant.bench import kernel_bench


@pytest.fixture(autouse=True)
def cpu_only(device):
    if device == "cuda":
        pytest.skip("on a GPU the benchmark is run by bench/gpu_check.sh, not by the tests")


def test_refuses_without_gpu(tmp_path, capsys):
    assert kernel_bench.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--quick" in err
    assert not (tmp_path / "kernel_bench.json").exists()


@pytest.mark.slow
def test_quick_interpreter_run_writes_tables(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("deliberately broken case")

    monkeypatch.setattr(kernel_bench, "case_w4a16", broken)
    argv = ["--out", str(tmp_path), "--quick", "--only",
            "quantize,w4a16,attention,lowrank,fusion,unsigned"]  # fmt: skip
    assert kernel_bench.main(argv) == 0
    doc = json.loads((tmp_path / "kernel_bench.json").read_text())
    md = (tmp_path / "kernel_bench.md").read_text()
    assert doc["environment"]["interpreter"] is True
    rows = doc["rows"]
    failed = [r for r in rows if "deliberately broken" in (r.get("error") or "")]
    assert len(failed) == 2  # both w4a16 formats recorded ...
    triton_rows = [r for r in rows if r.get("backend") == "triton"]
    ops_done = {r["op"] for r in triton_rows}  # ... and the other cases still ran
    assert {"quantize_act int4", "quantize_act nvfp4", "attention", "attention 8-bit"} <= ops_done
    assert {"low-rank overhead int4", "q/k/v fusion int4", "svdq_linear int4 unsigned"} <= ops_done
    fusion = next(r for r in triton_rows if r["op"] == "q/k/v fusion int4")
    assert fusion["max_rel_err"] <= 1e-6, fusion  # each column computed as in its own layer
    unsigned = next(r for r in triton_rows if r["op"] == "svdq_linear int4 unsigned")
    assert unsigned["max_rel_err"] < 0.5 and "vs" in unsigned["note"], unsigned
    assert unsigned["max_rel_err"] < unsigned["signed_max_rel_err"], unsigned  # 0.13 vs 0.23
    assert all(r["ms"] > 0 and not r.get("error") for r in triton_rows)
    assert all("bit-exact" in r["note"] for r in triton_rows if r["op"].startswith("quantize"))
    assert "| quantize_act int4 | triton |" in md
    assert doc["skipped"] == [] and doc["elapsed_s"] > 0


def test_budget_stops_starting_cases_and_keeps_partial_results(tmp_path):
    argv = ["--out", str(tmp_path), "--quick", "--only", "quantize,attention", "--budget-s", "0"]
    assert kernel_bench.main(argv) == 0
    doc = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert doc["rows"] == [] and doc["skipped"]  # nothing started after 0 s, all listed
    assert "skipped (time budget)" in (tmp_path / "kernel_bench.md").read_text()


def test_plan_puts_the_target_cases_first():
    every = set(kernel_bench.OPS) - {"lead"}
    labels = [c[0] for c in kernel_bench.plan(quick=False, device="cuda", only=every)]
    lead = [c[0] for c in kernel_bench.plan(quick=False, device="cuda", only={"lead"})]
    assert lead == ["gemm int4 4096x3072x3072", "gemm int4 4096x12288x3072", "low-rank overhead",
                    "quantize int4 4096x3072", "attention S=4608"]  # fmt: skip
    assert labels[: len(lead)] == lead and len(labels) > len(lead)


def test_unknown_only_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        kernel_bench.main(["--out", str(tmp_path), "--only", "gemm,fft"])
