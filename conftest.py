"""Repository-level pytest configuration: the ``--benchmark`` flag.

``pytest --benchmark`` runs the benchmark suite, the files ``bench/bench_*.py`` (test functions
that use pytest-benchmark's ``benchmark`` fixture), instead of the tests. A plain ``pytest``
never collects them (``testpaths = tests``), and names them skipped when they are passed
explicitly without the flag. Benchmarks size themselves with the ``bench_size`` fixture: small
on a CPU, full size on a GPU. pytest-benchmark's own options work as usual
(``--benchmark-json PATH``, ``--benchmark-only``, ``--benchmark-min-rounds``, ...).

This file lives at the repository root (not in tests/) because an option must be registered by
a conftest that pytest loads before it parses the command line, whichever paths are given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent / "bench"


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the benchmark suite (bench/bench_*.py) instead of the tests; with no paths "
        "given, collects bench/ (docs/BENCHMARKS.md)",
    )


def pytest_configure(config):
    if not config.getoption("benchmark"):
        return
    # `pytest --benchmark` with no paths: collect bench/ instead of the testpaths (tests/)
    source = getattr(config, "args_source", None)
    if source == pytest.Config.ArgsSource.TESTPATHS or (
        source is None and config.args == list(config.getini("testpaths"))
    ):
        config.args = [str(BENCH_DIR)]


def _is_bench_file(path: Path) -> bool:
    return path.suffix == ".py" and path.name.startswith("bench_") and path.parent == BENCH_DIR


def pytest_collect_file(file_path: Path, parent):
    # Files given explicitly on the command line are collected by pytest itself.
    if _is_bench_file(file_path) and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest --benchmark`")
    for item in items:
        if _is_bench_file(Path(str(item.fspath))):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_size() -> str:
    """``"full"`` with a CUDA GPU (real sizes), else ``"small"`` (sizes a CPU runs in seconds)."""
    from dcgen_quant import capabilities

    return "full" if capabilities.cuda_unavailable() is None else "small"
