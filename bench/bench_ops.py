"""Op microbenchmarks (``pytest --benchmark``): dcgen_quant ops against the torch baseline.

Small sizes on a CPU (reference backend, a smoke test of the harness), FLUX sizes on a GPU
(whatever backend ``auto`` picks: cuda, triton, else reference). TFLOP/s land in
``extra_info``. The triton engineer's ``dcgen_quant.bench.kernel_bench`` is the full kernel
comparison; bench_suites.py runs it.
"""

from __future__ import annotations

import pytest
import torch

from dcgen_quant import ops
from dcgen_quant.nn import SVDQLinear

SIZES = {
    "small": {"m": 256, "k": 512, "n": 512, "heads": 2, "seq": 256},
    "full": {"m": 4608, "k": 3072, "n": 12288, "heads": 24, "seq": 4608},  # FLUX 1K, fc1
}


def _setup(bench_size):
    dev = "cuda" if bench_size == "full" else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    return SIZES[bench_size], torch.device(dev), dtype


def _timed(fn, device):
    if device.type == "cuda":

        def run():
            out = fn()
            torch.cuda.synchronize(device)
            return out

        return run
    return fn


def _record(benchmark, flops):
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["tflops"] = flops / stats.stats.median / 1e12
    benchmark.extra_info["tflop"] = flops / 1e12


def test_linear_baseline(benchmark, bench_size):
    s, dev, dtype = _setup(bench_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["m"], s["k"], generator=g).to(dev, dtype)
    w = torch.randn(s["n"], s["k"], generator=g).to(dev, dtype)
    out = benchmark(_timed(lambda: torch.nn.functional.linear(x, w), dev))
    assert out.shape == (s["m"], s["n"])
    _record(benchmark, 2.0 * s["m"] * s["n"] * s["k"])


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_svdq_linear(benchmark, bench_size, fmt):
    from dcgen_quant.bench.w4a4 import _set_random_

    s, dev, dtype = _setup(bench_size)
    layer = SVDQLinear(s["k"], s["n"], rank=32, fmt=fmt, dtype=dtype, device=dev)
    with torch.no_grad():
        _set_random_(layer, (s["n"], s["k"]), torch.Generator(device=dev).manual_seed(0))
    x = torch.randn(s["m"], s["k"], generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    with torch.no_grad():
        out = benchmark(_timed(lambda: layer(x), dev))
    assert torch.isfinite(out).all()
    benchmark.extra_info["backend"] = ops.get_backend()
    _record(benchmark, 2.0 * s["m"] * s["n"] * s["k"])


@pytest.mark.parametrize("impl", ["sdpa", "dcgen"])
def test_attention(benchmark, bench_size, impl):
    s, dev, dtype = _setup(bench_size)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, s["heads"], s["seq"], 128, generator=g).to(dev, dtype) for _ in "qkv")
    if impl == "sdpa":
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    else:
        fn = lambda: ops.attention(q, k, v, None)  # noqa: E731
    out = benchmark(_timed(fn, dev))
    assert out.shape == q.shape
    _record(benchmark, 4.0 * s["heads"] * s["seq"] ** 2 * 128)
