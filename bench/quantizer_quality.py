"""Quantizer quality: held-out error and time of each step of the SVDQuant search.

``python -m dcgen_quant.bench.quantizer_quality --out DIR`` quantizes, with each variant below,
(1) synthetic outlier layers of FLUX sizes (``Linear(1536, 4096)`` and ``Linear(3072, 12288)``,
2% of the input channels 30x the others, 512 calibration tokens) and scores each on 2048 fresh
tokens from the same distribution (same outlier channels); (2) the whole embedded tiny FLUX (the
``quantize`` command's default run: 4 samples x 4 steps) and scores every quantized layer on the
inputs it receives from 4 fresh samples (same generator: same text-channel scales) flowing
through the quantized model, against the original layer. INT4 and NVFP4.

Variants (QuantConfig fields; docs/QUANTIZE.md):

- ``baseline``: ``holdout=0, lowrank="svd", gptq=False, clip=False``, the quantizer before
  held-out scoring (DeepCompressor's search: every choice judged on the calibration tokens);
- ``baseline+gptq``: the same with GPTQ as it was (unshrunk Hessian, kept where the error on the
  calibration tokens falls);
- ``heldout``: held-out scoring, SVD branch, no GPTQ (none of these variants clips scales);
- ``gptq``: held-out scoring + GPTQ with the shrunk Hessian, kept where held-out error falls;
- ``output``: held-out scoring + output-aware low-rank steps, no GPTQ;
- ``no-clip``: held-out scoring, output-aware low-rank, GPTQ (the default until 2026-12-03:
  ``clip=False``, ``--no-clip-search``);
- ``default``: ``QuantConfig()``: the same plus clipped group scales (``--clip-search``), kept
  where the held-out error falls;
- ``rank-alloc`` (tiny FLUX only): the default with per-layer ranks (multiples of 16) chosen by
  held-out error per byte under the uniform rank-32 budget.

Two kinds of synthetic inputs: ``iid`` (independent Gaussian channels, the case where no
correlation exists for GPTQ or the output-aware branch to use) and ``correlated`` (64 latent
factors with a decaying spectrum plus 10% independent noise, as the tiny FLUX's activations,
whose top 64 of 256 correlation eigenvalues hold 84-99% of the variance). Times are wall and
CPU seconds (``time.process_time``) in this process, one torch thread; ``baseline`` and
``default`` run ``--repeats`` times, interleaved, and their medians give the time ratio (the
others run once). The ratio is of CPU seconds, which other jobs on a shared machine change far
less than wall seconds.

Writes ``DIR/quantizer_quality.md`` and ``.json`` (environment included) and prints the tables.
``--quick``: one small layer and a 2-variant model run (the CPU test of this script).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

NAME = "quantizer_quality"
SIZES = ((1536, 4096), (3072, 12288))  # (in_features K, out_features N)
QUICK_SIZES = ((256, 512),)
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"holdout": 0.0, "lowrank": "svd", "gptq": False, "clip": False},
    "baseline+gptq": {"holdout": 0.0, "lowrank": "svd", "gptq": True, "gptq_shrink": 0.0,
                      "clip": False},
    "heldout": {"lowrank": "svd", "gptq": False, "clip": False},
    "gptq": {"lowrank": "svd", "gptq": True, "clip": False},
    "output": {"lowrank": "auto", "gptq": False, "clip": False},
    "no-clip": {"clip": False},
    "default": {},
    "rank-alloc": {"rank_alloc": True},
}  # fmt: skip
LAYER_VARIANTS = ("baseline", "baseline+gptq", "heldout", "gptq", "output", "no-clip", "default")
MODEL_VARIANTS = ("baseline", "baseline+gptq", "heldout", "gptq", "output", "no-clip", "default",
                  "rank-alloc")  # fmt: skip
TIMED = ("baseline", "default")  # repeated; the others run once


def structured_weight(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[N, K]: 64 directions with singular values 8/i plus a Gaussian floor (std 0.5/sqrt(K)),
    as tests/quantize/helpers.py and quantizer_speed.py build it."""
    u = torch.linalg.qr(torch.randn(n, 64, generator=g)).Q
    v = torch.linalg.qr(torch.randn(k, 64, generator=g)).Q
    s = 8.0 / torch.arange(1, 65, dtype=torch.float32)
    return (u * s) @ v.t() + 0.5 * torch.randn(n, k, generator=g) / k**0.5


