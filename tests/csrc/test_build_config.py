"""Build configuration of the CUDA library that needs no compiler: generated instantiation files,
the DCGEN_QUANT_CUDA_ARCHS / DCGEN_QUANT_SKIP_CUDA knobs, the ptxas report parser."""

import importlib.util
import shutil
import subprocess

import pytest

from ._build import CSRC, load_setup_cuda


def _generator():
    spec = importlib.util.spec_from_file_location("gen", CSRC / "generate_instantiations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_instantiation_files_match_the_generator():
    gen = _generator()
    expected = gen.expected_files()
    on_disk = {p.name: p.read_text() for p in (CSRC / "instantiations").glob("*.cu")}
    assert sorted(on_disk) == sorted(expected), "run python csrc/generate_instantiations.py"
    for name, text in expected.items():
        assert on_disk[name] == text, f"{name} is stale: run python csrc/generate_instantiations.py"


def test_every_architecture_has_every_op():
    gen = _generator()
    families = {name.rsplit("_sm", 1)[0]: [] for name in gen.expected_files()}
    for name in gen.expected_files():
        families[name.rsplit("_sm", 1)[0]].append(gen.arch_of(name))
    for arch in gen.ARCHS:
        assert arch in families["quantize_act"] and arch in families["gemm_w4a16"]
        int4 = [f for f in families if f.startswith("gemm_w4a4_int4") and arch in families[f]]
        assert int4, f"no INT4 W4A4 GEMM for sm_{arch}"
    assert families["gemm_w4a4_int4_s4"] == ["80", "86", "89"]
    assert families["gemm_w4a4_int4_wgmma"] == ["90a"]
    assert families["gemm_w4a4_nvfp4"] == ["120a"]


def test_arch_list_parsing():
    sc = load_setup_cuda()
    assert sc.parse_archs(None) == ["80", "86", "89", "90a", "120a"]
    assert sc.parse_archs("90a, 120a") == ["90a", "120a"]
    assert sc.parse_archs("80;80 86") == ["80", "86"]
    with pytest.raises(ValueError, match=r"unsupported architecture\(s\) \['75'\]"):
        sc.parse_archs("75;80")
    with pytest.raises(ValueError, match="90"):
        sc.parse_archs("90")  # wgmma needs the arch-specific target 90a
    assert sc.arch_of(CSRC / "instantiations" / "gemm_w4a4_nvfp4_sm120a.cu") == "120a"


def test_skip_reasons(monkeypatch):
    sc = load_setup_cuda()
    monkeypatch.setenv("DCGEN_QUANT_SKIP_CUDA", "1")
    assert "DCGEN_QUANT_SKIP_CUDA=1" in sc.skip_reason()
    monkeypatch.setenv("DCGEN_QUANT_SKIP_CUDA", "0")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert "nvcc was not found" in sc.skip_reason()


PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size
ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized
ptxas info    : Compiling entry function '_Z1gv' for 'sm_80'
ptxas info    : Function properties for _Z1gv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 198 registers, used 1 barriers, 545 bytes cmem[0]
"""


def test_ptxas_report_parser():
    kernels, warnings = load_setup_cuda().parse_ptxas(PTXAS_SAMPLE)
    assert kernels == [
        {"function": "_Z1kv", "arch": "sm_90a", "stack": 8, "spill_stores": 8,
         "spill_loads": 16, "registers": 64},
        {"function": "_Z1gv", "arch": "sm_80", "stack": 0, "spill_stores": 0,
         "spill_loads": 0, "registers": 198},
    ]  # fmt: skip
    assert len(warnings) == 1 and "C7514" in warnings[0]


@pytest.mark.skipif(shutil.which("clang-format") is None, reason="clang-format is not installed")
def test_csrc_is_clang_formatted():
    """STYLE.md: clang-format for csrc/ (csrc/.clang-format; generated files opt out)."""
    files = [
        p
        for pattern in ("kernels/*", "src/*", "python/*.cpp", "include/dcgen_quant/*.h")
        for p in CSRC.glob(pattern)
    ] + [CSRC.parent / "examples" / "abi_example.c"]
    proc = subprocess.run(
        ["clang-format", "--dry-run", "-Werror", *map(str, files)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
