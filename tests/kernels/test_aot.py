"""Ahead-of-time compiles without a GPU: each kernel lowers to the intended tensor-core
instructions for its target architecture (asserted on the PTX), and every other specialization
the launchers use compiles for sm_90 and sm_120.

The compiles run in one subprocess (``python -m dcgen_quant.kernels.aot``) with the interpreter
off: a process that has run interpreted kernels cannot compile reliably (kernels/aot.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from dcgen_quant.kernels import aot

pytestmark = pytest.mark.slow

CASES = [
    # (kernel case, sm, regex that must match one instruction, what it shows)
    ("gemm_int4", 90, r"^wgmma\.mma_async\.\S*\.s32\.s8\.s8$", "INT4 GEMM: int8 wgmma (IGMMA)"),
    # unsigned activation codes 0..15 are valid s8 values: triton 3.9 emits the same
    # wgmma ...m64n128k32.s32.s8.s8 (not .u8.s8); either would be correct
    ("gemm_int4_unsigned", 90, r"^wgmma\.mma_async\.\S*\.s32\.[su]8\.s8$",
     "INT4 GEMM, unsigned activations: int8 wgmma"),
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


def test_kernels_emit_intended_instructions(tmp_path):
    quantizers = ("quantize_act_int4", "quantize_act_int4_unsigned_canonical")
    pairs = {f"{case}@{arch}" for case, arch, _, _ in CASES} | {f"{q}@90" for q in quantizers}
    # the other specializations the launchers use must compile for both GPU families
    general = [v for v in aot.VARIANTS if not v.startswith("nvfp4_native_")]
    pairs |= {f"{v}@{a}" for v in general for a in (90, 120)}
    # every native-FP4 autotune configuration must lower to block-scaled FP4 MMA on its target
    native = {v: int(v.split("_")[3]) for v in aot.VARIANTS if v.startswith("nvfp4_native_")}
    pairs = sorted(pairs | {f"{v}@{a}" for v, a in native.items()})
    cmd = [sys.executable, "-m", "dcgen_quant.kernels.aot", "--json", "--ptx-dir", str(tmp_path)]
    cmd += [arg for pair in pairs for arg in ("--pair", pair)]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {f"{r['case']}@{r['arch']}": r for r in json.loads(proc.stdout.splitlines()[-1])}
    failures = [f"{k}: {r['error']}" for k, r in results.items() if r["error"]]
    for case, arch, pattern, what in CASES:
        r = results[f"{case}@{arch}"]
        if not any(re.search(pattern, i) for i in r["instructions"]):
            failures.append(f"{what}: sm_{arch} gave {r['error'] or r['instructions']}")
    for v, a in native.items():
        found = results[f"{v}@{a}"]["instructions"]
        if not any("mxf4nvf4" in i for i in found):
            failures.append(f"NVFP4 autotune config {v}: sm_{a} gave {found}")
    # bit-exact quantization needs IEEE division and round-to-nearest-even on the GPU too
    for q in quantizers:
        ptx = (tmp_path / f"{q}_sm90.ptx").read_text()
        for needed in ("div.rn.f32", "cvt.rni.f32.f32"):
            if needed not in ptx:
                failures.append(f"{q} sm_90 PTX lacks {needed}")
    # the unsigned shift 0.171875 (0x3E300000) is a plain float32 add, not fused into an FMA
    ptx = (tmp_path / "quantize_act_int4_unsigned_canonical_sm90.ptx").read_text()
    if not re.search(r"\badd(\.rn)?\.f32\s+%r\d+, %r\d+, 0f3E300000;", ptx):
        failures.append("unsigned quantize_act sm_90 PTX has no float32 add of the shift")
    if re.search(r"\bfma\.\S+\s[^;]*0f3E300000", ptx):
        failures.append("unsigned quantize_act sm_90 PTX fuses the shift into an FMA")
    assert not failures, "\n".join(failures)


def test_compile_kernel_names_missing_constexprs():
    case = aot.CASES["gemm_int4"]
    kernel = getattr(aot.jit_module(case.module), case.kernel)
    constexprs = dict(case.constexprs)
    del constexprs["BLOCK_M"]
    with pytest.raises(ValueError, match="BLOCK_M"):
        aot.compile_kernel(kernel, case.signature, constexprs, 90)
