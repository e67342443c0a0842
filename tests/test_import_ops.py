"""``import dcgen_quant`` registers the custom ops with torch (``torch.ops.dcgen_quant.*``), in
either import order, without importing torch itself (``python -m dcgen_quant --help`` and the
package import stay cheap)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)  # fmt: skip


@pytest.mark.parametrize("order", ["import dcgen_quant; import torch",
                                   "import torch; import dcgen_quant"])  # fmt: skip
def test_ops_are_reachable_through_torch_ops_after_importing_the_package(order):
    proc = _python(
        f"{order}\n"
        "x = torch.randn(3, 64)\n"
        "q, s, lora = torch.ops.dcgen_quant.quantize_act(x, None, None, 'int4')\n"
        "assert q.shape == (3, 32) and s.shape == (3, 1), (q.shape, s.shape)\n"
        "assert hasattr(torch.ops.dcgen_quant, 'gemm_w4a4')\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_importing_the_package_does_not_import_torch():
    proc = _python("import sys, dcgen_quant\nassert 'torch' not in sys.modules\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
