"""Where the install put the CUDA library, what it recorded, and the tools to inspect it.

tests/csrc reuses what ``pip install`` built (csrc/setup_cuda.py): dcgen_quant/libdcgen_quant.so,
dcgen_quant/_C*.so and dcgen_quant/_cuda_build.json (the ptxas report), instead of compiling a
second time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

import dcgen_quant

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(dcgen_quant.__file__).resolve().parent
CSRC = ROOT / "csrc"


def load_setup_cuda():
    spec = importlib.util.spec_from_file_location("setup_cuda", CSRC / "setup_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_info() -> dict:
    """The build record; skips when the install deliberately skipped the CUDA build, fails when
    nvcc is here but the library was not built (the tests using this are marked ``nvcc``)."""
    path = PACKAGE / "_cuda_build.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: reinstall with `pip install -e .` (nvcc is on PATH)")
    info = json.loads(path.read_text())
    if not info["built"]:
        if "DCGEN_QUANT_SKIP_CUDA" in (info.get("reason") or ""):
            pytest.skip(f"the CUDA library was not built: {info['reason']}")
        pytest.fail(f"nvcc is available but the CUDA library was not built: {info['reason']}")
    return info


def library_path() -> Path:
    return PACKAGE / build_info()["library"]


def cuobjdump() -> str:
    """cuobjdump from the triton wheel (triton/backends/nvidia/bin), or on PATH."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("cuobjdump")
    if found is None:
        pytest.fail("cuobjdump not found: install the [test] extra (triton ships it)")
    return found


def compile_example(out_dir: Path) -> Path:
    """Compile examples/abi_example.c against the installed library (nvcc drives the host C
    compiler and links the static CUDA runtime); returns the executable."""
    import subprocess

    from dcgen_quant import capabilities

    exe = out_dir / "abi_example"
    lib_dir = library_path().parent
    cmd = [
        capabilities.nvcc_path(), "-O2", str(ROOT / "examples" / "abi_example.c"),
        f"-I{CSRC / 'include'}", f"-L{lib_dir}", "-ldcgen_quant", f"-Xlinker=-rpath,{lib_dir}",
        "-lm", "-o", str(exe),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe
