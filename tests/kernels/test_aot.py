"""Ahead-of-time compiles without a GPU: each kernel lowers to the intended tensor-core
instructions for its target architecture (asserted on the PTX)."""

from __future__ import annotations

import re

import pytest

from dcgen_quant.kernels import aot

pytestmark = pytest.mark.slow

CASES = [
    # (kernel case, sm, regex that must match one instruction, what it shows)
    ("gemm_int4", 90, r"^wgmma\.mma_async\.\S*\.s32\.s8\.s8$", "INT4 GEMM: int8 wgmma (IGMMA)"),
    ("gemm_nvfp4_native", 120, r"^mma\.sync\.\S*kind::mxf4nvf4\.block_scale\.\S*ue4m3$",
     "NVFP4 GEMM: block-scaled FP4 mma.sync on sm_120"),
    ("gemm_nvfp4_native", 100, r"^tcgen05\.mma\.\S*kind::mxf4nvf4\.block_scale",
     "NVFP4 GEMM: tcgen05 block-scaled FP4 on sm_100"),
    ("gemm_nvfp4_upcast", 90, r"^wgmma\.mma_async\.\S*\.f32\.bf16\.bf16$",
     "NVFP4 GEMM on Hopper: exact bf16 upcast on wgmma"),
    ("attention", 90, r"^wgmma\.mma_async\.\S*\.f32\.bf16\.bf16$", "attention: bf16 wgmma"),
    ("attention_8bit", 90, r"^wgmma\.mma_async\.\S*\.s32\.s8\.s8$", "8-bit attention: int8 QK"),
    ("attention_8bit", 90, r"^wgmma\.mma_async\.\S*\.f32\.e4m3\.e4m3$", "8-bit attention: fp8 PV"),
]  # fmt: skip


@pytest.mark.parametrize("case,arch,pattern,what", CASES)
def test_kernel_emits_intended_instruction(case, arch, pattern, what):
    found = aot.tensor_instructions(aot.compile_case(case, arch))
    assert any(re.search(pattern, ins) for ins in found), f"{what}: sm_{arch} PTX has {found}"


def test_quantize_act_uses_ieee_division_and_rint():
    # bit-exactness with the reference needs correctly rounded division and RNE rounding
    ptx = aot.compile_case("quantize_act_int4", 90)
    assert "div.rn.f32" in ptx
    assert "cvt.rni.f32.f32" in ptx


def test_compile_kernel_names_missing_constexprs():
    case = aot.CASES["gemm_int4"]
    kernel = getattr(aot.jit_module(case.module), case.kernel)
    constexprs = dict(case.constexprs)
    del constexprs["BLOCK_M"]
    with pytest.raises(ValueError, match="BLOCK_M"):
        aot.compile_kernel(kernel, case.signature, constexprs, 90)
