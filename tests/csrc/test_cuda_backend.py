"""dcgen_quant.cuda_backend on a machine without a GPU: what it reports and refuses."""

import json

import pytest
import torch

from dcgen_quant import capabilities, cuda_backend, ops
from dcgen_quant.formats.layouts import layout_names


def test_preferred_layout_is_registered():
    for fmt in ("int4", "nvfp4"):
        assert cuda_backend.preferred_layout(fmt) in layout_names()
    with pytest.raises(ValueError, match="unsupported format 'int8'"):
        cuda_backend.preferred_layout("int8")


def test_unavailable_reason_says_what_is_missing():
    reason = cuda_backend.unavailable_reason()
    if capabilities.cuda_unavailable() is None and reason is None:
        pytest.skip("the CUDA backend is usable here")
    assert isinstance(reason, str) and len(reason) > 20
    info = cuda_backend.build_info()
    if info is None or not info["built"]:
        assert "not built" in reason
    else:
        assert reason == capabilities.cuda_unavailable() or "compute capability" in reason
    assert ops.backend_unavailable("cuda") == reason
    with pytest.raises(RuntimeError, match="cannot use backend 'cuda'"):
        ops.set_backend("cuda")


def test_build_record_when_skipped(tmp_path, monkeypatch):
    """A skipped build leaves a record whose reason the backend repeats."""
    record = {"built": False, "reason": "DCGEN_QUANT_SKIP_CUDA=1 was set when installed"}
    (tmp_path / "_cuda_build.json").write_text(json.dumps(record))
    monkeypatch.setattr(cuda_backend, "_HERE", tmp_path)
    monkeypatch.setattr(cuda_backend, "_installed_dir", lambda: None)  # no other copy
    cuda_backend.build_info.cache_clear()
    cuda_backend._library.cache_clear()
    try:
        assert cuda_backend.unavailable_reason() == (
            "the CUDA library was not built: DCGEN_QUANT_SKIP_CUDA=1 was set when installed"
        )
        with pytest.raises(ops.BackendUnsupported, match="DCGEN_QUANT_SKIP_CUDA"):
            cuda_backend.gemm_w4a16(torch.zeros(1, 64), None, None, None, None, "int4", "canonical")
        (tmp_path / "_cuda_build.json").unlink()
        cuda_backend.build_info.cache_clear()
        cuda_backend._library.cache_clear()
        assert "installed without its build step" in cuda_backend.unavailable_reason()
    finally:
        cuda_backend.build_info.cache_clear()
        cuda_backend._library.cache_clear()


def test_build_of_an_installed_copy_shadowed_by_the_source_checkout(tmp_path, monkeypatch):
    """Run from a checkout after a non-editable install: the build record is in site-packages."""
    checkout, installed = tmp_path / "checkout", tmp_path / "site-packages" / "dcgen_quant"
    checkout.mkdir()
    installed.mkdir(parents=True)
    record = {"built": False, "reason": "the record of the installed copy"}
    (installed / "_cuda_build.json").write_text(json.dumps(record))
    monkeypatch.setattr(cuda_backend, "_HERE", checkout)
    monkeypatch.syspath_prepend(str(installed.parent))
    cuda_backend.build_info.cache_clear()
    cuda_backend._library.cache_clear()
    try:
        assert cuda_backend.build_dir() == installed
        assert cuda_backend.unavailable_reason().endswith("the record of the installed copy")
    finally:
        cuda_backend.build_info.cache_clear()
        cuda_backend._library.cache_clear()


def test_cpu_tensors_and_attention_are_refused():
    info = cuda_backend.build_info()
    if info is None or not info["built"]:
        pytest.skip("the CUDA library is not built here")
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ops.BackendUnsupported, match="needs CUDA tensors"):
        cuda_backend.quantize_act(x, None, None, "int4", "canonical")
    with pytest.raises(ops.BackendUnsupported, match="no attention kernel"):
        cuda_backend.attention(x, x, x, None)


def test_ops_on_cpu_never_pick_the_cuda_backend():
    x = torch.randn(3, 64).to(torch.bfloat16)
    q, s, la = ops.quantize_act(x, None, None, "int4")
    assert torch.equal(q, ops.quantize_act_reference(x, None, None, "int4")[0])
