"""The CUDA part of ``pip install``: build libdcgen_quant.so and the dcgen_quant._C module.

Loaded by setup.py (by path: it is not part of the installed package). No network, no git.

Knobs (environment variables, read at install time):

``DCGEN_QUANT_SKIP_CUDA=1``
    Do not build; the package installs pure-Python and the ``cuda`` backend reports why.
``DCGEN_QUANT_CUDA_ARCHS`` (default ``80;86;89;90a;120a``)
    Architectures to compile, a subset of the default (``;``, ``,`` or space separated).
``MAX_JOBS`` (default: CPU count)
    Parallel compiler processes (ninja -j).
``CUDA_HOME``
    Where to find ``bin/nvcc`` (else ``nvcc`` on PATH).

Without nvcc the build is skipped the same way as with DCGEN_QUANT_SKIP_CUDA. Everything lands
next to the extension module: ``_C*.so``, ``libdcgen_quant.so`` (the C ABI, usable without
Python), ``include/dcgen_quant/dcgen_quant.h`` and ``_cuda_build.json`` (what was built, the
nvcc version, per-file compile times and the ``ptxas -v`` report of every kernel: registers,
spills, warnings; tests/csrc reads it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools.command.build_ext import build_ext

CSRC = Path(__file__).resolve().parent
SUPPORTED_ARCHS = ("80", "86", "89", "90a", "120a")
DEFAULT_ARCHS = "80;86;89;90a;120a"
BUILD_INFO = "_cuda_build.json"
LIBRARY = "libdcgen_quant.so"
HOST_SOURCES = ("src/api.cpp", "src/registry.cpp", "src/host_quantize.cpp")


class CudaBuildError(RuntimeError):
    """The CUDA build failed (the message holds the compiler output)."""


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def parse_archs(text: str | None) -> list[str]:
    """``"80;90a"`` -> ``["80", "90a"]``; unknown architectures raise ValueError."""
    archs = [a for a in re.split(r"[;,\s]+", (text or DEFAULT_ARCHS).strip()) if a]
    bad = [a for a in archs if a not in SUPPORTED_ARCHS]
    if bad or not archs:
        raise ValueError(
            f"DCGEN_QUANT_CUDA_ARCHS={text!r}: unsupported architecture(s) {bad}; expected a "
            f"non-empty subset of {';'.join(SUPPORTED_ARCHS)}"
        )
    return list(dict.fromkeys(archs))


def arch_of(source: Path) -> str:
    """'gemm_x_sm90a.cu' -> '90a' (generate_instantiations.py names files this way)."""
    return source.stem.rsplit("_sm", 1)[1]


def skip_reason() -> str | None:
    """Why the CUDA library is not built here, or None to build it."""
    if os.environ.get("DCGEN_QUANT_SKIP_CUDA", "0") not in ("", "0"):
        return "DCGEN_QUANT_SKIP_CUDA=1 was set when dcgen_quant was installed"
    if find_nvcc() is None:
        return (
            "nvcc was not found (on PATH or in $CUDA_HOME/bin) when dcgen_quant was installed; "
            "install the CUDA toolkit and reinstall dcgen_quant to build the CUDA library"
        )
    return None


def _ninja() -> str | None:
    try:
        import ninja  # the build requirement ships the executable

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def _q(path) -> str:
    """Quote a path for a ninja command line (ninja escapes '$' and ' ' with '$')."""
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> tuple[list[dict], list[str]]:
    """Kernel records (function, arch, registers, stack, spills) and warning lines."""
    kernels: list[dict] = []
    warnings: list[str] = []
    for line in log.splitlines():
        if m := PTXAS_FUNC.search(line):
            kernels.append({"function": m.group(1), "arch": m.group(2)})
        elif (m := PTXAS_FRAME.search(line)) and kernels:
            kernels[-1].update(
                stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
        elif (m := PTXAS_REGS.search(line)) and kernels:
            kernels[-1]["registers"] = int(m.group(1))
        elif "warning" in line.lower() or re.search(r"\(C\d{4}\)", line):
            warnings.append(line.strip())
    return kernels, warnings


def build_cuda_library(out_dir: Path, build_dir: Path, ext_filename: str) -> dict:
    """Compile and link everything into out_dir; returns the build info (also written)."""
    t0 = time.monotonic()
    out_dir, build_dir = out_dir.resolve(), build_dir.resolve()  # ninja runs in build_dir
    nvcc = find_nvcc()
    archs = parse_archs(os.environ.get("DCGEN_QUANT_CUDA_ARCHS"))
    sources = sorted(s for s in (CSRC / "instantiations").glob("*.cu") if arch_of(s) in archs)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    nvcc_version = (re.findall(r"V(\d+\.\d+\.\d+)", version) or ["unknown"])[0]
    import pybind11

    build_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = CSRC / "include"
    common = f"-std=c++17 -O3 -I{_q(include)} -Xcompiler -fPIC,-fvisibility=hidden"
    py_include = sysconfig.get_paths()["include"]
    lines = [
        f"nvcc = {_q(nvcc)}",
        f"common = {common}",
        "rule cu",
        "  command = $nvcc $common -Xptxas -v -gencode arch=compute_$arch,code=sm_$arch "
        "-c $in -o $out > $out.log 2>&1 || (cat $out.log; false)",
        "  description = nvcc sm_$arch $in",
        "rule cxx",
        "  command = $nvcc $common -c $in -o $out",
        "  description = c++ $in",
        "rule lib",
        "  command = $nvcc -shared -o $out $in -Xlinker --exclude-libs,ALL -Xlinker -Bsymbolic "
        f"-Xlinker -soname,{LIBRARY}",
        "  description = link $out",
        "rule pyext",
        f"  command = $nvcc -std=c++17 -O2 -cudart none -Xcompiler -fPIC,-fvisibility=hidden "
        f"-shared -I{_q(include)} -I{_q(pybind11.get_include())} -I{_q(py_include)} $in "
        f"-o $out -L{_q(out_dir)} -ldcgen_quant -Xlinker -rpath,'$$ORIGIN'",
        "  description = link $out",
    ]
    objects = []
    for src in sources:
        obj = build_dir / (src.stem + ".o")
        objects.append(obj)
        lines += [f"build {_q(obj)}: cu {_q(src)}", f"  arch = {arch_of(src)}"]
    for rel in HOST_SOURCES:
        obj = build_dir / (Path(rel).stem + ".o")
        objects.append(obj)
        lines.append(f"build {_q(obj)}: cxx {_q(CSRC / rel)}")
    lib = out_dir / LIBRARY
    ext = out_dir / ext_filename
    lines.append(f"build {_q(lib)}: lib {' '.join(_q(o) for o in objects)}")
    lines.append(f"build {_q(ext)}: pyext {_q(CSRC / 'python' / 'bindings.cpp')} | {_q(lib)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    ninja = _ninja()
    if ninja is None:
        raise CudaBuildError("ninja is required to build the CUDA library (pip install ninja)")
    proc = subprocess.run([ninja, "-C", str(build_dir), "-j", jobs], text=True, capture_output=True)
    if proc.returncode != 0:
        raise CudaBuildError(
            "building the dcgen_quant CUDA library failed (set DCGEN_QUANT_SKIP_CUDA=1 to "
            f"install without it):\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
        )

    durations = _ninja_durations(build_dir)
    units = []
    for src, obj in zip(sources, objects):
        kernels, warnings = parse_ptxas(Path(str(obj) + ".log").read_text())
        units.append(
            {
                "source": str(src.relative_to(CSRC)),
                "arch": arch_of(src),
                "seconds": durations.get(obj.name),
                "kernels": kernels,
                "warnings": warnings,
            }
        )
    header_dir = out_dir / "include" / "dcgen_quant"
    header_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(include / "dcgen_quant" / "dcgen_quant.h", header_dir / "dcgen_quant.h")
    info = {
        "built": True,
        "reason": None,
        "archs": archs,
        "nvcc": nvcc_version,
        "library": LIBRARY,
        "extension": ext_filename,
        "jobs": int(jobs),
        "seconds": round(time.monotonic() - t0, 1),
        "units": units,
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return info


def _ninja_durations(build_dir: Path) -> dict[str, float]:
    """Output file name -> seconds, from ninja's log."""
    out = {}
    log = build_dir / ".ninja_log"
    if log.exists():
        for line in log.read_text().splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 4:
                out[Path(parts[3]).name] = round((int(parts[1]) - int(parts[0])) / 1000, 1)
    return out


