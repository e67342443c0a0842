"""The README's quickstart and CI must not drift apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    install_and_run, install_and_test = commands
    assert "python -m dcgen_quant quantize" in install_and_run
    assert "pytest" in install_and_test
    for cmd in commands:
        assert "torch==2.13.0" in cmd  # a bare `torch` pulls a multi-GB CUDA build on CPU machines
    # the Nunchaku converter oracle (tests/interop/) is installed without its heavy declared deps
    assert "pip install --no-deps deepcompressor-toolkit==0.1.0" in install_and_test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines


def test_public_api_names_resolve():
    import dcgen_quant

    for name in dcgen_quant.__all__:
        assert getattr(dcgen_quant, name) is not None, name
