"""``python -m dcgen_quant {quantize,inspect,adapt,generate,evaluate,bench,convert}``.

Each command lives in its own module, which exposes ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Modules import their heavy dependencies inside ``run`` so that
``--help`` stays fast. Errors the user can fix (``ValueError``, ``FileNotFoundError``, ...) are
printed as one line ``error: ...`` with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "quantize": "dcgen_quant.quantize.cli",
    "inspect": "dcgen_quant.inspect_cli",
    "adapt": "dcgen_quant.adapt.cli",
    "generate": "dcgen_quant.generate_cli",
    "evaluate": "dcgen_quant.evaluate.cli",
    "bench": "dcgen_quant.bench.cli",
    "convert": "dcgen_quant.interop.cli",
}

# Exceptions that mean "bad input", reported as a one-line error.
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    KeyError,
    RuntimeError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dcgen_quant",
        description="DC-Gen post-training, SVDQuant 4-bit quantization and benchmarks for DiTs.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"dcgen_quant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def _quiet_library_logs() -> None:
    # diffusers warns on every `.to(dtype)` of a model without fp32-pinned modules, which the
    # commands do on purpose; keep its errors, drop its warnings (DCGEN_QUANT_VERBOSE=1 keeps all)
    if os.environ.get("DCGEN_QUANT_VERBOSE", "0") in ("", "0"):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_logs()
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, KeyError):
            message = f"missing key {exc}"
        print(f"error: {message}", file=sys.stderr)
        return 2
