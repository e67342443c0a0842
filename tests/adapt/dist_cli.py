"""``python -m dcgen_quant`` for torchrun workers in tests, with an optional injected interrupt.

Usage: ``torchrun ... tests/adapt/dist_cli.py [--stop-at STAGE:STEP] adapt ARGS...``. With
``--stop-at``, every rank raises KeyboardInterrupt after completing STEP of STAGE (the same step
on every rank, as a Ctrl-C sent to the whole job would), so the run keeps its last periodic
checkpoint.
"""

from __future__ import annotations

import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--stop-at"]:
        stage, step = argv[1].split(":")
        argv = argv[2:]
        from dcgen_quant.adapt import train

        def hook(name, done):
            if name == stage and done == int(step):
                raise KeyboardInterrupt(f"injected in {name} at step {done}")

        train.STEP_HOOKS.append(hook)
    from dcgen_quant.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
