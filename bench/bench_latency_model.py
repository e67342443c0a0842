"""Latency-model benchmarks (``pytest --benchmark``): op tracing and the predicted tables.

The table benchmarks record their rows in pytest-benchmark's ``extra_info`` so that
``--benchmark-json`` carries the predicted speedups next to the timings.
"""

from __future__ import annotations

import pytest

from dcgen_quant.bench import configs, hardware, opcount, reproduce


def test_trace_flux_step_1k(benchmark):
    """Time to trace one full-size FLUX step at 1K on the meta device (no memory)."""
    model = configs.build_transformer("flux")
    inputs = configs.transformer_inputs("flux", 1024)
    ops = benchmark.pedantic(lambda: opcount.trace(lambda: model(**inputs)), rounds=2)
    total = opcount.summarize(ops)["total"]
    benchmark.extra_info.update(step_tflop=total["flops"] / 1e12, kernels=total["ops"])
    assert 7.0e13 < total["flops"] < 8.0e13


@pytest.mark.parametrize("w4a4", [False, True], ids=["bf16", "w4a4"])
@pytest.mark.parametrize("gpu", list(hardware.GPUS))
def test_predicted_table(benchmark, gpu, w4a4):
    """The reproduction table per GPU (first round includes the cached traces)."""
    g = hardware.get_gpu(gpu)
    rows = benchmark.pedantic(reproduce.predicted_rows, args=(g, w4a4), rounds=1)
    keys = ("resolution", "base_s", "dcgen_s", "speedup", "published_speedup")
    benchmark.extra_info["rows"] = [{k: r[k] for k in keys} for r in rows]
    assert all(r["speedup"] > 1 for r in rows)
