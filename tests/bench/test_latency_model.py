"""Unit checks of the roofline and the host/GPU queue on synthetic ops."""

from __future__ import annotations

import dataclasses

import pytest

from dcgen_quant.bench import hardware, latency
from dcgen_quant.bench.opcount import Op

H100 = hardware.get_gpu("h100")


def test_roofline_compute_and_memory_bound():
    # 132 * 7 tiles = 7 full waves: no wave loss
    mm = Op("mm", "mm", "linear", flops=1e12, bytes=1e6, tiles=132 * 7)
    assert latency.op_seconds(mm, H100, H100.bf16) == pytest.approx(1e12 / (989e12 * 0.80))
    one_more = dataclasses.replace(mm, tiles=132 * 7 + 1)  # an 8th, almost empty wave
    assert latency.op_seconds(one_more, H100, H100.bf16) == pytest.approx(
        1e12 / (989e12 * 0.80 * (132 * 7 + 1) / (132 * 8))
    )
    mem = Op("add", "mem", "other", flops=0.0, bytes=3e9)
    assert latency.op_seconds(mem, H100, H100.bf16) == pytest.approx(3e9 / (3.35e12 * 0.90))
    w4 = Op("gemm_w4a4", "w4a4", "linear", 1e12, 1e6, 132, flops_aux=1e10, fmt="int4")
    expected = 1e12 / (1979e12 * H100.lowbit_eff) + 1e10 / (989e12 * 0.80)
    assert latency.op_seconds(w4, H100, H100.bf16) == pytest.approx(expected)


def test_queue_is_host_bound_for_tiny_kernels_and_gpu_bound_for_big_ones():
    tiny = [Op("add", "mem", "other", 0.0, 1e3)] * 1000
    t = latency.simulate(tiny, H100)
    assert t["total"] == pytest.approx(1000 * H100.dispatch_s, rel=1e-3)
    assert t["host"] > 0.99 * t["total"]
    big = [Op("mm", "mm", "linear", 1e12, 1e6, 132)] * 10
    t = latency.simulate(big, H100)
    assert t["host"] == pytest.approx(H100.dispatch_s)  # only the first launch waits
    assert t["total"] == pytest.approx(H100.dispatch_s + 10 * 1e12 / (989e12 * 0.8))
    assert sum(v for k, v in t.items() if k != "total") == pytest.approx(t["total"])


def test_prediction_adds_steps_decode_and_text():
    p = latency.predict_image(H100, "dcgen-flux-f64c128", 2048, 20)
    assert p.total_s == pytest.approx(20 * p.step_s + p.decode_s + p.text_s)
    assert sum(p.breakdown().values()) == pytest.approx(p.total_s)
    with pytest.raises(ValueError, match="steps=0"):
        latency.predict_image(H100, "flux", 1024, 0)
    with pytest.raises(ValueError, match="precision='fp8'"):
        latency.predict_image(H100, "flux", 1024, 1, "fp8")
