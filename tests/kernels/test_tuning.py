"""Autotune lists and the GPU launch path: pruning by shared memory and shape, and the autotuner
+ heuristics + kernel wiring run end to end in the interpreter (timing runs faked)."""

from __future__ import annotations

import math

import pytest
import torch
from triton.runtime.autotuner import Autotuner

from dcgen_quant import kernels, ops
from dcgen_quant.kernels import tuning

from .accuracy import assert_within_reference_error
from .test_attention import same_precision_reference, truth64
from .test_gemm import make_w4a4, w4a4_truth
from .test_quantize_act import gelu_inputs

pytestmark = pytest.mark.interpreter

ARCHS = ["sm_90", "sm_100", "sm_120"]


@pytest.fixture
def exercise(monkeypatch, device):
    """Run the launchers' GPU path in the interpreter; 'time' each config by its tile area
    (largest first: quick in the interpreter). Returns the configs the autotuner benchmarked."""
    if device != "cpu":
        pytest.skip("exercises the GPU launch path in the interpreter")
    benched = []

    def fake_bench(self, *args, config, **meta):
        benched.append(config)
        k = config.kwargs
        return [1.0 / (k["BLOCK_M"] * k.get("BLOCK_N", k.get("BLOCK_K", 1))), 0.0, 0.0]

    monkeypatch.setattr(Autotuner, "_bench", fake_bench)

    def set_arch(arch):
        monkeypatch.setattr(tuning, "EXERCISE_ARCH", arch)
        benched.clear()
        return benched

    return set_arch


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_respects_shared_memory_and_shape(arch, monkeypatch):
    monkeypatch.setattr(tuning, "EXERCISE_ARCH", arch)
    y = torch.empty(0)
    limit = tuning._smem_limit(y)
    native = arch != "sm_90"  # the NVFP4 lists of sm_100 / sm_120 are for dot_scaled
    cases = [
        (tuning.GEMM_INT4_CONFIGS, tuning.prune_gemm_int4, tuning._gemm_int4_smem),
        (tuning.GEMM_NVFP4_CONFIGS, tuning.prune_gemm_nvfp4,
         lambda c: tuning._gemm_nvfp4_smem(c, native)),
        (tuning.GEMM_W4A16_CONFIGS, tuning.prune_gemm_w4a16, tuning._gemm_w4a16_smem),
    ]  # fmt: skip
    for table, prune, smem in cases:
        configs = tuning.configs_for(table, arch)
        fitting = [c for c in configs if smem(c) <= limit]
        # most of each list fits: pruning must not be what leaves a single candidate
        assert len(fitting) >= max(1, len(configs) - 1), f"{arch}: {len(fitting)} fit"
        for m, n, k in [(16384, 3072, 12288), (3, 192, 64), (97, 64, 3072)]:
            named = {"y_ptr": y, "M": m, "N": n, "K": k, "NATIVE": native}
            kept = prune(configs, named)
            assert kept, f"{prune.__name__} kept nothing for {m}x{n}x{k}"
            bound = max(16, 2 ** math.ceil(math.log2(m)))
            small = [c for c in fitting if c.kwargs["BLOCK_M"] <= bound]
            for c in kept:
                assert smem(c) <= limit, f"{arch} {c} needs {smem(c)} > {limit} bytes"
                if small:  # a config fits the shape: only such configs are kept
                    assert c.kwargs["BLOCK_M"] <= bound, f"{arch} M={m}: kept {c}"
    for s_q in (1, 77, 4608):
        kept = tuning.prune_attention(
            tuning.configs_for(tuning.ATTENTION_CONFIGS, arch), {"o_ptr": y, "S_q": s_q},
            HEAD_DIM=128,
        )  # fmt: skip
        assert kept and all(tuning._attention_smem(c, 128, 2) <= limit for c in kept)


