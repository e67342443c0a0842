"""``python -m dcgen_quant bench table``: the DC-Gen latency reproduction table.

Predicted (default): the latency model (docs/BENCHMARKS.md) for ``--gpu``, next to the paper's
published numbers, with a per-component breakdown. ``--measured``: time the models with random
weights on this machine's GPU and write ``--out/<gpu>-<date>.{md,json,png}``. ``--json``: one
record per row (``resolution, base_s, dcgen_s, speedup, published_speedup, ...``).
"""

from __future__ import annotations

import argparse

HELP = "benchmarks: the DC-Gen latency tables, predicted by the latency model or measured on a GPU"

_GPUS = ("h100", "h200", "rtx5090", "b200")
_AES = ("dc-ae-f32c32", "dc-ae-1.5-f64c128")

_COLUMNS = [
    ("resolution", "res", None),
    ("precision", "precision", None),
    ("base_s", "base s", ".2f"),
    ("published_base_s", "paper", ".2f"),
    ("dcgen_s", "DC-Gen s", ".2f"),
    ("published_dcgen_s", "paper", ".2f"),
    ("speedup", "speedup", ".1f"),
    ("published_speedup", "paper", ".1f"),
    ("speedup_rel_error", "diff", "+.0%"),
    ("dcgen_autoencoder", "DC-Gen AE", None),
]
_BREAKDOWN = [
    ("resolution", "res", None),
    ("model", "model", None),
    ("steps", "steps", None),
    ("tokens", "tokens", None),
    ("step_tflop", "TFLOP/step", ".1f"),
    ("step_ms", "ms/step", ".1f"),
    ("attention", "attention s", ".2f"),
    ("linear", "linear s", ".2f"),
    ("other", "other s", ".2f"),
    ("vae", "VAE s", ".2f"),
    ("total", "total s", ".2f"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    t = sub.add_parser(
        "table",
        help="base vs DC-Gen whole-image latency at 1K/2K/4K, next to the paper's numbers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--gpu",
        choices=_GPUS,
        default=None,
        help="GPU to predict for (default h100; with --measured: the GPU present)",
    )
    t.add_argument(
        "--w4a4",
        action="store_true",
        help="DC-Gen in W4A4 (INT4 via INT8 on Hopper, NVFP4 on Blackwell); speedup "
        "= base bf16 / DC-Gen W4A4, the paper's 'total latency reduction'",
    )
    t.add_argument(
        "--measured",
        action="store_true",
        help="time the models on this machine's GPU (random weights) and write results",
    )
    t.add_argument("--json", action="store_true", help="print JSON records instead of tables")
    t.add_argument(
        "--family",
        choices=("flux", "sana"),
        default="flux",
        help="model family (the paper's tables are FLUX; SANA has no published row)",
    )
    t.add_argument(
        "--base-steps",
        type=int,
        default=None,
        help="steps of the base runs (not stated by the paper; default FLUX 28)",
    )
    t.add_argument("--dcgen-steps", type=int, default=None, help="DC-Gen steps (default 20)")
    t.add_argument(
        "--ae-1k",
        choices=_AES,
        default=None,
        help="DC-Gen-FLUX autoencoder at 1K (default dc-ae-f32c32, the 1K model)",
    )
    t.add_argument(
        "--attn-eff",
        type=float,
        default=None,
        help="override the GPU's attention-kernel efficiency (fraction of peak)",
    )
    t.add_argument(
        "--sensitivity",
        action="store_true",
        help="also show the speedups over a grid of the open assumptions",
    )
    t.add_argument(
        "--out",
        default="bench/results",
        help="--measured: folder for <gpu>-<date>.{md,json,png} (default bench/results)",
    )
    t.add_argument(
        "--budget-s",
        type=float,
        default=300.0,
        help="--measured: seconds after which remaining rows are skipped (default 300)",
    )
    t.add_argument("--tiny", action="store_true",
                   help="--measured: tiny models on the CPU (exercises the path; timings mean "
                        "nothing)")  # fmt: skip


def _assumptions(args):
    from .reproduce import Assumptions

    aes = {1024: args.ae_1k} if args.ae_1k else {}
    return Assumptions(args.family, args.base_steps, args.dcgen_steps, aes)


def _breakdown_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        for which in ("base", "dcgen"):
            b = r[f"{which}_breakdown"]
            out.append({
                "resolution": r["resolution"],
                "model": r[f"{which}_model"] + ("" if which == "base" else f" ({r['precision']})"),
                "steps": r[f"{which}_steps"],
                "tokens": r[f"{which}_tokens"],
                "step_tflop": r[f"{which}_step_tflop"],
                "step_ms": r[f"{which}_step_s"] * 1e3,
                **b,
                "total": r[f"{which}_s"],
            })  # fmt: skip
    return out


def _run_predicted(args) -> int:
    from dcgen_quant.tables import emit, format_table

    from .hardware import get_gpu
    from .reproduce import predicted_rows, sensitivity

    gpu = get_gpu(args.gpu or "h100", attn_eff=args.attn_eff)
    a = _assumptions(args)
    rows = predicted_rows(gpu, args.w4a4, a)
    extra = {
        "mode": "predicted",
        "gpu": gpu.name,
        "gpu_label": gpu.label,
        "ceilings": gpu.ceilings(),
        "parameters": gpu.params(),
        "assumptions": a.to_dict(),
    }
    sens = sensitivity(gpu, args.w4a4) if args.sensitivity and args.family == "flux" else None
    if args.json:
        if sens is not None:
            extra["sensitivity"] = sens
        emit(rows, _COLUMNS, True, extra=extra)
        return 0
    params = ", ".join(f"{k} {v:g}" for k, v in gpu.params().items())
    title = (
        f"Predicted whole-image latency, {gpu.label} ({params}); base {a.resolved().base_steps} "
        f"steps, DC-Gen {a.resolved().dcgen_steps} steps"
    )
    emit(rows, _COLUMNS, False, title=title)
    print()
    title = "Breakdown (other = memory-bound ops + host waits + text encoding)"
    print(format_table(_breakdown_rows(rows), _BREAKDOWN, title))
    print()
    for r in rows:
        print(f"{r['resolution']}: {r['explanation']}")
    if sens is not None:
        cols = [("attn_eff", "attn_eff", ".2f"), ("base_steps", "base steps", None),
                ("dcgen_ae_1k", "DC-Gen AE at 1K", None)]  # fmt: skip
        cols += [(f"speedup_{k}k", f"{k}K", ".1f") for k in (1, 2, 4)]
        print()
        print(format_table(sens, cols, "Sensitivity of the speedups to the open assumptions"))
    return 0


def _run_measured(args) -> int:
    import torch

    from dcgen_quant import capabilities

    from . import measured, report

    if args.family != "flux":
        raise ValueError(f"--measured times the FLUX table only, got --family {args.family}")
    if args.tiny:
        device = "cpu"
    else:
        reason = capabilities.cuda_unavailable()
        if reason:
            raise RuntimeError(f"--measured needs a CUDA GPU: {reason} (use --tiny to dry-run)")
        device = "cuda"
        if args.gpu:
            from .hardware import gpu_from_device_name

            present = gpu_from_device_name(torch.cuda.get_device_name())
            if present != args.gpu:
                raise ValueError(
                    f"--gpu {args.gpu} but this machine has {torch.cuda.get_device_name()!r}"
                )
    from pathlib import Path

    from dcgen_quant.atomic import check_writable

    if args.budget_s is not None and not args.budget_s > 0:
        raise ValueError(f"--budget-s: got {args.budget_s}; expected seconds > 0")
    checkpoint = Path(args.out) / "partial-measurement.json"
    check_writable(checkpoint)  # before the measurements, not after them
    result = measured.measure(
        device, tiny=args.tiny, budget_s=args.budget_s, w4a4=True if args.w4a4 else None,
        progress=not args.json, checkpoint=checkpoint,
    )  # fmt: skip
    rows, runs, paths = report.write_results(result, args.out, _assumptions(args))
    checkpoint.unlink(missing_ok=True)
    if args.json:
        from dcgen_quant.tables import emit

        emit(rows, report._MAIN_COLS, True, extra={
            "mode": "measured", "env": result["env"], "ceilings": result["ceilings"],
            "per_run": runs, "skipped": result["skipped"],
            "files": {k: str(v) for k, v in paths.items()},
        })  # fmt: skip
        return 0
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run(args) -> int:
    if args.bench_command != "table":
        raise ValueError(f"unknown bench subcommand {args.bench_command!r}; expected table")
    for name in ("base_steps", "dcgen_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}={v} must be >= 1")
    return _run_measured(args) if args.measured else _run_predicted(args)
