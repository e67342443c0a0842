"""The other engineers' benchmark modules, run as pytest-benchmark items (``--benchmark``).

``dcgen_quant.bench.kernel_bench`` (kernels against cuBLAS bf16, ``torch._scaled_mm`` fp8 and
SDPA) and ``dcgen_quant.bench.quantizer_speed`` (SVDQuant time per layer) are command-line
modules (``--out DIR [--quick]``). Each runs once here in a subprocess, ``--quick`` on a CPU,
full on a GPU; its wall time is the benchmark, its JSON output goes to ``extra_info``. A module
not in this build is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

TIMEOUT_S = 240


@pytest.mark.parametrize("module", ["kernel_bench", "quantizer_speed"])
def test_suite(benchmark, bench_size, tmp_path, module):
    name = f"dcgen_quant.bench.{module}"
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not in this build")
    cmd = [sys.executable, "-m", name, "--out", str(tmp_path)]
    if bench_size == "small":
        cmd.append("--quick")

    def run():
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)

    proc = benchmark.pedantic(run, rounds=1)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )
    results = {}
    for path in sorted(tmp_path.glob("*.json")):
        results[path.stem] = json.loads(path.read_text())
    assert results, f"{name} wrote no JSON into {tmp_path}"
    benchmark.extra_info["results"] = results
