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
    assert _C.abi_version() == 1


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_only_the_c_abi_is_exported():
    """The static CUDA runtime and all internals stay private (another libcudart in the same
    process, e.g. torch's, must not interpose)."""
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(library_path())], capture_output=True, text=True
    ).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert exported == ABI_SYMBOLS
