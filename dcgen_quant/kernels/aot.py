"""Ahead-of-time compilation of the kernels for a GPU that is not present (PTX inspection).

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` runs
the whole compiler down to PTX on a CPU-only machine. The tests use it to check that each kernel
lowers to the intended tensor-core instructions (REFERENCE.md section 5). The call works the same
on triton 3.6 and 3.9; what differs between versions is hidden here: the kernel objects may be
wrapped (heuristics, autotune) and, under TRITON_INTERPRET=1, are interpreter functions that the
compiler cannot take.

So :func:`jit_module` imports a private copy of a kernel file with the interpreter switched off
(a separate module object; the real ``dcgen_quant.kernels`` modules are left as they are), and
:data:`CASES` lists, per kernel, its argument types and the constexprs of one representative
launch. ``python -m dcgen_quant.kernels.aot --arch 90`` prints the tensor instructions found
(``--json`` for a machine-readable list, ``--ptx-dir`` to keep the PTX).

Compile in a process that has not run kernels in the interpreter: the interpreter patches
``triton.language`` while it runs, and the compiler can then fail on the patched builtins
(seen with triton 3.9). The tests therefore call this module's CLI in a subprocess.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field

_JIT_PACKAGE = "_dcgen_quant_kernels_jit"


@functools.cache
def jit_module(name: str):
    """kernels/<name>.py imported with TRITON_INTERPRET=0 (compilable JITFunctions)."""
    if _JIT_PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(_JIT_PACKAGE, None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
        sys.modules[_JIT_PACKAGE] = package
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return importlib.import_module(f"{_JIT_PACKAGE}.{name}")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _unwrap(kernel):
    """Heuristics / Autotuner -> the JITFunction underneath."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        if not hasattr(kernel, "fn"):
            raise TypeError(f"{kernel!r} is not a compilable Triton kernel (TRITON_INTERPRET?)")
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, signature: dict, constexprs: dict, arch: int, num_warps=4,
                   num_stages=3) -> dict:  # fmt: skip
    """Compile ``kernel`` for ``sm_<arch>`` without a GPU; returns the asm dict (ptx, ttgir...).

    Parameters
    ----------
    kernel : a @triton.jit function (possibly wrapped in heuristics / autotune)
    signature : {argument name: Triton type string} for the runtime arguments ("*bf16", "i32")
    constexprs : {argument name: value} for every constexpr argument
    arch : compute capability as an int (90, 100, 120)
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _unwrap(kernel)
    full = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, t in full.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"compile_kernel({fn.__name__}): no value for constexprs {missing}")
    src = ASTSource(fn, full, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm


def tensor_instructions(ptx: str) -> list[str]:
    """The distinct MMA instructions (mma / wgmma / tcgen05.mma) in a PTX text."""
    found = re.findall(r"\b((?:wgmma\.mma_async|tcgen05\.mma|mma\.sync)[\w.:]*)", ptx)
    return sorted(set(found))


@dataclass(frozen=True)
class Case:
    """One kernel at one representative specialization."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    note: str = field(default="", compare=False)


_GEMM_EPI = {"HAS_LORA": True, "HAS_BIAS": True, "BLOCK_R": 32, "INTERPRET": False}
_GEMM_TILE = {"GROUP_M": 8, "EVEN_M": True, "EVEN_N": True}
_GEMM_SIG = {
    "q_ptr": "*u8", "scales_ptr": "*bf16", "w_ptr": "*u8", "wscales_ptr": "*bf16",
    "la_ptr": "*fp32", "up_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16",
    "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_upn": "i32", "stride_upr": "i32",
}  # fmt: skip
_NVFP4_SIG = {**_GEMM_SIG, "scales_ptr": "*fp8e4nv", "wscales_ptr": "*fp8e4nv",
              "wtscale_ptr": "*fp32"}  # fmt: skip
_ATTN_SIG = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16",
    "S_q": "i32", "S_kv": "i32", "H": "i32", "qk_scale": "fp32",
    **{f"s{t}_{a}": "i32" for t in "qkvo" for a in "bhsd"},
}  # fmt: skip
_ATTN8_SIG = {
    "q_ptr": "*i8", "qs_ptr": "*fp32", "k_ptr": "*i8", "ks_ptr": "*fp32", "v_ptr": "*fp8e4nv",
    "vs_ptr": "*fp32", "vmean_ptr": "*fp32", "o_ptr": "*bf16", "S_q": "i32", "S_kv": "i32",
    "H": "i32", **{f"so_{a}": "i32" for a in "bhsd"},
}  # fmt: skip