@pytest.mark.parametrize("arch", ["sm_90", "sm_120"])
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_autotuned_gemm_and_quantize_path(fmt, arch, exercise):
    benched = exercise(arch)
    layout = kernels.preferred_layout(fmt)
    args = make_w4a4(70, 96, 320 if fmt == "nvfp4" else 256, 8, fmt, layout, seed=3)
    y = kernels.gemm_w4a4(*args, fmt, torch.bfloat16, layout)
    assert benched, "the autotuner did not run"
    truth = w4a4_truth(*args, fmt, layout)
    baseline = ops.gemm_w4a4_reference(*args, fmt, torch.bfloat16, layout)
    assert_within_reference_error(y, baseline, truth, f"autotuned {fmt} GEMM on {arch} path")
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    q, s, _ = kernels.quantize_act(x, None, None, fmt, layout)
    q_ref, s_ref, _ = ops.quantize_act_reference(x, None, None, fmt, layout)
    assert torch.equal(q, q_ref) and torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8))


@pytest.mark.parametrize("arch", ["sm_90", "sm_120"])
def test_autotuned_unsigned_int4_path(arch, exercise):
    """act_unsigned is not an autotune key: a configuration tuned for the signed kernel is reused
    for the unsigned one at the same (M, N, K, r), which must still compile its own variant."""
    benched = exercise(arch)
    shape = (45, 96, 192, 8)  # a key no other test tunes
    signed = make_w4a4(*shape, "int4", "split_halves", seed=6)
    kernels.gemm_w4a4(*signed, "int4", torch.bfloat16, "split_halves")
    assert benched, "the autotuner did not run"
    benched.clear()
    args = make_w4a4(*shape, "int4", "split_halves", seed=6, act_unsigned=True)
    y = kernels.gemm_w4a4(*args, "int4", torch.bfloat16, "split_halves", True)
    assert not benched, "same key: the tuned configuration is reused"
    truth = w4a4_truth(*args, "int4", "split_halves", True)
    baseline = ops.gemm_w4a4_reference(*args, "int4", torch.bfloat16, "split_halves", True)
    assert_within_reference_error(y, baseline, truth, f"autotuned unsigned GEMM on {arch} path")
    x = gelu_inputs(45, 192, 0, torch.bfloat16, seed=7)[0]
    for layout in ("split_halves", "canonical"):
        q, s, _ = kernels.quantize_act(x, None, None, "int4", layout, True)
        q_ref, s_ref, _ = ops.quantize_act_reference(x, None, None, "int4", layout, True)
        assert torch.equal(q, q_ref) and torch.equal(s.view(torch.int16), s_ref.view(torch.int16))


def test_autotuned_attention_and_w4a16_path(exercise):
    exercise("sm_90")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 77, 64, generator=g).bfloat16() for _ in range(3))
    o = kernels.attention(q, k, v, None)
    scale = 1 / math.sqrt(64)
    assert_within_reference_error(o, same_precision_reference(q, k, v, scale),
                                  truth64(q, k, v, scale), "autotuned attention")  # fmt: skip
    args = make_w4a4(5, 64, 128, 0, "int4", "split_halves", bias=False)
    x = torch.randn(5, 128, generator=g).bfloat16()
    y = kernels.gemm_w4a16(x, args[2], args[3], None, None, "int4", "split_halves")
    torch.testing.assert_close(
        y, ops.gemm_w4a16_reference(x, args[2], args[3], None, None, "int4", "split_halves")
    )


def test_autotune_off_takes_the_first_pruned_config(exercise, monkeypatch):
    benched = exercise("sm_90")
    monkeypatch.setenv("DCGEN_QUANT_AUTOTUNE", "0")
    args = make_w4a4(40, 64, 128, 0, "int4", "split_halves", bias=False)
    y = kernels.gemm_w4a4(*args, "int4", torch.float32, "split_halves")
    assert not benched
    truth = w4a4_truth(*args, "int4", "split_halves")
    baseline = ops.gemm_w4a4_reference(*args, "int4", torch.float32, "split_halves")
    assert_within_reference_error(y, baseline, truth, "first pruned config")
