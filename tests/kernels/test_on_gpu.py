"""A quick GPU pass over the kernels (marked ``gpu``: bench/gpu_check.sh runs ``pytest -m gpu``).

The same checks as the interpreter tests, on CUDA tensors with the compiled kernels, at a few
shapes. Autotuning is off (``DCGEN_QUANT_AUTOTUNE=0``: one configuration compiled per kernel)
except in the last test, which runs the autotuned INT4 GEMM once. Without a GPU these are
skipped; the whole tests/kernels suite also runs on CUDA when TRITON_INTERPRET is unset.
"""

from __future__ import annotations

import pytest
import torch

from dcgen_quant import kernels, ops
from dcgen_quant.kernels import gemm_nvfp4

from . import test_attention, test_gemm, test_quantize_act, test_svdq_linear

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def one_config(monkeypatch, device):
    if device != "cuda":
        pytest.skip("TRITON_INTERPRET is set: the kernels run in the interpreter, not on the GPU")
    monkeypatch.setenv("DCGEN_QUANT_AUTOTUNE", "0")


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_quantize_act_on_gpu(fmt, device):
    layout = kernels.preferred_layout(fmt)
    test_quantize_act.test_quantize_act_bit_exact(97, 3072, 32, fmt, layout, torch.bfloat16, device)
    test_quantize_act.test_quantize_act_bit_exact(1, 64, 0, fmt, "canonical", torch.float16, device)
    test_quantize_act.test_quantize_act_edge_cases(fmt, layout, torch.bfloat16, device)
    if fmt == "int4":
        test_quantize_act.test_quantize_act_unsigned_bit_exact(
            97, 3072, 32, layout, torch.bfloat16, device
        )
        test_quantize_act.test_quantize_act_unsigned_edge_cases("canonical", torch.float16, device)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_gemms_on_gpu(fmt, device):
    for shape in [(97, 3072, 128, 32), (256, 192, 3072, 8), (3, 192, 128, 0)]:
        test_gemm.test_gemm_w4a4(*shape, fmt, "preferred", torch.bfloat16, device)
    test_gemm.test_gemm_w4a4(1, 64, 64, 32, fmt, "canonical", torch.float16, device)
    test_gemm.test_gemm_w4a16(97, 192, 3072, torch.bfloat16, "canonical", fmt, device)
    test_gemm.test_gemm_w4a16(3, 64, 128, torch.float16, "split_halves", fmt, device)
    if fmt == "int4":
        test_gemm.test_gemm_w4a4_unsigned_activations(
            256, 64, 128, 8, "split_halves", torch.bfloat16, device
        )
        test_gemm.test_gemm_w4a4_unsigned_extreme_codes(device)
    if fmt == "nvfp4" and gemm_nvfp4.native_fp4(torch.device(device)):
        test_gemm.test_gemm_nvfp4_native_dot_scaled_path(device)


def test_attention_on_gpu(device):
    test_attention.test_attention(333, 333, 128, torch.bfloat16, device)
    test_attention.test_attention(77, 333, 64, torch.float16, device)
    test_attention.test_attention_strided_scale_float32_and_other_head_dims(112, device)


def test_attention_8bit_on_gpu(device, record_property):
    test_attention.test_attention_8bit(333, 333, 128, device, record_property)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_svdq_linear_on_gpu(fmt, device, triton_backend, monkeypatch):
    test_svdq_linear.test_svdq_linear_forward_through_triton(fmt, device, None, monkeypatch)
    if fmt == "int4":
        ops.set_backend("triton")  # the test above ends on the reference backend
        test_svdq_linear.test_svdq_linear_unsigned_forward_through_triton(
            "split_halves", device, None, monkeypatch
        )


def test_autotuned_int4_gemm_on_gpu(device, monkeypatch):
    monkeypatch.setenv("DCGEN_QUANT_AUTOTUNE", "1")
    test_gemm.test_gemm_w4a4(256, 3072, 3072, 32, "int4", "preferred", torch.bfloat16, device)