class BuildExt(build_ext):
    """build_ext that builds dcgen_quant._C (and the library) with nvcc + ninja, or records why
    not. Extra outputs are copied next to the module, also for editable installs."""

    EXTRAS = (LIBRARY, BUILD_INFO, "include")

    def build_extension(self, ext):
        if ext.name != "dcgen_quant._C":
            return super().build_extension(ext)
        out_path = Path(self.get_ext_fullpath(ext.name))
        out_dir = out_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        self._cuda_out_dir = out_dir
        reason = skip_reason()
        if reason is None:
            try:
                parse_archs(os.environ.get("DCGEN_QUANT_CUDA_ARCHS"))
            except ValueError as exc:
                raise CudaBuildError(str(exc)) from None
        if reason is not None:
            print(f"dcgen_quant: not building the CUDA library: {reason}", file=sys.stderr)
            info = {"built": False, "reason": reason}
            (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
            return
        build_dir = Path(self.build_temp) / "dcgen_quant_cuda"
        info = build_cuda_library(out_dir, build_dir, out_path.name)
        print(
            f"dcgen_quant: built the CUDA library for {';'.join(info['archs'])} in "
            f"{info['seconds']} s ({len(info['units'])} kernel files, -j{info['jobs']})",
            file=sys.stderr,
        )

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        out_dir = getattr(self, "_cuda_out_dir", None)
        if out_dir is None:
            return
        build_py = self.get_finalized_command("build_py")
        dest = Path(build_py.get_package_dir("dcgen_quant"))
        for name in self.EXTRAS:
            src = out_dir / name
            if src.is_dir():
                shutil.copytree(src, dest / name, dirs_exist_ok=True)
            elif src.exists():
                shutil.copy2(src, dest / name)

    def get_outputs(self):
        outputs = super().get_outputs()
        out_dir = getattr(self, "_cuda_out_dir", None)
        if out_dir is not None:
            outputs += [
                str(p)
                for p in out_dir.rglob("*")
                if p.is_file()
                and p.name in (LIBRARY, BUILD_INFO, "dcgen_quant.h")
                and str(p) not in outputs
            ]
        return outputs
