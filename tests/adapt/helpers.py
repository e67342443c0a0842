"""Helpers for the adapt CLI tests."""

from __future__ import annotations

import json
from pathlib import Path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m dcgen_quant`` in-process; returns (exit code, stdout, stderr)."""
    from dcgen_quant.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def json_report(stdout: str) -> dict:
    start = stdout.index("{")  # progress bars go to stderr; stdout is the JSON document
    return json.loads(stdout[start:])


def chain_args(inputs: dict, out: Path, *extra: str, base: str = "base") -> list[str]:
    args = [
        "adapt",
        "--base",
        inputs[base],
        "--target-ae",
        inputs["target_ae"],
        "--data",
        inputs["data"],
        "--heldout",
        inputs["heldout"],
        "--out",
        str(out),
        "--resolution",
        "64",
        "--text-length",
        "8",
        "--rank",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
    ]
    if base == "base":
        args += ["--base-ae", inputs["base_ae"]]
    return args + list(extra)