CASES = {
    "gemm_int4": Case(
        "gemm_int4", "_gemm_w4a4_int4_kernel", _GEMM_SIG,
        {**_GEMM_EPI, **_GEMM_TILE, "ACT_UNSIGNED": False, "BLOCK_M": 128, "BLOCK_N": 128},
        num_warps=8, num_stages=4,
    ),
    "gemm_nvfp4_native": Case(
        "gemm_nvfp4", "_gemm_w4a4_nvfp4_kernel", _NVFP4_SIG,
        {**_GEMM_EPI, **_GEMM_TILE, "NATIVE": True, "BLOCK_M": 128,
         "BLOCK_N": 128, "BLOCK_K": 128, "EVEN_K": True},
        num_warps=4, num_stages=3,
    ),
    "gemm_nvfp4_upcast": Case(
        "gemm_nvfp4", "_gemm_w4a4_nvfp4_kernel", _NVFP4_SIG,
        {**_GEMM_EPI, **_GEMM_TILE, "NATIVE": False, "BLOCK_M": 128,
         "BLOCK_N": 128, "BLOCK_K": 64, "EVEN_K": True},
        num_warps=8, num_stages=3,
    ),
    "gemm_w4a16_int4": Case(
        "gemm_weight_only", "_gemm_w4a16_kernel",
        {"x_ptr": "*bf16", "w_ptr": "*u8", "wscales_ptr": "*bf16", "bias_ptr": "*bf16",
         "wtscale_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
         "stride_xm": "i32", "stride_xk": "i32"},
        {"IS_NVFP4": False, "SPLIT_HALVES": True, "HAS_BIAS": True,
         "INTERPRET": False, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
         "EVEN_M": True, "EVEN_N": True, "EVEN_K": True},
    ),
    "quantize_act_int4": Case(
        "act_quant", "_quantize_act_kernel",
        {"x_ptr": "*bf16", "smooth_ptr": "*bf16", "down_ptr": "*bf16", "q_ptr": "*u8",
         "scales_ptr": "*bf16", "lora_ptr": "*fp32", "M": "i32", "K": "i32", "R": "i32",
         "stride_xm": "i32", "stride_xk": "i32", "stride_dk": "i32", "stride_dr": "i32"},
        {"GROUP": 64, "IS_NVFP4": False, "UNSIGNED": False, "SPLIT_HALVES": True,
         "HAS_SMOOTH": True, "HAS_LORA": True, "SCALE_KIND": 0, "DOT16": True, "INTERPRET": False,
         "BLOCK_M": 32, "BLOCK_K": 128, "BLOCK_R": 32},
    ),
    "attention": Case(
        "flash_attn", "_attention_kernel", _ATTN_SIG,
        {"HEAD_DIM": 128, "BLOCK_D": 128, "INTERPRET": False, "BLOCK_M": 128, "BLOCK_N": 64,
         "EVEN_M": True, "EVEN_N": False},
        num_warps=8, num_stages=3,
    ),
    "attention_8bit": Case(
        "flash_attn_8bit", "_attention_8bit_kernel", _ATTN8_SIG,
        {"HEAD_DIM": 128, "P_SCALE": 256.0, "INTERPRET": False, "BLOCK_M": 128, "BLOCK_N": 64,
         "EVEN_M": True, "EVEN_N": False},
        num_warps=8, num_stages=3,
    ),
}  # fmt: skip


def _variant(base: str, sig: dict | None = None, warps=None, stages=None, **constexprs) -> Case:
    case = CASES[base]
    return Case(case.module, case.kernel, {**case.signature, **(sig or {})},
                {**case.constexprs, **constexprs}, warps or case.num_warps,
                stages or case.num_stages)  # fmt: skip


_Q8_SIG = {"x_ptr": "*bf16", "mean_ptr": "*fp32", "out_ptr": "*i8", "scale_ptr": "*fp32",
           "S": "i32", "H": "i32", "extra_scale": "fp32",
           **{f"sx_{a}": "i32" for a in "bhsd"}}  # fmt: skip

