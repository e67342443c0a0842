"""The machine code of every GEMM kernel uses the intended tensor-core instruction.

cuobjdump -sass on the installed libdcgen_quant.so (all architectures in one fatbinary). A GEMM
that silently computed in FP16/FP32 instead (a dequantize-to-half fallback, or 4-bit MMAs that
the compiler emulates with 8-bit ones) fails here.
"""

import re
import subprocess
from collections import defaultdict

import pytest

from ._build import build_info, cuobjdump, library_path

pytestmark = [pytest.mark.nvcc, pytest.mark.slow]

# kernel family (from the instantiation file, visible in the mangled name) -> architectures,
# the instruction it must use (with the minimum count of static instances: one per MMA of the
# unrolled main loop), and instructions it must not contain.
INT4_S4 = (r"IMMA\.16864\.S4\.S4", 32)  # 2 k64 steps x 4 x 4 warp tiles, native 4-bit
INT8_MMA = (r"IMMA\.16832\.S8\.S8", 64)  # 2 k64 steps x 4 x 4 x 2 (two k32 per k64)
INT8_WGMMA = (r"IGMMA\.64x128x32\.S8\.S8", 4)  # two groups x two k32 steps
FP4_OMMA = (r"OMMA\.SF\.16864\.F32\.E2M1\.E2M1\.UE4M3\.4X", 32)
# Half-precision MMAs other than the bf16 ones of the low-rank epilogue would mean the
# main loop dequantized to 16-bit floats; a float-MMA wgmma would mean the same on Hopper.
NO_FALLBACK = (r"HMMA\.\d+\.F(16|32)(?!\.BF16)\b", r"HGMMA", r"QGMMA")

EXPECTED = {
    "gemm_w4a4_int4_s4": {"archs": {"80", "86", "89"}, "need": INT4_S4,
                          "forbid": (*NO_FALLBACK, r"IMMA\.16832")},
    "gemm_w4a4_int4_s8": {"archs": {"90a", "120a"}, "need": INT8_MMA,
                          "forbid": (*NO_FALLBACK, r"IMMA\.16864")},
    "gemm_w4a4_int4_wgmma": {"archs": {"90a"}, "need": INT8_WGMMA,
                             "forbid": (*NO_FALLBACK, r"IMMA")},
    "gemm_w4a4_nvfp4": {"archs": {"120a"}, "need": FP4_OMMA,
                        "forbid": (*NO_FALLBACK, r"IMMA", r"QMMA")},
}  # fmt: skip


def _sass_by_kernel() -> dict:
    """{(arch, family): [SASS text of each kernel]} for the kernels of the installed library."""
    out = subprocess.run(
        [cuobjdump(), "-sass", str(library_path())], capture_output=True, text=True, check=True
    ).stdout
    kernels = defaultdict(list)
    arch, family, body = None, None, []

    def flush():
        if family is not None:
            kernels[(arch, family)].append("\n".join(body))

    for line in out.splitlines():
        if m := re.match(r"\s*arch = sm_(\w+)", line):
            flush()
            arch, family, body = m.group(1), None, []
        elif m := re.search(r"Function : \S*?_(gemm_w4a4_\w+?|quantize_act|gemm_w4a16)_sm", line):
            flush()
            family, body = m.group(1), []
        elif family is not None:
            body.append(line)
    flush()
    return kernels


def test_every_gemm_uses_the_intended_tensor_core_instruction():
    """One cuobjdump of the whole library (it takes seconds), then every check; the failure
    message lists every kernel that is off."""
    sass = _sass_by_kernel()
    built = set(build_info()["archs"])
    problems = []
    for arch in sorted(built):
        if (arch, "quantize_act") not in sass or (arch, "gemm_w4a16") not in sass:
            problems.append(f"sm_{arch}: quantize_act or gemm_w4a16 missing")
        families = {f for (a, f) in sass if a == arch and f.startswith("gemm_w4a4")}
        wanted = {f for f, e in EXPECTED.items() if arch in e["archs"]}
        if families != wanted:
            problems.append(
                f"sm_{arch}: GEMM kernels {sorted(families)}, expected {sorted(wanted)}"
            )
    for family, spec in EXPECTED.items():
        pattern, minimum = spec["need"]
        for arch in sorted(spec["archs"] & built):
            for body in sass.get((arch, family), []):
                count = len(re.findall(pattern, body))
                if count < minimum:
                    problems.append(f"{family} sm_{arch}: {count} x {pattern}, need {minimum}")
                for bad in spec["forbid"]:
                    found = sorted({m.group(0) for m in re.finditer(bad + r"[\w.]*", body)})
                    if found:
                        problems.append(f"{family} sm_{arch} contains {found}")
    assert not problems, "\n".join(problems)
