"""The machine code of every GEMM kernel uses the intended tensor-core instruction.

cuobjdump -sass on the installed libdcgen_quant.so (all architectures in one fatbinary). A GEMM
that silently computed in FP16/FP32 instead (a dequantize-to-half fallback, or 4-bit MMAs that
the compiler emulates with 8-bit ones) fails here. Every INT4 GEMM family has a signed and an
unsigned-activation kernel (act_unsigned: A unsigned, B signed); each must use its own integer
MMA type and not the other's.
"""

import re
import subprocess
from collections import defaultdict

import pytest

from ._build import build_info, cuobjdump, library_path

pytestmark = [pytest.mark.nvcc, pytest.mark.slow]

# kernel family (from the instantiation file, visible in the mangled name) -> architectures,
# the instruction each variant (False: signed activations, True: unsigned) must use, with the
# minimum count of static instances (one per MMA of the unrolled main loop), and instructions it
# must not contain.
INT4_S4 = (r"IMMA\.16864\.S4\.S4", 32)  # 2 k64 steps x 4 x 4 warp tiles, native 4-bit
UINT4_S4 = (r"IMMA\.16864\.U4\.S4", 32)
INT8_MMA = (r"IMMA\.16832\.S8\.S8", 64)  # 2 k64 steps x 4 x 4 x 2 (two k32 per k64)
UINT8_MMA = (r"IMMA\.16832\.U8\.S8", 64)
INT8_WGMMA = (r"IGMMA\.64x128x32\.S8\.S8", 4)  # two groups x two k32 steps
UINT8_WGMMA = (r"IGMMA\.64x128x32\.U8\.S8", 4)
FP4_OMMA = (r"OMMA\.SF\.16864\.F32\.E2M1\.E2M1\.UE4M3\.4X", 32)
# Half-precision MMAs other than the bf16 ones of the low-rank epilogue would mean the
# main loop dequantized to 16-bit floats; a float-MMA wgmma would mean the same on Hopper.
NO_FALLBACK = (r"HMMA\.\d+\.F(16|32)(?!\.BF16)\b", r"HGMMA", r"QGMMA")
# a signed kernel must not read unsigned operands, an unsigned one must not read signed A
NOT_SIGNED_A = {False: r"IG?MMA\.[\dx]+\.U", True: r"IG?MMA\.[\dx]+\.S[48]\.S"}

EXPECTED = {
    "gemm_w4a4_int4_s4": {"archs": {"80", "86", "89"}, "need": {False: INT4_S4, True: UINT4_S4},
                          "forbid": (*NO_FALLBACK, r"IMMA\.16832")},
    "gemm_w4a4_int4_s8": {"archs": {"90a", "120a"}, "need": {False: INT8_MMA, True: UINT8_MMA},
                          "forbid": (*NO_FALLBACK, r"IMMA\.16864")},
    "gemm_w4a4_int4_wgmma": {"archs": {"90a"}, "need": {False: INT8_WGMMA, True: UINT8_WGMMA},
                             "forbid": (*NO_FALLBACK, r"IMMA")},
    "gemm_w4a4_nvfp4": {"archs": {"120a"}, "need": {False: FP4_OMMA},
                        "forbid": (*NO_FALLBACK, r"IMMA", r"QMMA")},
}  # fmt: skip
# The last template argument of every kernel is its bool kUnsigned (Lb0E / Lb1E when mangled).
UNSIGNED_FLAG = re.compile(r"_kernelI\w*?Lb([01])EEEv")


def _sass_by_kernel() -> dict:
    """{(arch, family): [(unsigned, SASS text) of each kernel]} for the kernels of the installed
    library; unsigned is None for kernels without the flag (gemm_w4a16)."""
    out = subprocess.run(
        [cuobjdump(), "-sass", str(library_path())], capture_output=True, text=True, check=True
    ).stdout
    kernels = defaultdict(list)
    arch, family, unsigned, body = None, None, None, []

    def flush():
        if family is not None:
            kernels[(arch, family)].append((unsigned, "\n".join(body)))

    for line in out.splitlines():
        if m := re.match(r"\s*arch = sm_(\w+)", line):
            flush()
            arch, family, body = m.group(1), None, []
        elif m := re.search(r"Function : \S*?_(gemm_w4a4_\w+?|quantize_act|gemm_w4a16)_sm", line):
            flush()
            flag = UNSIGNED_FLAG.search(line)
            family, unsigned, body = m.group(1), flag and flag.group(1) == "1", []
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
        variants = sorted(u for u, _ in sass.get((arch, "quantize_act"), []))
        if variants and variants != [False, False, True]:  # int4, nvfp4; unsigned int4
            problems.append(f"sm_{arch}: quantize_act kernels with unsigned flags {variants}")
    for family, spec in EXPECTED.items():
        for arch in sorted(spec["archs"] & built):
            kernels = sass.get((arch, family), [])
            if sorted(u for u, _ in kernels) != sorted(spec["need"]):
                problems.append(
                    f"{family} sm_{arch}: kernels with unsigned flags "
                    f"{sorted(u for u, _ in kernels)}, expected {sorted(spec['need'])}"
                )
            for unsigned, body in kernels:
                what = f"{family}{' (unsigned)' if unsigned else ''} sm_{arch}"
                pattern, minimum = spec["need"].get(unsigned, ("(unexpected kernel)", 1))
                count = len(re.findall(pattern, body))
                if count < minimum:
                    problems.append(f"{what}: {count} x {pattern}, need {minimum}")
                for bad in (*spec["forbid"], NOT_SIGNED_A[bool(unsigned)]):
                    found = sorted({m.group(0) for m in re.finditer(bad + r"[\w.]*", body)})
                    if found:
                        problems.append(f"{what} contains {found}")
    assert not problems, "\n".join(problems)


def test_unsigned_kernels_use_unsigned_integer_mmas():
    """The instruction table of docs/KERNELS.md for act_unsigned, stated on its own: the
    unsigned-activation GEMMs reach the integer tensor cores with an unsigned A operand."""
    sass = _sass_by_kernel()
    found = {}
    for (arch, family), kernels in sass.items():
        for unsigned, body in kernels:
            if unsigned and family.startswith("gemm_w4a4"):
                found[(arch, family)] = sorted(set(re.findall(r"IG?MMA\.[\w.]+", body)))
    expected = {
        ("80", "gemm_w4a4_int4_s4"): ["IMMA.16864.U4.S4"],
        ("86", "gemm_w4a4_int4_s4"): ["IMMA.16864.U4.S4"],
        ("89", "gemm_w4a4_int4_s4"): ["IMMA.16864.U4.S4"],
        ("90a", "gemm_w4a4_int4_s8"): ["IMMA.16832.U8.S8"],
        ("90a", "gemm_w4a4_int4_wgmma"): ["IGMMA.64x128x32.U8.S8"],
        ("120a", "gemm_w4a4_int4_s8"): ["IMMA.16832.U8.S8"],
    }
    built = set(build_info()["archs"])
    assert found == {k: v for k, v in expected.items() if k[0] in built}