# Other specializations the launchers use (ragged tiles, other formats, dtypes and layouts):
# compiled by the tests for sm_90 and sm_120 to catch errors that only a GPU build would show.
VARIANTS = {
    "gemm_int4_ragged_no_lora": _variant("gemm_int4", HAS_LORA=False, HAS_BIAS=False,
                                         EVEN_M=False, EVEN_N=False,
                                         BLOCK_M=16, BLOCK_N=128, warps=4, stages=3),
    # unsigned activation codes 0..15 (act_unsigned): the same int8 MMA on sm_90 / sm_120
    "gemm_int4_unsigned": _variant("gemm_int4", ACT_UNSIGNED=True),
    "gemm_int4_unsigned_ragged": _variant("gemm_int4", ACT_UNSIGNED=True, HAS_BIAS=False,
                                          EVEN_M=False, BLOCK_M=64, warps=4, stages=4,
                                          sig={"y_ptr": "*fp32"}),
    "gemm_nvfp4_upcast_ragged": _variant("gemm_nvfp4_upcast", EVEN_M=False, EVEN_K=False,
                                         HAS_LORA=False, sig={"y_ptr": "*fp16"}),
    "gemm_w4a16_nvfp4_fp16": _variant("gemm_w4a16_int4", IS_NVFP4=True, SPLIT_HALVES=False,
                                      EVEN_K=False, BLOCK_M=16, BLOCK_K=128,
                                      sig={"x_ptr": "*fp16", "y_ptr": "*fp16",
                                           "wscales_ptr": "*fp8e4nv"}),
    "gemm_w4a16_int4_fp32": _variant("gemm_w4a16_int4", EVEN_M=False,
                                     sig={"x_ptr": "*fp32", "y_ptr": "*fp32",
                                          "wscales_ptr": "*fp32"}),
    "quantize_act_nvfp4_canonical": _variant("quantize_act_int4", GROUP=16, IS_NVFP4=True,
                                             SPLIT_HALVES=False, BLOCK_K=256,
                                             sig={"scales_ptr": "*fp8e4nv"}),
    "quantize_act_int4_unsigned_canonical": _variant("quantize_act_int4", UNSIGNED=True,
                                                     SPLIT_HALVES=False),
    "quantize_act_int4_fp16_fp32dot": _variant("quantize_act_int4", SCALE_KIND=1, DOT16=False,
                                               HAS_SMOOTH=False, BLOCK_M=16,
                                               sig={"x_ptr": "*fp16", "scales_ptr": "*fp16",
                                                    "down_ptr": "*fp32"}),
    "attention_fp16_d64_ragged": _variant("attention", HEAD_DIM=64, BLOCK_D=64, EVEN_M=False,
                                          BLOCK_M=64, BLOCK_N=64, warps=4,
                                          sig={t: "*fp16" for t in ("q_ptr", "k_ptr", "v_ptr",
                                                                    "o_ptr")}),
    "attention_d112_padded": _variant("attention", HEAD_DIM=112, BLOCK_D=128),
    "attention_fp32": _variant("attention", HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64, BLOCK_N=32,
                               warps=4, stages=2,
                               sig={t: "*fp32" for t in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}),
    "attention_8bit_d64": _variant("attention_8bit", HEAD_DIM=64, EVEN_M=False, BLOCK_M=64,
                                   warps=4),
    "attention_8bit_quantize_qk": Case("flash_attn_8bit", "_quantize_rows_int8_kernel", _Q8_SIG,
                                       {"HEAD_DIM": 128, "CENTER": True, "INTERPRET": False,
                                        "BLOCK_S": 128}),
    "attention_8bit_quantize_v": Case("flash_attn_8bit", "_quantize_v_fp8_kernel",
                                      {"v_ptr": "*bf16", "vmean_ptr": "*fp32",
                                       "vscale_ptr": "*fp32", "out_ptr": "*fp8e4nv", "S": "i32",
                                       "H": "i32", **{f"sv_{a}": "i32" for a in "bhsd"}},
                                      {"HEAD_DIM": 128, "INTERPRET": False, "BLOCK_S": 128}),
}  # fmt: skip


def _native_fp4_variants() -> dict:
    """One case per autotune configuration of the native NVFP4 loop (sm_100, sm_120 lists)."""
    from .tuning import GEMM_NVFP4_CONFIGS

    out = {}
    for arch in ("sm_100", "sm_120"):
        for c in GEMM_NVFP4_CONFIGS[arch]:
            k = c.kwargs
            name = f"nvfp4_native_{arch}_{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}w{c.num_warps}"
            out[name] = _variant("gemm_nvfp4_native", warps=c.num_warps, stages=c.num_stages,
                                 EVEN_M=False, EVEN_N=False, EVEN_K=False, **k)  # fmt: skip
    return out


VARIANTS.update(_native_fp4_variants())


def compile_case(name: str, arch: int) -> str:
    """PTX of :data:`CASES` or :data:`VARIANTS` ``[name]`` compiled for ``sm_<arch>``."""
    case = CASES.get(name) or VARIANTS[name]
    kernel = getattr(jit_module(case.module), case.kernel)
    asm = compile_kernel(kernel, case.signature, case.constexprs, arch, case.num_warps,
                         case.num_stages)  # fmt: skip
    return asm["ptx"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="e.g. 90, 100, 120 (repeat)")
    parser.add_argument("--case", action="append", choices=sorted({**CASES, **VARIANTS}))
    parser.add_argument(
        "--pair", action="append", default=[], help="CASE@ARCH, e.g. gemm_int4@90 (repeat)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list of results")
    parser.add_argument("--ptx-dir", help="also write <case>_sm<arch>.ptx files here")
    args = parser.parse_args(argv)
    pairs = [(p.split("@")[0], int(p.split("@")[1])) for p in args.pair]
    if not pairs or args.arch or args.case:
        pairs += [(n, a) for a in args.arch or [90] for n in args.case or sorted(CASES)]
    results = []
    for name, arch in pairs:
        result = {"case": name, "arch": arch, "instructions": [], "error": None}
        try:
            ptx = compile_case(name, arch)
            result["instructions"] = tensor_instructions(ptx)
            if args.ptx_dir:
                os.makedirs(args.ptx_dir, exist_ok=True)
                with open(os.path.join(args.ptx_dir, f"{name}_sm{arch}.ptx"), "w") as fh:
                    fh.write(ptx)
        except Exception as exc:  # report and go on: one case failing must not hide others
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        results.append(result)
        if not args.json:
            found = result["error"] or ", ".join(result["instructions"]) or "(no MMA instruction)"
            print(f"sm_{arch} {name}: {found}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
