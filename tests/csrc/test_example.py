"""examples/abi_example.c links against the installed libdcgen_quant.so and runs.

Without a GPU the example exercises the argument checks (NULL pointers, K not a multiple of the
group, architectures without kernels, no device) and the CPU quantizer; each must come back as
the documented status code with a message. The CMake build of the standalone library is checked
too, for one architecture (the pip build covers all of them).
"""

import re
import shutil
import subprocess

import pytest

from dcgen_quant import capabilities

from ._build import CSRC, build_info, compile_example

pytestmark = pytest.mark.nvcc


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    build_info()
    return compile_example(tmp_path_factory.mktemp("example"))


def _run(exe):
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_example_checks_arguments_without_crashing(example):
    rc, out = _run(example)
    assert rc == 0, out
    lines = {line.split("->")[0].strip(): line for line in out.splitlines() if "->" in line}
    expected = {
        "quantize_act(args = NULL)": "DCGQ_ERROR_INVALID_ARGUMENT: dcgq_quantize_act: argument "
        "'args' is NULL",
        "quantize_act(x = NULL)": "argument 'x' is NULL",
        "gemm_w4a4(k = 96, int4)": "k = 96; expected a positive multiple of the int4 group size 64",
        "gemm_w4a4(nvfp4, wtscale = NULL)": "argument 'wtscale' is NULL",
        "gemm_w4a4(nvfp4, act_unsigned = 1)": "act_unsigned = 1 with fmt = 1 (nvfp4); unsigned "
        "activations exist for DCGQ_FORMAT_INT4 (0) only",
        "quantize_act(act_unsigned = 2)": "act_unsigned = 2; expected 0 or 1",
        "quantize_act_host(x [37, 256], rank 16, unsigned)": "DCGQ_SUCCESS",
        "capability: gemm_w4a4 int4 on sm_75": "DCGQ_ERROR_UNSUPPORTED: gemm_w4a4 for format "
        "int4 is not implemented for compute capability 7.5",
        "capability: gemm_w4a4 nvfp4 on sm_90": "DCGQ_ERROR_UNSUPPORTED",
    }
    for what, text in expected.items():
        assert what in lines, out
        assert text in lines[what], lines[what]
    assert "UNEXPECTED" not in out
    assert out.rstrip().endswith("OK")
    if capabilities.cuda_unavailable():
        assert re.search(r"quantize_act on this machine \(no GPU\)\s+-> DCGQ_ERROR_NO_DEVICE", out)
        assert "no CUDA device: skipping the GPU run" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_standalone_library_and_example(tmp_path):
    arch = "80" if "80" in build_info()["archs"] else build_info()["archs"][0]
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    nvcc = capabilities.nvcc_path()
    for cmd in (
        ["cmake", "-S", str(CSRC), "-B", str(build), *generator, f"-DDCGQ_CUDA_ARCHS={arch}",
         f"-DCMAKE_CUDA_COMPILER={nvcc}"],
        ["cmake", "--build", str(build), "-j", "2"],
        ["cmake", "--install", str(build), "--prefix", str(tmp_path / "prefix")],
    ):  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert (tmp_path / "prefix" / "include" / "dcgen_quant" / "dcgen_quant.h").is_file()
    rc, out = _run(tmp_path / "prefix" / "bin" / "dcgq_abi_example")
    assert rc == 0, out
    assert f"architectures: {arch}\n" in out
