"""GPU check of DC-Gen stage 3 at full width: step time and peak memory against the plan.

``python -m dcgen_quant.bench.gpu_adapt --out DIR [--dry-run] [--blocks D S] [--batch B]
[--steps N]``

A FLUX transformer at full width (hidden 3072, 24 heads, T5/CLIP-sized text inputs) with
``D`` double and ``S`` single blocks (default 2 + 4) and random bf16 weights is adapted to a
DC-AE-1.5 f64c128 latent at 4096 px (4096 image + 512 text tokens) and trains stage 3 with the
library's own :func:`~dcgen_quant.adapt.stages.finetune_lora` (LoRA rank 256 on every block
linear, embedder and head trained, guidance-distilled objective, AdamW, EMA, grad clip, bf16
autocast, float32 trainable state) for ``N`` steps, with activation checkpointing and without.
Recorded per run: the median step time after the first, ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved``, and the memory plan of the same model and shapes (what ``adapt``
prints and enforces), with the ratio plan / measured.

Writes ``DIR/gpu_adapt.md`` and ``DIR/gpu_adapt.json``. ``--dry-run``: the same code on a
tiny FLUX on the CPU (float32, 3 steps), the stand-in that ``bench/gpu_check.sh --dry-run`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dcgen_quant.adapt import memory_plan as MP

LATENT = (128, 64, 64)  # DC-AE-1.5 f64c128 at 4096 px: 4096 tokens at patch 1
TEXT = 512
_PLANS: dict = {}


def _model(blocks, device, dtype, dry):
    from diffusers import FluxTransformer2DModel

    from dcgen_quant.adapt.surgery import surgery
    from dcgen_quant.bench.configs import FLUX_CONFIG

    config = {**FLUX_CONFIG, "num_layers": blocks[0], "num_single_layers": blocks[1]}
    if dry:
        config.update(num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64)
    with torch.device("meta"):
        base = FluxTransformer2DModel(**config)
    base.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02, generator=g)
    base.to(dtype)
    latent = (16, 8, 8) if dry else LATENT
    model = surgery(base, latent[0], 1, head_init="default", inplace=True)
    return model.requires_grad_(False), latent


def _data(latent, config, rows, dry):
    from dcgen_quant.adapt.data import LatentSet
    from dcgen_quant.adapt.family import TextBatch

    g = torch.Generator().manual_seed(1)
    text_len = 16 if dry else TEXT
    table = TextBatch(
        torch.randn(2, text_len, config.joint_attention_dim, generator=g),
        torch.randn(2, config.pooled_projection_dim, generator=g),
    )
    return LatentSet(
        torch.zeros(rows, 1, 1, 1),  # base latents: stage 1 only
        torch.randn(rows, *latent, generator=g),
        torch.arange(rows) % 2,
        table,
        table.select(slice(1, 2)),
        [f"{i}" for i in range(rows)],
    )


def run_one(args, checkpoint: bool) -> dict:
    from dcgen_quant.adapt import train as T
    from dcgen_quant.adapt.flow import FlowObjective
    from dcgen_quant.adapt.stages import add_lora, finetune_lora
    from dcgen_quant.adapt.train import TrainConfig

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    rank = 8 if dry else 256
    model, latent = _model(args.blocks, device, dtype, dry)
    add_lora(model, rank, float(rank))
    data = _data(latent, model.config, 4 * args.batch, dry)
    # the plan of this very model and these shapes (it holds both checkpointing settings)
    key = (tuple(args.blocks), args.batch, dry)
    if key not in _PLANS:
        text = data.texts
        _PLANS[key] = MP.plan(
            MP.meta_stage_model(
                MP.meta_copy(model).to(dtype),  # same class and config, no weights
                "lora",
                new_channels=latent[0],
                patch=1,
                rank=rank,
                alpha=float(rank),
                dtype=str(dtype).removeprefix("torch."),
            ),
            "lora",
            batch=args.batch,
            latent=latent,
            text=(text.embeds.shape[1], text.embeds.shape[2]),
            pooled=text.pooled.shape[1],
            dtype=str(dtype).removeprefix("torch."),
            name="FLUX full width" if not dry else "FLUX tiny (dry run)",
        )
    plan = dataclasses.replace(_PLANS[key], grad_checkpoint=checkpoint)
    from dcgen_quant.adapt.runner import trainable_names

    names = set(trainable_names(model, "lora"))
    for n, p in model.named_parameters():
        if n in names:
            p.data = p.data.float()
    if checkpoint:
        model.enable_gradient_checkpointing()
    model.to(device)
    times: list[float] = []
    last = [time.perf_counter()]

    def hook(name, done):
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    T.STEP_HOOKS.append(hook)
    try:
        cfg = TrainConfig(
            steps=args.steps,
            lr=1e-4,
            batch_size=args.batch,
            grad_clip=0.1,
            ema=0.999,
            autocast=None if dry else "bfloat16",
        )
        last[0] = time.perf_counter()
        res = finetune_lora(
            model,
            data,
            cfg,
            objective=FlowObjective(guidance="distilled", text_drop=0.1),
            progress=False,
        )
    finally:
        T.STEP_HOOKS.remove(hook)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
    out = {
        "grad_checkpoint": checkpoint,
        "blocks": list(args.blocks),
        "batch": args.batch,
        "image_tokens": latent[1] * latent[2],
        "text_tokens": data.texts.embeds.shape[1],
        "steps": args.steps,
        "first_step_s": round(times[0], 3),
        "median_step_s": round(statistics.median(times[1:]), 3) if len(times) > 1 else None,
        "peak_allocated_gib": None if peak is None else round(peak / MP.GIB, 3),
        "peak_reserved_gib": None if reserved is None else round(reserved / MP.GIB, 3),
        "allocated_before_gib": round(base_alloc / MP.GIB, 3),
        "plan": plan.summary(),
        "plan_total_gib": round(plan.total() / MP.GIB, 3),
        "plan_over_measured": None if peak is None else round(plan.total() / peak, 3),
        "losses": [round(x, 5) for x in res.losses],
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    from dcgen_quant.atomic import atomic_write_text
    from dcgen_quant.tables import format_table

    ap = argparse.ArgumentParser(prog="python -m dcgen_quant.bench.gpu_adapt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny FLUX on the CPU")
    ap.add_argument(
        "--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), help="default 2 4 (dry 1 1)"
    )
    ap.add_argument("--batch", type=int, default=None, help="default 8 (dry run 2)")
    ap.add_argument("--steps", type=int, default=None, help="default 5 (dry run 2)")
    args = ap.parse_args(argv)
    from dcgen_quant.cli import _quiet_library_logs

    _quiet_library_logs()  # diffusers warns on every .to(dtype) of a model built here
    args.blocks = tuple(args.blocks or ((1, 1) if args.dry_run else (2, 4)))
    args.batch = args.batch or (2 if args.dry_run else 8)
    args.steps = args.steps or (2 if args.dry_run else 5)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    torch.set_num_threads(1 if args.dry_run else torch.get_num_threads())
    rows = []
    for ckpt in (True,) if args.dry_run else (True, False):
        try:
            rows.append(run_one(args, ckpt))
        except torch.cuda.OutOfMemoryError as exc:  # recorded, not fatal: the other run stands
            rows.append({"grad_checkpoint": ckpt, "error": f"out of memory: {exc}"[:200]})
        print(json.dumps(rows[-1]), flush=True)
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": args.dry_run,
    }
    cols = [
        ("grad_checkpoint", "ckpt", None),
        ("batch", "batch", None),
        ("median_step_s", "step s", ".3f"),
        ("peak_allocated_gib", "peak alloc GiB", ".2f"),
        ("peak_reserved_gib", "peak reserved GiB", ".2f"),
        ("plan_total_gib", "plan GiB", ".2f"),
        ("plan_over_measured", "plan/meas", ".3f"),
    ]
    table = format_table(
        rows,
        cols,
        title=f"stage 3, FLUX {args.blocks[0]}+{args.blocks[1]} blocks "
        f"{'(tiny, dry run on the CPU)' if args.dry_run else 'at full width, ' + env['gpu']}",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gpu_adapt.json", json.dumps({"env": env, "runs": rows}, indent=1))
    atomic_write_text(out / "gpu_adapt.md", f"# gpu_adapt ({env['date']})\n\n```\n{table}\n```\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
