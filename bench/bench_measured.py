"""Measured-mode benchmark (``pytest --benchmark``): one DC-Gen-FLUX denoising step.

Full size (DC-Gen-FLUX f64c128 at 1K, bf16, random weights) on a GPU; the tiny configuration
in float32 on a CPU. ``python -m dcgen_quant bench table --measured`` is the full table.
"""

from __future__ import annotations

import pytest
import torch

from dcgen_quant.bench import configs, measured


@pytest.fixture(scope="module")
def step(bench_size):
    dev = torch.device("cuda" if bench_size == "full" else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    over = {} if bench_size == "full" else measured.TINY_TRANSFORMER["flux"]
    res = 1024 if bench_size == "full" else 128
    name = "dcgen-flux-f64c128"
    model = configs.build_transformer(name, "meta", dtype, **over)
    model = measured.init_random_(model.to_empty(device=dev))
    inputs = configs.transformer_inputs(name, res, dev, dtype, config=over)

    @torch.no_grad()
    def run():
        out = model(**inputs)[0]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    return run, res


def test_dcgen_flux_step(benchmark, step):
    run, res = step
    out = benchmark(run)
    benchmark.extra_info["resolution"] = res
    assert torch.isfinite(out).all()
