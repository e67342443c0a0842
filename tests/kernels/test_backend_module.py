"""dcgen_quant.kernels as a backend module: importable without triton, reasons, layouts, and the
custom ops routing to it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dcgen_quant import capabilities, kernels, ops
from dcgen_quant.formats.layouts import get_layout


def test_import_does_not_import_triton():
    code = "import sys, dcgen_quant.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unavailable_reason_without_triton(monkeypatch):
    monkeypatch.setattr(capabilities, "triton_unavailable", lambda: "no triton here")
    assert kernels.unavailable_reason() == "no triton here"
    with pytest.raises(ops.BackendUnsupported, match="no triton here"):
        kernels.quantize_act(torch.zeros(1, 64), None, None, "int4")


def test_unavailable_reason_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setattr(capabilities, "triton_interpret", lambda: False)
    monkeypatch.setattr(kernels, "_mode_mismatch", lambda: None)
    monkeypatch.setattr(capabilities, "cuda_unavailable", lambda: "no GPU")
    reason = kernels.unavailable_reason()
    assert "no GPU" in reason and "TRITON_INTERPRET=1" in reason


@pytest.mark.parametrize("fmt,layout", [("int4", "split_halves"), ("nvfp4", "canonical")])
def test_preferred_layouts_are_registered(fmt, layout):
    assert kernels.preferred_layout(fmt) == layout
    get_layout(layout)
    with pytest.raises(ValueError, match="unsupported format"):
        kernels.preferred_layout("int8")


def test_wrong_device_is_unsupported_not_a_crash(device):
    other = torch.device("meta")
    with pytest.raises(ops.BackendUnsupported, match="meta"):
        kernels.attention(*(torch.zeros(1, 1, 4, 64, device=other) for _ in range(3)), None)


def test_custom_op_routes_to_triton(device, triton_backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 64, generator=g).bfloat16().to(device) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, None), kernels.attention(q, k, v, None))
