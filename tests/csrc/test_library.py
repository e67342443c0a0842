"""What `pip install` built (tests/csrc/_build.py): every default architecture compiled, no
register spills or ptxas performance warnings, only the C ABI exported."""

import os
import shutil
import subprocess

import pytest

import dcgen_quant

from ._build import build_info, library_path, load_setup_cuda

pytestmark = pytest.mark.nvcc

ABI_SYMBOLS = {
    "dcgq_quantize_act",
    "dcgq_quantize_act_host",
    "dcgq_gemm_w4a4",
    "dcgq_gemm_w4a16",
    "dcgq_check_compute_capability",
    "dcgq_check_device",
    "dcgq_selected_kernel",
    "dcgq_error_string",
    "dcgq_last_error_message",
    "dcgq_built_architectures",
    "dcgq_version",
    "dcgq_abi_version",
}


def test_every_requested_architecture_was_compiled():
    info = build_info()
    sc = load_setup_cuda()
    archs = sc.parse_archs(os.environ.get("DCGEN_QUANT_CUDA_ARCHS"))
    assert info["archs"] == archs
    expected = sorted(
        f"instantiations/{p.name}"
        for p in (sc.CSRC / "instantiations").glob("*.cu")
        if sc.arch_of(p) in archs
    )
    assert sorted(u["source"] for u in info["units"]) == expected
    for unit in info["units"]:
        assert unit["kernels"], f"{unit['source']}: no kernel in the ptxas report"
        assert {k["arch"] for k in unit["kernels"]} == {f"sm_{unit['arch']}"}


def test_no_register_spills_or_ptxas_warnings():
    """`ptxas -v` of the release build: no spills, no local-memory stack, no performance
    warnings (e.g. C7514/C7517: wgmma serialized or waits injected by the compiler)."""
    problems = []
    for unit in build_info()["units"]:
        for k in unit["kernels"]:
            if k.get("spill_stores") or k.get("spill_loads") or k.get("stack"):
                problems.append(f"{unit['source']} {k['function']}: {k}")
            if not 0 < k.get("registers", 0) <= 255:
                problems.append(f"{unit['source']} {k['function']}: registers {k}")
        problems += [f"{unit['source']}: {w}" for w in unit["warnings"]]
    assert not problems, "\n".join(problems)


def test_library_reports_the_build():
    from dcgen_quant import _C

    info = build_info()
    assert _C.built_architectures() == ";".join(info["archs"])
    assert _C.version() == dcgen_quant.__version__
    assert _C.abi_version() == 2  # 2: act_unsigned in the quantize_act and gemm_w4a4 args


# kernels per instantiation file: the INT4 GEMMs and quantize_act carry an unsigned-activation
# instantiation next to the signed one(s), so the spill check above covers them too
KERNELS_PER_UNIT = {"gemm_w4a4_int4_s4": 2, "gemm_w4a4_int4_s8": 2, "gemm_w4a4_int4_wgmma": 2,
                    "gemm_w4a4_nvfp4": 1, "quantize_act": 3}  # fmt: skip


def test_unsigned_activation_kernels_were_compiled():
    for unit in build_info()["units"]:
        family = unit["source"].removeprefix("instantiations/").rsplit("_sm", 1)[0]
        if family in KERNELS_PER_UNIT:
            assert len(unit["kernels"]) == KERNELS_PER_UNIT[family], unit
            flags = sorted(k["function"].endswith("Lb1EEEv19dcgq_gemm_w4a4_argsb")
                           or "Lb1EEEv22dcgq_quantize_act_args" in k["function"]
                           for k in unit["kernels"])  # fmt: skip
            assert flags == [False] * (len(flags) - 1) + [len(flags) > 1], unit


def test_act_unsigned_is_validated_before_any_device_call():
    """0 / 1 only, and INT4 only: INVALID_ARGUMENT with a message naming the field (no GPU
    needed: the checks run first)."""
    from dcgen_quant import _C

    common = dict(m=4, n=8, k=64, scale_dtype=_C.DTYPE_BFLOAT16, io_dtype=_C.DTYPE_BFLOAT16,
                  out_dtype=_C.DTYPE_BFLOAT16)  # fmt: skip
    assert _C.gemm_w4a4(0, fmt=_C.FORMAT_INT4, act_unsigned=3, **common) == (
        _C.ERROR_INVALID_ARGUMENT
    )
    assert "dcgq_gemm_w4a4: act_unsigned = 3; expected 0 or 1" in _C.last_error_message()
    common["scale_dtype"] = _C.DTYPE_FLOAT8_E4M3
    assert _C.gemm_w4a4(0, fmt=_C.FORMAT_NVFP4, act_unsigned=1, **common) == (
        _C.ERROR_INVALID_ARGUMENT
    )
    assert "act_unsigned = 1 with fmt = 1 (nvfp4)" in _C.last_error_message()
    status = _C.quantize_act(0, fmt=_C.FORMAT_NVFP4, act_unsigned=1, m=4, k=64,
                             x_dtype=_C.DTYPE_BFLOAT16)  # fmt: skip
    assert status == _C.ERROR_INVALID_ARGUMENT
    assert "dcgq_quantize_act: act_unsigned = 1 with fmt = 1" in _C.last_error_message()


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_only_the_c_abi_is_exported():
    """The static CUDA runtime and all internals stay private (another libcudart in the same
    process, e.g. torch's, must not interpose)."""
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(library_path())], capture_output=True, text=True
    ).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert exported == ABI_SYMBOLS
