"""The ``--benchmark`` flag of the root conftest.py, with pytest-benchmark's own options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pytest(*args):
    # a clean environment: run from an xdist worker, the inherited PYTEST_* variables kept the
    # child's pytest-benchmark from writing its JSON
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )  # fmt: skip


def test_without_the_flag_bench_files_are_skipped():
    out = _pytest("-q", "-rs", "bench/bench_ops.py", "-k", "linear_baseline")
    assert out.returncode == 0, out.stdout
    assert "1 skipped" in out.stdout and "run with `pytest --benchmark`" in out.stdout


def test_flag_collects_bench_dir_once():
    out = _pytest("--benchmark", "--collect-only", "-q")
    assert out.returncode == 0, out.stdout
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert ids and all(line.startswith("bench/bench_") for line in ids)
    assert len(ids) == len(set(ids))  # no file collected twice
    explicit = _pytest("--benchmark", "--collect-only", "-q", "bench/bench_ops.py")
    n = sum("::" in line for line in explicit.stdout.splitlines())
    assert n == sum(line.startswith("bench/bench_ops.py") for line in ids)


@pytest.mark.slow
def test_benchmark_json_is_written(tmp_path):
    path = tmp_path / "bench.json"
    out = _pytest("--benchmark", "-q", "bench/bench_ops.py", "-k", "linear_baseline",
                  f"--benchmark-json={path}", "--benchmark-max-time=0.2")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(path.read_text())
    (bench,) = doc["benchmarks"]
    assert bench["name"] == "test_linear_baseline" and bench["stats"]["median"] > 0
    assert bench["extra_info"]["tflop"] > 0
