"""Quantizer speed: one layer through the whole SVDQuant search, randomized vs full SVD.

``python -m dcgen_quant.bench.quantizer_speed --out DIR [--quick] [--format int4|nvfp4]
[--device cpu|cuda]`` quantizes one ``Linear(3072, 12288)`` (FLUX.1's ``ff.net.0.proj``) with the
default QuantConfig (rank 32, 20-point grid = 39 (alpha, beta) candidates, up to 8 low-rank
refinement steps, 4096 calibration tokens, 1024 of them for ranking candidates) twice: with the
randomized range finder (the default) and with ``torch.linalg.svd`` (``svd="full"``). It reports
the wall time of each, how many SVDs each computed, and the relative output error of each on the
calibration inputs and on held-out inputs, with the difference between the two.
``--quick`` uses a ``Linear(256, 1024)`` and 1024 tokens (the pytest-benchmark suite on a CPU).

The layer is synthetic but not pure noise: its weight has a decaying spectrum (64 strong
directions with singular values 8/i plus a Gaussian floor) and its inputs have 8 outlier
channels 50x the others, the structure SVDQuant exploits (tests/quantize/helpers.py builds the
same kind of layer for the acceptance test).

Writes ``DIR/quantizer_speed.md`` and ``DIR/quantizer_speed.json`` (with CPU / GPU model,
threads, load average, torch version and date) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

NAME = "quantizer_speed"
FULL_LAYER = (3072, 12288)  # (in_features K, out_features N)
QUICK_LAYER = (256, 1024)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    return env


def synthetic_layer(k: int, n: int, tokens: int, device, seed: int = 0):
    """(Linear(k, n), calibration inputs [tokens, k], held-out inputs [tokens, k])."""
    g = torch.Generator().manual_seed(seed)
    strong = 64
    u = torch.linalg.qr(torch.randn(n, strong, generator=g)).Q
    v = torch.linalg.qr(torch.randn(k, strong, generator=g)).Q
    s = 8.0 / torch.arange(1, strong + 1, dtype=torch.float32)
    w = (u * s) @ v.t() + 0.5 * torch.randn(n, k, generator=g) / k**0.5
    lin = nn.Linear(k, n).requires_grad_(False)
    lin.weight.copy_(w)
    lin.bias.copy_(0.1 * torch.randn(n, generator=g))

    def inputs():
        x = torch.randn(tokens, k, generator=g)
        x[:, :: k // 8][:, :8] *= 50.0
        return x.to(device)

    return lin.to(device), inputs(), inputs()


def measure(lin, x, held_out, svd: str, fmt: str) -> dict[str, Any]:
    """Quantize ``lin`` once with the default QuantConfig and ``svd``; time and errors."""
    from dcgen_quant.quantize import QuantConfig, QuantReport, quantize_linear

    config = QuantConfig(format=fmt, svd=svd, calib_tokens=x.shape[0])
    report = QuantReport()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    module = quantize_linear(lin, x, config, report=report, baselines=False)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    entry = report["linear"]
    with torch.no_grad():
        y = lin(held_out).float()
        err_held = float((module(held_out).float() - y).norm() / y.norm())
    return {
        "svd": svd,
        "seconds": seconds,
        "svds": entry.lowrank_iters + 2 * (config.smooth_grid - 1),
        "alpha": entry.alpha,
        "beta": entry.beta,
        "err_calib": entry.err_svdq,
        "err_heldout": err_held,
    }


def run(out: Path, quick: bool, fmt: str, device: torch.device) -> dict[str, Any]:
    k, n = QUICK_LAYER if quick else FULL_LAYER
    tokens = 1024 if quick else 4096
    lin, x, held_out = synthetic_layer(k, n, tokens, device)
    # warm-up: first-call costs (op registration, library init) are not the quantizer's
    small, xs, _ = synthetic_layer(64, 64, 64, device)
    for svd in ("randomized", "full"):
        measure(small, xs, xs, svd, fmt)
    rows = [measure(lin, x, held_out, svd, fmt) for svd in ("randomized", "full")]
    rnd, full = rows
    result = {
        "benchmark": NAME,
        "layer": {"in_features": k, "out_features": n, "tokens": tokens, "format": fmt},
        "config": "QuantConfig defaults (rank 32, smooth_grid 20 -> 39 candidates, "
        "lowrank_iters 8, search_tokens 1024)",
        "rows": rows,
        "speedup_randomized_vs_full": full["seconds"] / rnd["seconds"],
        "err_diff_calib": rnd["err_calib"] - full["err_calib"],
        "err_diff_heldout": rnd["err_heldout"] - full["err_heldout"],
        "environment": environment(device),
    }
    out.mkdir(parents=True, exist_ok=True)
    from dcgen_quant.atomic import atomic_write_text

    atomic_write_text(out / f"{NAME}.json", json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    atomic_write_text(out / f"{NAME}.md", table)
    print(table)
    return result


def markdown(result: dict[str, Any]) -> str:
    layer, env = result["layer"], result["environment"]
    lines = [
        f"# SVDQuant quantizer speed: one Linear({layer['in_features']}, "
        f"{layer['out_features']}), {layer['format']}, {layer['tokens']} calibration tokens",
        "",
        f"{result['config']}; errors are relative output errors ||y_q - y|| / ||y||.",
        "",
        "| SVD | seconds | SVDs | alpha | beta | rel err (calib) | rel err (held-out) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['svd']} | {r['seconds']:.1f} | {r['svds']} | {r['alpha']:.2f} | "
            f"{r['beta']:.2f} | {r['err_calib']:.5f} | {r['err_heldout']:.5f} |"
        )
    lines += [
        "",
        f"randomized is {result['speedup_randomized_vs_full']:.1f}x faster than full; its error "
        f"minus full's: {result['err_diff_calib']:+.5f} (calib), "
        f"{result['err_diff_heldout']:+.5f} (held-out).",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgen_quant.bench.quantizer_speed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="small layer (CPU test suite)")
    parser.add_argument("--format", default="int4", choices=("int4", "nvfp4"))
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    args = parser.parse_args(argv)
    run(args.out, args.quick, args.format, torch.device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
