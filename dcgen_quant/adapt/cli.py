"""``python -m dcgen_quant adapt``: DC-Gen post-training of a FLUX / SANA transformer.

Real directories::

    python -m dcgen_quant adapt --base DIR --target-ae DIR --data DIR --stage all --out OUT

``--base`` is a diffusers FluxPipeline / SanaPipeline directory (transformer/, vae/ and, when
present, the text encoders are used) or a bare transformer directory (then ``--base-ae`` is
required and text embeddings use the deterministic fallback). The result, ``OUT/model``, is a
plain diffusers transformer directory. Interrupted runs continue with ``--resume``.

Demo on tiny models and scikit-image photographs (see dcgen_quant/adapt/demo.py)::

    python -m dcgen_quant adapt --demo [--family flux|sana] [--out DIR]

Many processes (one per GPU; the same options, the same optimization)::

    torchrun --nproc-per-node 8 -m dcgen_quant adapt ... --device cuda [--grad-checkpoint]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "DC-Gen post-training: move a FLUX/SANA transformer into a deeply compressed latent space"

# The demo's step counts and learning rates (the library defaults are REFERENCE.md's, sized for
# real models: 20k / 5k / 5k steps at lr 1e-4). Stages 1 and 2 train only the embedder and head
# and run 10x the paper's lr to converge in a few hundred steps; stage 3 keeps the paper's 1e-4:
# at 1e-3 its LoRA fits the 11 training photographs far better than the held-out ones
# (docs/ADAPT.md).
DEMO_STEPS = {"align": 400, "head": 300, "lora": 600}
DEMO_LR = {"align": 1e-3, "head": 1e-3, "lora": 1e-4}
DEMO_BATCH = {"align": 32, "head": 8, "lora": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--demo", action="store_true", help="run the whole chain on tiny models")
    io.add_argument("--family", choices=("flux", "sana"), default="flux", help="demo family")
    io.add_argument("--base", help="base pipeline or transformer directory (diffusers)")
    io.add_argument("--base-ae", help="base autoencoder directory (if --base is a transformer)")
    io.add_argument("--target-ae", help="the new (deeply compressed) autoencoder directory")
    io.add_argument("--data", help="folder of images (+ optional <name>.txt captions)")
    io.add_argument("--heldout", help="folder of held-out images (default: --holdout of --data)")
    io.add_argument("--holdout", type=int, help="images of --data held out (default 10%%)")
    io.add_argument("--out", help="output directory (demo default: ./adapt-demo)")
    io.add_argument("--stage", choices=("align", "head", "lora", "all"), default="all")
    io.add_argument("--resume", action="store_true", help="continue the run in --out")
    io.add_argument("--json", action="store_true", help="print the report as JSON")
    hp = parser.add_argument_group("hyperparameters")
    hp.add_argument("--steps", type=int, help="steps of every stage run (default per stage)")
    hp.add_argument("--lr", type=float, help="learning rate of every stage (default 1e-4)")
    hp.add_argument("--batch-size", type=int, help="batch size of every stage")
    hp.add_argument("--resolution", type=int, help="training resolution (default 1024; demo 64)")
    hp.add_argument("--rank", type=int, help="LoRA rank (default 256; demo 16)")
    hp.add_argument("--alpha", type=float, help="LoRA alpha (default = rank)")
    hp.add_argument("--ema", type=float, default=0.999, help="stage-3 EMA decay (0 = off)")
    hp.add_argument(
        "--reconcile",
        choices=("pool", "bilinear"),
        default="pool",
        help="token-grid reconciliation: pool the base grid down or upsample the new",
    )
    hp.add_argument("--patch-size", type=int, default=1, help="patch size on the new latent")
    hp.add_argument("--caption", default="a photo", help="caption of images without a .txt")
    hp.add_argument("--text-length", type=int, help="text tokens (default 64; demo 16)")
    hp.add_argument("--seed", type=int, default=0)
    hp.add_argument("--ckpt-every", type=int, default=100, help="checkpoint period in steps")
    hp.add_argument("--device", default="cpu", help="where the models train (e.g. cuda)")
    hp.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="frozen transformer weights; bfloat16 trains under autocast, trainable params float32",
    )
    hp.add_argument("--report-images", type=int, default=16, help="held-out images reported")
    hp.add_argument(
        "--no-report",
        action="store_true",
        help="skip the alignment report (it runs the base and every stage on held-out images)",
    )
    sc = parser.add_argument_group("scale (see docs/ADAPT.md, 'Full size')")
    sc.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="activation checkpointing of every transformer block (recompute in backward)",
    )
    sc.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per process and step; the step's batch stays --batch-size",
    )
    sc.add_argument(
        "--memory-limit",
        type=float,
        help="GiB per device the memory plan must fit (default: the CUDA device's memory)",
    )


def _options(args, demo: bool):
    from .runner import ChainOptions

    opts = ChainOptions(
        stage=args.stage,
        ema=args.ema or None,
        reconcile=args.reconcile,
        patch_size=args.patch_size,
        seed=args.seed,
        ckpt_every=args.ckpt_every,
        resume=args.resume,
        dtype=args.dtype,
        grad_checkpoint=args.grad_checkpoint,
        grad_accum=args.grad_accum,
        memory_limit_gib=args.memory_limit,
    )
    if demo:
        opts.steps, opts.lr, opts.batch_size = dict(DEMO_STEPS), dict(DEMO_LR), dict(DEMO_BATCH)
        opts.rank = 16
    for name, value in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size)):
        if value is not None:
            setattr(opts, name, dict.fromkeys(("align", "head", "lora"), value))
    if args.rank is not None:
        opts.rank = args.rank
    opts.alpha = float(args.alpha if args.alpha is not None else opts.rank)
    return opts


def _print_report(mse, flow, breakdown, args, extra: dict) -> None:
    from ..tables import emit, format_table
    from .report import block_table, breakdown_table

    gain = None
    if "surgery" in mse:
        after = next((k for k in mse if k in ("stage1", "align")), None)
        gain = ("surgery", after) if after else None
    rows, cols = block_table(mse, gain)
    flow_rows = [{"model": k, **v} for k, v in flow.items()]
    flow_cols = [("model", "model", None), ("flow", "held-out flow loss (w=1)", ".4f")]
    if any(r["guided"] is not None for r in flow_rows):
        flow_cols.append(("guided", "guided, w in {1, 3.5, 7, 14}", ".4f"))
    detail_rows, detail_cols = breakdown_table(breakdown)
    if args.json:
        extra = {**extra, "flow_loss": flow_rows, "flow_breakdown": detail_rows}
        emit(rows, cols, True, extra=extra)
        return
    emit(rows, cols, False, title="per-block feature MSE vs the base model (held-out images)")
    print()
    print(format_table(flow_rows, flow_cols))
    print()
    print(
        format_table(
            detail_rows,
            detail_cols,
            title="flow loss per guidance scale and caption; training images at w=1",
        )
    )
    for key, value in extra.items():
        if key in ("plot", "model", "report"):
            print(f"{key}: {value}")


def _report_json(mse, flow, breakdown, extra: dict) -> str:
    """``OUT/report.json``: the three tables keyed by state name, plus ``extra``."""
    doc = {"blocks": mse, "flow_loss": flow, "flow_breakdown": breakdown, **extra}
    return json.dumps(doc, indent=2, default=str) + "\n"


def run(args) -> int:
    from . import distributed

    if args.grad_accum < 1:
        raise ValueError(f"--grad-accum: got {args.grad_accum}; expected an int >= 1")
    if args.memory_limit is not None and not args.memory_limit > 0:
        raise ValueError(f"--memory-limit: got {args.memory_limit}; expected GiB > 0")
    if args.demo:
        for name in ("base", "base_ae", "target_ae", "data", "heldout"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')}: not used with --demo")
        if args.no_report:
            raise ValueError("--no-report: the demo exists for its report")
    else:
        for name in ("base", "target_ae", "data", "out"):
            if getattr(args, name) is None:
                raise ValueError(f"--{name.replace('_', '-')}: required (or use --demo)")
    # under torchrun: one process per device, torch.distributed initialized (gloo on CPUs)
    dist = distributed.init(args.device)
    try:
        return _run_demo(args, dist) if args.demo else _run_dirs(args, dist)
    finally:
        dist.shutdown()


def _run_dirs(args, dist) -> int:
    from ..atomic import atomic_write_text
    from .report import save_plot
    from .runner import Context, Inputs, evaluate, run_chain

    out = Path(args.out)
    inputs = Inputs(
        base=args.base,
        target_ae=args.target_ae,
        data=args.data,
        base_ae=args.base_ae,
        heldout=args.heldout,
        resolution=args.resolution or 1024,
        holdout=args.holdout,
        caption=args.caption,
        text_length=args.text_length or 64,
        report_images=args.report_images,
    )
    opts = _options(args, demo=False)
    ctx = Context(inputs, out / "cache", device=args.device, dtype=args.dtype, dist=dist)
    state = run_chain(ctx, out, opts)
    if not dist.main:  # the report and its files are rank 0's
        return 0
    if args.no_report:
        doc = {"out": str(out), "model": str(out / "model"), "stages": state["stages"]}
        print(json.dumps(doc, indent=2, default=str) if args.json else f"model: {doc['model']}")
        return 0
    names = {s: s for s in ("surgery", "align", "head", "lora")}
    mse, flow, breakdown = evaluate(ctx, [(out, names)], opts.reconcile)
    plot = save_plot(out / "report.png", mse, flow, f"DC-Gen adapt ({ctx.family})")
    extra = {
        "out": str(out),
        "model": str(out / "model"),
        "plot": str(plot),
        "stages": state["stages"],
        "report": str(out / "report.json"),
    }
    atomic_write_text(
        out / "report.json",
        _report_json(mse, flow, breakdown, extra),
    )
    _print_report(mse, flow, breakdown, args, extra)
    return 0


def _run_demo(args, dist) -> int:
    import torch

    from ..atomic import atomic_write_text
    from .demo import DemoConfig, build_inputs
    from .report import save_plot
    from .runner import Context, Inputs, evaluate, run_chain

    # Tiny models gain nothing from threads, and a fixed thread count makes the float reduction
    # order, hence every number of the demo, reproducible on a given machine.
    torch.set_num_threads(1)
    out = Path(args.out or "adapt-demo")
    if not dist.all_ok(not (out / "inputs.json").exists() or args.resume):
        raise ValueError(f"out: {out} already holds a demo run; pass --resume or another --out")
    cfg = DemoConfig(
        family=args.family,
        resolution=args.resolution or 64,
        seed=args.seed,
        text_length=args.text_length or 16,
    )
    if dist.main:  # rank 0 builds the demo's inputs; the others read what it wrote
        info = build_inputs(out / "inputs", cfg)
        atomic_write_text(out / "inputs.json", json.dumps(info, indent=2) + "\n")
    dist.barrier()
    if not dist.main:
        info = build_inputs(out / "inputs", cfg)
    inputs = Inputs(
        base=info["base"],
        target_ae=info["target_ae"],
        data=info["data"],
        base_ae=info["base_ae"],
        heldout=info["heldout"],
        resolution=cfg.resolution,
        caption=args.caption,
        text_length=cfg.text_length,
        report_images=args.report_images,
    )
    ctx = Context(inputs, out / "cache", device=args.device, dtype=args.dtype, dist=dist)
    opts = _options(args, demo=True)
    opts.stage, opts.resume = "all", True  # a demo run always continues what it finds
    aligned = run_chain(ctx, out / "aligned", opts)
    opts.stage = "lora"
    unaligned = run_chain(ctx, out / "unaligned", opts)
    if not dist.main:
        return 0
    runs = [
        (
            out / "aligned",
            {"surgery": "surgery", "align": "stage1", "head": "stage2", "lora": "stage3"},
        ),
        (out / "unaligned", {"lora": "lora-only"}),
    ]
    mse, flow, breakdown = evaluate(ctx, runs, opts.reconcile)
    plot = save_plot(out / "report.png", mse, flow, f"DC-Gen demo, tiny {ctx.family}")
    extra = {
        "out": str(out),
        "model": str(out / "aligned" / "model"),
        "plot": str(plot),
        "report": str(out / "report.json"),
        "ae_psnr_db": info["ae_psnr_db"],
        "stages": aligned["stages"],
        "lora_only_stages": unaligned["stages"],
    }
    atomic_write_text(
        out / "report.json",
        _report_json(mse, flow, breakdown, extra),
    )
    _print_report(mse, flow, breakdown, args, extra)
    return 0
