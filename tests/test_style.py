"""House style (STYLE.md item 9): ruff lint and format are clean over the project's own files.

Only the project's own paths are checked (its packages, tests, benchmarks, csrc scripts and
top-level Python files), never the whole working tree: a checkout may hold a virtual environment
(under any name) or other people's code.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = ("dcgen_quant", "bench", "tests", "csrc", "examples")
RUFF = shutil.which("ruff")
needs_ruff = pytest.mark.skipif(RUFF is None, reason="ruff is not installed (test extra)")


def project_paths(root: Path = ROOT) -> list[str]:
    dirs = [d for d in PROJECT_DIRS if (root / d).is_dir()]
    return dirs + sorted(p.name for p in root.glob("*.py"))


def ruff(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RUFF or sys.executable, *args], cwd=root, capture_output=True, text=True)


@needs_ruff
@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    proc = ruff(ROOT, *args, *project_paths())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@needs_ruff
def test_a_virtualenv_under_any_name_is_not_checked(tmp_path):
    (tmp_path / "dcgen_quant").mkdir()
    (tmp_path / "dcgen_quant" / "fine.py").write_text('"""Fine."""\n\nVALUE = 1\n')
    (tmp_path / "setup.py").write_text('"""Setup."""\n')
    # virtualenv writes bin/activate_this.py (ruff's default excludes know site-packages only)
    scripts = tmp_path / "my-env" / "bin"
    scripts.mkdir(parents=True)
    (scripts / "activate_this.py").write_text("import os,sys\nx=[1,\n2]\n")  # unused, unformatted
    assert ruff(tmp_path, "check", ".").returncode != 0  # the whole tree: the env fails it
    assert project_paths(tmp_path) == ["dcgen_quant", "setup.py"]
    for args in (["check"], ["format", "--check"]):
        proc = ruff(tmp_path, *args, *project_paths(tmp_path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
