"""The repository root holds no Python package that could shadow another project's module.

`python -m dcgen_quant` in a checkout and pytest (rootdir conftest.py) both put the repository
root on sys.path, so a top-level folder with an `__init__.py` is importable under its bare name.
A root `kernels/` once took the name of Hugging Face's `kernels` package: transformers >= 5.25
found it, imported it as the hub-kernels library and every diffusers model import failed.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the project's own top-level packages; each name is checked against the environment below
TOP_LEVEL_PACKAGES = {"dcgen_quant", "bench", "tests"}


def test_no_other_top_level_package():
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    extra = found - TOP_LEVEL_PACKAGES
    assert not extra, f"top-level packages {sorted(extra)} would shadow modules of the same name"


def test_names_that_dependencies_probe_resolve_outside_the_checkout():
    # run from the root, as the README's commands do; `kernels` is what transformers probes
    code = (
        "import importlib.util, sys\n"
        "for name in ('kernels', 'triton_kernels'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    origin = (spec.origin or '') if spec else ''\n"
        f"    assert not origin.startswith({str(ROOT)!r} + '/' + name), (name, origin)\n"
        "import diffusers.models.transformers.transformer_flux\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