def outlier_layer(k: int, n: int, kind: str, calib: int = 512, fresh: int = 2048, seed: int = 0):
    """(Linear(k, n), calibration tokens [calib, k], fresh tokens [fresh, k]) of ``kind``
    "iid" or "correlated", with the same 2% outlier channels (30x) in both token sets."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n).requires_grad_(False)
    lin.weight.copy_(structured_weight(n, k, g))
    lin.bias.copy_(0.1 * torch.randn(n, generator=g))
    channels = torch.randperm(k, generator=g)[: max(1, round(0.02 * k))]
    latent = 64
    mix = torch.randn(latent, k, generator=g) / latent**0.5
    spread = 1.0 / torch.arange(1, latent + 1, dtype=torch.float32).sqrt()
    unit = (latent / spread.square().sum()) ** 0.5  # latent part: unit variance on average

    def tokens(t: int) -> torch.Tensor:
        if kind == "iid":
            x = torch.randn(t, k, generator=g)
        else:
            z = torch.randn(t, latent, generator=g) * spread
            x = (z @ mix) * unit + 0.3 * torch.randn(t, k, generator=g)
        x[:, channels] *= 30.0
        return x

    return lin, tokens(calib), tokens(fresh)


def _config(variant: str, fmt: str, **extra):
    from dcgen_quant.quantize import QuantConfig

    return QuantConfig(format=fmt, **VARIANTS[variant], **extra)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure_layer(lin, calib, fresh, variant: str, fmt: str) -> dict[str, Any]:
    """Quantize ``lin`` with one variant; seconds, in-sample / held-out / fresh errors."""
    from dcgen_quant.quantize import QuantReport, quantize_linear

    config = _config(variant, fmt, calib_tokens=calib.shape[0])
    report = QuantReport()
    start, cpu = time.perf_counter(), time.process_time()
    module = quantize_linear(lin, calib, config, report=report, baselines=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    entry = report["linear"]
    with torch.no_grad():
        err_fresh = _rel(module(fresh), lin(fresh))
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "err_fit": entry.err_svdq,
        "err_heldout": entry.err_heldout,
        "err_fresh": err_fresh,
        "gptq": entry.gptq,
        "lowrank": entry.lowrank,
        "alpha": entry.alpha,
        "beta": entry.beta,
    }


def _timed_runs(run_once, variants, repeats: int) -> dict[str, dict[str, Any]]:
    """Run every variant (the TIMED ones ``repeats`` times, interleaved); median seconds."""
    rows: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        for v in variants:
            if r > 0 and v not in TIMED:
                continue
            row = run_once(v)
            times[v].append(row["seconds"])
            cpu[v].append(row["cpu_seconds"])
            rows.setdefault(v, row)
    for v in variants:
        rows[v]["seconds"] = statistics.median(times[v])
        rows[v]["cpu_seconds"] = statistics.median(cpu[v])
        rows[v]["runs"] = len(times[v])
    return rows


def layers_part(
    sizes, formats, repeats: int, on_entry, variants=LAYER_VARIANTS, kinds=("iid", "correlated")
) -> list[dict[str, Any]]:
    """Every (size, inputs, format) entry; ``on_entry(entry)`` is called as each finishes."""
    # warm-up: first-call costs (op registration, library init) are no variant's
    lin, calib, fresh = outlier_layer(64, 64, "iid", 128, 16)
    for fmt in formats:
        for v in variants:
            measure_layer(lin, calib, fresh, v, fmt)
    out = []
    for k, n in sizes:
        for kind in kinds:
            lin, calib, fresh = outlier_layer(k, n, kind)
            for fmt in formats:
                run = functools.partial(measure_layer, lin, calib, fresh, fmt=fmt)
                rows = _timed_runs(lambda v, run=run: run(variant=v), variants, repeats)
                entry = {"layer": f"{k}->{n}", "inputs": kind, "format": fmt, "rows": rows}
                out.append(entry)
                on_entry(entry)
    return out


# --------------------------------------------------------------------------------------------
# the whole tiny FLUX


def heldout_model_errors(quantized, original, samples) -> dict[str, float]:
    """Per quantized layer: relative output error on the inputs it receives while
    ``quantized`` runs ``samples``, against the same-named layer of ``original`` (float32)."""
    report = quantized.dcgen_quant_report
    names = [e.name for e in report.quantized() if e.err_svdq is not None]
    sums = {name: [0.0, 0.0] for name in names}
    handles = []
    for name in names:
        ref = original.get_submodule(name)
        w = ref.weight.detach().float()
        b = None if ref.bias is None else ref.bias.detach().float()

        def hook(module, args, output, name=name, w=w, b=b):
            x = args[0].float()
            y = x @ w.t() if b is None else torch.addmm(b, x.reshape(-1, x.shape[-1]), w.t())
            y = y.reshape(*x.shape[:-1], -1)
            sums[name][0] += float((output.float() - y).square().sum())
            sums[name][1] += float(y.square().sum())

        handles.append(quantized.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for kw in samples:
                quantized(**kw)
    finally:
        for h in handles:
            h.remove()
    return {name: (e / y) ** 0.5 for name, (e, y) in sums.items()}


def measure_model(variant: str, fmt: str, quick: bool) -> dict[str, Any]:
    from dcgen_quant.checkpoint import save_quantized
    from dcgen_quant.models import synthetic_calibration, tiny
    from dcgen_quant.quantize import quantize_model

    model = tiny.tiny_flux(seed=0, dtype=torch.bfloat16)
    original = copy.deepcopy(model)
    samples, steps = (2, 2) if quick else (4, 4)
    calib = synthetic_calibration(model, samples, steps, 0)
    # fresh samples from the same generator (same text-channel scales): the dicts after the
    # first samples * steps of a run with twice the samples
    fresh = synthetic_calibration(model, 2 * samples, steps, 0)[samples * steps :]
    config = _config(variant, fmt)
    start, cpu = time.perf_counter(), time.process_time()
    report = quantize_model(model, calib, config, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    errors = heldout_model_errors(model, original, fresh)
    with tempfile.TemporaryDirectory() as tmp:
        size = save_quantized(model, Path(tmp) / "m.safetensors", config, report).stat().st_size
    summary = report.summary()
    ranks = sorted({e.rank for e in report.quantized() if e.kind == "w4a4"})
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "err_fit": summary["mean_rel_err"],
        "err_heldout": summary["mean_rel_err_heldout"],
        "err_fresh": sum(errors.values()) / len(errors),
        "err_fresh_max": max(errors.values()),
        "layers": len(errors),
        "gptq_layers": sum(e.gptq for e in report.quantized()),
        "output_layers": sum(e.lowrank == "output" for e in report.quantized()),
        "ranks": ranks,
        "bytes": size,
    }


def model_part(
    formats, repeats: int, quick: bool, on_entry, variants=MODEL_VARIANTS
) -> list[dict[str, Any]]:
    out = []
    if quick:
        variants = ("baseline", "default")
    for fmt in formats:
        run = functools.partial(measure_model, fmt=fmt, quick=quick)
        rows = _timed_runs(lambda v, run=run: run(variant=v), variants, repeats)
        entry = {"model": "tiny-flux", "format": fmt, "rows": rows}
        out.append(entry)
        on_entry(entry)
    return out


# --------------------------------------------------------------------------------------------
# tables


def _f(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _cpu(row: dict[str, Any], base: dict[str, Any]) -> str:
    """CPU seconds and their ratio to the baseline's (one thread: CPU time is what the work
    costs, wall time also holds the time other jobs took the core)."""
    if row.get("cpu_seconds") is None or base.get("cpu_seconds") is None:
        return "- | -"
    return f"{row['cpu_seconds']:.1f} | {row['cpu_seconds'] / base['cpu_seconds']:.2f}"


def _layer_block(entry: dict[str, Any]) -> str:
    rows = entry["rows"]
    base = rows["baseline"]
    lines = [
        f"### Linear {entry['layer']}, {entry['inputs']} inputs, {entry['format']}",
        "",
        "| variant | fresh err | vs baseline | held-out err | fit err | GPTQ kept | branch "
        "| seconds | CPU s | CPU vs baseline |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for v, r in rows.items():
        lines.append(
            f"| {v} | {r['err_fresh']:.4f} | {r['err_fresh'] / base['err_fresh']:.3f} | "
            f"{_f(r['err_heldout'])} | {_f(r['err_fit'])} | {'yes' if r['gptq'] else 'no'} | "
            f"{r['lowrank']} | {r['seconds']:.1f} | {_cpu(r, base)} |"
        )
    return "\n".join(lines + [""])


def _model_block(entry: dict[str, Any]) -> str:
    rows = entry["rows"]
    base = rows["baseline"]
    lines = [
        f"### tiny FLUX, {entry['format']}: mean over {base['layers']} quantized layers",
        "",
        "| variant | fresh err | vs baseline | max fresh err | held-out err | fit err "
        "| GPTQ layers | output-branch layers | ranks | bytes | seconds | CPU s "
        "| CPU vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for v, r in rows.items():
        lines.append(
            f"| {v} | {r['err_fresh']:.4f} | {r['err_fresh'] / base['err_fresh']:.3f} | "
            f"{r['err_fresh_max']:.4f} | {_f(r['err_heldout'])} | {_f(r['err_fit'])} | "
            f"{r['gptq_layers']} | {r['output_layers']} | "
            f"{','.join(map(str, r['ranks']))} | {r['bytes']} | {r['seconds']:.1f} | "
            f"{_cpu(r, base)} |"
        )
    return "\n".join(lines + [""])


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# SVDQuant quantizer quality: held-out error per variant",
        "",
        f"`{result.get('command', 'python -m dcgen_quant.bench.quantizer_quality')}` "
        "(bench/quantizer_quality.py describes "
        "the layers, inputs and variants). *fresh err*: relative output error "
        "||y_q - y|| / ||y|| on tokens no variant saw (synthetic: 2048 fresh tokens; tiny FLUX: "
        "4 fresh samples through the quantized model, mean over layers); *held-out err*: the "
        "report's error on the held-out calibration tokens; *fit err*: on the tokens the layer "
        "was fitted on (all calibration tokens for the baselines). Seconds (wall) and CPU s: "
        f"medians of {result['repeats']} interleaved runs for baseline and default, one run "
        "otherwise; the time ratio is of CPU seconds (one torch thread).",
        "",
    ]
    lines += [_layer_block(e) for e in result["layers"]]
    lines += [_model_block(e) for e in result["model"]]
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgen_quant.bench.quantizer_quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="one small layer, short model run")
    parser.add_argument("--formats", default="int4,nvfp4", help="comma-separated formats")
    parser.add_argument("--parts", default="layers,model", help="layers, model or both")
    parser.add_argument(
        "--sizes", default=",".join(f"{k}x{n}" for k, n in SIZES),
        help="synthetic layers as KxN, comma-separated (default: the two FLUX sizes)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=",".join(MODEL_VARIANTS),
        help="comma-separated variants (baseline is always run: the ratios are against it); "
        "rank-alloc is run on the tiny FLUX only",
    )  # fmt: skip
    parser.add_argument(
        "--inputs", default="iid,correlated", help="synthetic inputs: iid, correlated or both"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of baseline and default")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    parts = {p for p in args.parts.split(",") if p}
    if bad := [f for f in formats if f not in ("int4", "nvfp4")]:
        parser.error(f"--formats: unknown format(s) {', '.join(bad)} (int4, nvfp4)")
    if bad := sorted(parts - {"layers", "model"}):
        parser.error(f"--parts: unknown part(s) {', '.join(bad)} (layers, model)")
    variants = {"baseline"} | {v for v in args.variants.split(",") if v}
    if bad := sorted(variants - set(VARIANTS)):
        parser.error(f"--variants: unknown variant(s) {', '.join(bad)} ({', '.join(VARIANTS)})")
    kinds = [k for k in args.inputs.split(",") if k]
    if not kinds or (bad := sorted(set(kinds) - {"iid", "correlated"})):
        parser.error(f"--inputs: expected iid and/or correlated, got {args.inputs!r}")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the small-calibration GPTQ warning, once per layer shape
    from .quantizer_speed import environment

    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes: expected KxN[,KxN...], got {args.sizes!r}")
    if args.quick:
        sizes = QUICK_SIZES
    from dcgen_quant.atomic import atomic_write_text

    command = " ".join(["python -m dcgen_quant.bench.quantizer_quality", *(argv or sys.argv[1:])])
    result: dict[str, Any] = {
        "benchmark": NAME,
        "command": command,
        "repeats": args.repeats,
        "layers": [],
        "model": [],
        "environment": environment(torch.device("cpu")),
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        atomic_write_text(args.out / f"{NAME}.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.out / f"{NAME}.md", markdown(result))

    def on_entry(entry: dict[str, Any]) -> None:
        # the tables so far are written after every entry: a run cut short keeps what it measured
        is_model = "model" in entry
        result["model" if is_model else "layers"].append(entry)
        write()
        print((_model_block if is_model else _layer_block)(entry), flush=True)

    if "layers" in parts:
        chosen = tuple(v for v in LAYER_VARIANTS if v in variants)
        layers_part(sizes, formats, args.repeats, on_entry, chosen, kinds)
    if "model" in parts:
        chosen = tuple(v for v in MODEL_VARIANTS if v in variants)
        model_part(formats, args.repeats, args.quick, on_entry, chosen)
    if hasattr(os, "getloadavg"):  # the machine's load at the end too (timings are wall time)
        result["environment"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    write()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
