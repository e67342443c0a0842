"""What the load-time integrity checks cost on a large checkpoint (issue 13).

    python -m dcgen_quant.bench.load_verify [--format int4|nvfp4] [--double N] [--single M]
        [--repeats R] [--out bench/results]

Streams a random FLUX.1-dev-width dcgen_quant checkpoint with N double and M single blocks
(``bench/interop_speed.py``'s writer; default 4 + 8 blocks, about 1.3 GiB in INT4), then times
``load_quantized(path, verify=True)`` (header SHA-256, schema, model config, per-tensor CRC-32 and
value checks) against ``verify=False`` (header, schema and model config only), alternating the
two, ``R`` times each, in one process, after a warm-up load that brings the file into the page
cache. Reports the medians, their ratio and the checks' throughput in GiB/s. Writes
``OUT/load_verify-<fmt>-cpu-<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time_load(path: Path, verify: bool) -> float:
    from dcgen_quant.checkpoint import load_quantized

    t0 = time.perf_counter()
    model = load_quantized(path, verify=verify, layout="canonical")
    seconds = time.perf_counter() - t0
    del model
    return seconds


def main(argv: list[str] | None = None) -> int:
    from dcgen_quant.tables import emit

    from .interop_speed import make_checkpoint

    parser = argparse.ArgumentParser(prog="python -m dcgen_quant.bench.load_verify")
    parser.add_argument("--format", choices=("int4", "nvfp4"), default="int4")
    parser.add_argument("--double", type=int, default=4, help="double blocks")
    parser.add_argument("--single", type=int, default=8, help="single blocks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for .md/.json results")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    for name in ("double", "single", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="load_verify-") as tmp:
        path = Path(tmp) / "model.safetensors"
        make_checkpoint(path, args.format, num_layers=args.double, num_single_layers=args.single)
        size = path.stat().st_size
        _time_load(path, True)  # warm-up: page cache, imports
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (False, True):
                times[verify].append(_time_load(path, verify))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    row = {
        "format": args.format,
        "blocks": f"{args.double}+{args.single}",
        "gib": size / 1024**3,
        "verify_s": on,
        "no_verify_s": off,
        "ratio": on / off,
        "checks_gib_s": size / 1024**3 / max(on - off, 1e-9),
    }
    columns = [("format", "format", None), ("blocks", "blocks", None), ("gib", "GiB", ".2f"),
               ("verify_s", "verify=True s", ".2f"), ("no_verify_s", "verify=False s", ".2f"),
               ("ratio", "ratio", ".2f"), ("checks_gib_s", "checks GiB/s", ".2f")]  # fmt: skip
    meta = {
        "date": datetime.date.today().isoformat(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "times": {"verify": times[True], "no_verify": times[False]},
    }
    emit([row], columns, args.json, title="load_quantized: integrity checks on vs off",
         extra=meta if args.json else None)  # fmt: skip
    if args.out is not None:
        from dcgen_quant.atomic import atomic_write_text
        from dcgen_quant.tables import format_table

        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"load_verify-{args.format}-cpu-{meta['date']}"
        atomic_write_text(stem.with_suffix(".json"), json.dumps({**row, **meta}, indent=2) + "\n")
        text = format_table([row], columns, title="load_quantized: integrity checks on vs off")
        note = (
            f"\n\nMedian of {args.repeats} alternating loads each, one torch thread, file in the "
            f"page cache; load average {meta['load_average'][0]:.1f} (shared machine).\n"
        )
        atomic_write_text(stem.with_suffix(".md"), text + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
