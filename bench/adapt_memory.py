"""DC-Gen post-training memory at full size: the plan, checked against a measured step.

``python -m dcgen_quant.bench.adapt_memory [--out DIR] [--quick] [--json] [--no-measure]``

1. The plan (:mod:`dcgen_quant.adapt.memory_plan`, the one ``adapt`` prints and enforces) for
   FLUX.1-dev and SANA-1.6B at DC-Gen's settings (REFERENCE.md: LoRA rank 256, EMA; the library's
   batches: 64 in stage 1, 8 in stages 2 and 3; bf16 frozen weights, float32 trainable state),
   per stage, on 1 and on 8 GPUs, without and with activation checkpointing, and whether each
   fits an 80 GB GPU (less the plan's headroom). Settings: DC-Gen-FLUX 4K (DC-AE-1.5 f64c128 at
   4096 px: 4096 image tokens + 512 text tokens, the base reading the FLUX VAE f8c16 in 2x2
   patches for stage 1), DC-Gen-FLUX 1K (DC-AE f32c32 at 1024 px: 1024 + 512 tokens) and
   DC-Gen-SANA 4K (f64c128 at 4096 px: 4096 + 300 Gemma tokens; base DC-AE f32c32).
2. The check: a FLUX transformer at full width (hidden 3072, 24 heads, the real embedders) with
   few blocks and random weights trains stage-3 steps on this CPU (bf16 weights under CPU
   autocast, LoRA rank 256, AdamW, EMA), without and with checkpointing. Its second step (the
   optimizer state exists, as in the plan's steady state) is measured two ways: every tensor
   alive (the same dispatcher-level count the plan simulates on the meta device; here real
   tensors of a real step) and the process's peak resident memory (VmHWM, reset before the
   step). The plan of the same model and shapes is computed with CPU autocast's rules, so the
   two differ only by what the simulation misses.

Writes ``DIR/adapt_memory-<device>-<date>.md`` and ``.json`` (default DIR: bench/results) and
prints the tables. ``--quick``: the check on a narrower model (CI smoke test; no plan rows).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dcgen_quant.adapt import family as fam
from dcgen_quant.adapt import memory_plan as MP

NAME = "adapt_memory"
GPU_GIB = 80.0
STAGE_BATCH = {"align": 64, "head": 8, "lora": 8}
# (label, base transformer, base AE, new AE, resolution)
SETTINGS = [
    ("DC-Gen-FLUX 4K", "flux", "flux-vae", "dc-ae-1.5-f64c128", 4096),
    ("DC-Gen-FLUX 1K", "flux", "flux-vae", "dc-ae-f32c32", 1024),
    ("DC-Gen-SANA 4K", "sana-1.6b", "dc-ae-f32c32", "dc-ae-1.5-f64c128", 4096),
]
# the measured model: full-width FLUX, few blocks; batch 1 at 256 image + 128 text tokens
CHECK = {"num_layers": 1, "num_single_layers": 2, "latent": (128, 16, 16), "text": 128}
QUICK = {"num_layers": 1, "num_single_layers": 2, "latent": (32, 8, 8), "text": 16}
QUICK_WIDTH = {"num_attention_heads": 4, "joint_attention_dim": 512}


def _plan_rows(setting, processes: int) -> list[dict[str, Any]]:
    from dcgen_quant.bench.configs import AUTOENCODERS, TRANSFORMERS

    label, tname, base_ae, new_ae, res = setting
    spec = TRANSFORMERS[tname]
    b_ae, n_ae = AUTOENCODERS[base_ae], AUTOENCODERS[new_ae]
    import diffusers

    cls = getattr(diffusers, spec.cls_name)
    with torch.device("meta"):
        base = cls(**spec.config).to(torch.bfloat16)
    side = res // n_ae.factor
    build = {
        "new_channels": n_ae.channels,
        "patch": 1,
        "rank": 256,
        "alpha": 256.0,
        "dtype": "bfloat16",
        "sample_size": side if spec.family == "sana" else None,
    }
    pooled = spec.config.get("pooled_projection_dim") if spec.family == "flux" else None
    bside = res // b_ae.factor
    rows = []
    for stage, batch in STAGE_BATCH.items():
        model = MP.meta_stage_model(base, stage, **build)

        def shallow(overrides, stage=stage):
            return MP.meta_stage_model(MP.meta_copy(base, **overrides), stage, **build)

        p = MP.plan(
            model,
            stage,
            batch=batch,
            latent=(n_ae.channels, side, side),
            text=(spec.text_tokens, spec.text_dim),
            processes=processes,
            pooled=pooled,
            mask=spec.family == "sana",
            teacher=(base, (b_ae.channels, bside, bside), spec.patch),
            name=label,
            shallow=shallow,
        )
        s = p.summary()
        s["state"] = round(s["trainable"] + s["grads"] + s["optimizer"] + s["ema"], 3)
        limit = GPU_GIB - MP.HEADROOM_GIB
        s["fits"] = "yes" if s["total_plain"] <= limit else "no"
        s["fits_ckpt"] = "yes" if s["total_ckpt"] <= limit else "no"
        rows.append(s)
    return rows


PLAN_COLUMNS = [
    ("model", "setting", None),
    ("stage", "stage", None),
    ("batch", "batch", None),
    ("processes", "GPUs", None),
    ("micro_batch", "per GPU", None),
    ("image_tokens", "img tok", None),
    ("text_tokens", "txt tok", None),
    ("weights", "weights", ".1f"),
    ("gather", "gather", ".1f"),
    ("state", "train state", ".1f"),
    ("activations_plain", "act", ".1f"),
    ("activations_ckpt", "act ckpt", ".1f"),
    ("total_plain", "total", ".1f"),
    ("total_ckpt", "total ckpt", ".1f"),
    ("fits", "fits 80GB", None),
    ("fits_ckpt", "fits ckpt", None),
]


# ---------------------------------------------------------------- the measured step


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _check_model(cfg: dict, quick: bool, dtype: torch.dtype = torch.float32):
    from diffusers import FluxTransformer2DModel

    from dcgen_quant.adapt.runner import trainable_names
    from dcgen_quant.adapt.stages import add_lora
    from dcgen_quant.adapt.surgery import surgery
    from dcgen_quant.bench.configs import FLUX_CONFIG

    config = {**FLUX_CONFIG, "num_layers": cfg["num_layers"]}
    config["num_single_layers"] = cfg["num_single_layers"]
    if quick:
        config.update(QUICK_WIDTH)
    with torch.device("meta"):
        base = FluxTransformer2DModel(**config)
    base.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    base.to(dtype)
    model = surgery(base, cfg["latent"][0], 1, head_init="default", inplace=True)
    rank = 16 if quick else 256
    add_lora(model, rank, float(rank))
    names = set(trainable_names(model, "lora"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
            if n in names:
                p.data = p.data.float()
                if ".lora_B" in n:  # B = 0 would leave A without gradient
                    p.normal_(0.0, 0.01, generator=g)
    return model, base.config


def measure(cfg: dict, checkpoint: bool, quick: bool = False, dtype=torch.float32) -> dict:
    """Two stage-3 training steps of the check model on the CPU; the second one measured."""
    from dcgen_quant.adapt.flow import FlowObjective, flow_loss

    model, config = _check_model(cfg, quick, dtype)
    if checkpoint:
        model.enable_gradient_checkpointing()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95))
    ema = [p.detach().clone() for p in trainable]
    g = torch.Generator().manual_seed(1)
    z = torch.randn((1, *cfg["latent"]), generator=g)
    text = fam.TextBatch(
        torch.randn(1, cfg["text"], config.joint_attention_dim, generator=g),
        torch.randn(1, config.pooled_projection_dim, generator=g),
    )
    empty = text.select(slice(0, 1))
    obj = FlowObjective(guidance="distilled", text_drop=0.1)

    def step(tracker=None):
        ctx = tracker if tracker is not None else contextlib.nullcontext()
        with ctx:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = flow_loss(model, z, text, empty, g, obj, 1)
            loss.backward()
            del loss
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema, trainable):
                    e.lerp_(p, 0.001)
            opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # creates the optimizer state
    first = time.perf_counter() - t0
    tracker = MP.LiveBytes("cpu")
    tracker.external([*model.parameters(), *model.buffers(), z, text.embeds, text.pooled, *ema])
    for st in opt.state.values():
        tracker.external([v for v in st.values() if isinstance(v, torch.Tensor)])
    tracker.watch_grads(trainable)
    rss0 = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    step(tracker)
    second = time.perf_counter() - t0
    hwm = _rss_kib("VmHWM")
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    train_b = sum(p.numel() * p.element_size() for p in trainable)
    opt_b = sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )
    static = frozen + train_b + train_b + opt_b  # weights, trainable, EMA, AdamW moments
    return {
        "grad_checkpoint": checkpoint,
        "weights": frozen,
        "trainable": train_b,
        "optimizer_state": opt_b,
        "ema": train_b,
        "step_peak_live": tracker.peak,
        "activations_live": tracker.peak_less_grads,
        "total_live": static + tracker.peak,
        "rss_step_increase": (hwm - rss0) * 1024 if reset else None,
        "rss_peak": hwm * 1024,
        "seconds_first_step": round(first, 2),
        "seconds_second_step": round(second, 2),
    }


def check_plan(cfg: dict, quick: bool = False, dtype=torch.float32) -> list[dict[str, Any]]:
    """Measured (CPU) vs planned (CPU autocast rules) for the check model."""
    model, config = _check_model(cfg, quick, dtype)
    meta = model.to("meta")
    p = MP.plan(
        meta,
        "lora",
        batch=1,
        latent=cfg["latent"],
        text=(cfg["text"], config.joint_attention_dim),
        pooled=config.pooled_projection_dim,
        dtype=str(dtype).removeprefix("torch."),
        policy="cpu",
        name="FLUX full width" if not quick else "FLUX narrow",
    )
    del model, meta
    rows = []
    for ckpt in (False, True):
        m = measure(cfg, ckpt, quick, dtype)
        plan_act = p.activations_ckpt if ckpt else p.activations_plain
        # the plan's optimizer term holds the two moments and one foreach temporary
        plan_total = p.total(ckpt)
        rows.append(
            {
                "checkpointing": "on" if ckpt else "off",
                "plan_act": plan_act / MP.GIB,
                "live_act": m["activations_live"] / MP.GIB,
                "plan_total": plan_total / MP.GIB,
                "live_total": m["total_live"] / MP.GIB,
                "rss_step": (m["rss_step_increase"] or 0) / MP.GIB,
                "live_step": m["step_peak_live"] / MP.GIB,
                "ratio_act": plan_act / m["activations_live"],
                "ratio_total": plan_total / m["total_live"],
                "seconds": m["seconds_second_step"],
                "measured": m,
            }
        )
    return rows


CHECK_COLUMNS = [
    ("checkpointing", "ckpt", None),
    ("plan_act", "plan act", ".3f"),
    ("live_act", "measured act", ".3f"),
    ("ratio_act", "plan/meas", ".3f"),
    ("plan_total", "plan total", ".3f"),
    ("live_total", "measured total", ".3f"),
    ("ratio_total", "plan/meas", ".3f"),
    ("live_step", "step live peak", ".3f"),
    ("rss_step", "step RSS rise", ".3f"),
    ("seconds", "step s", ".1f"),
]


LEGEND = """\
- Plan rows: GiB per GPU. `weights`: frozen weights (bf16; blocks sharded over the GPUs);
  `gather`: FSDP's unsharded copies of two blocks plus one block's float32 gradients;
  `train state`: trainable parameters, gradients, AdamW (two moments and one foreach
  temporary) and EMA, float32; `act` / `act ckpt`: activation peak without / with activation
  checkpointing (the stage's step simulated on the meta device, CUDA autocast rules); `fits`:
  total <= 80 GiB less the plan's 4 GiB headroom. Per GPU = the global batch / GPUs.
- Check rows: the plan (CPU autocast rules) of the measured model against its second training
  step on this CPU. `measured act`: the peak of the live tensors the step creates (the tracker
  the plan simulates with, here on real tensors), less the gradients; `measured total`: that
  peak plus weights, trainable parameters, EMA and AdamW moments. `step RSS rise`: VmHWM after
  the step less VmRSS before it; lower than the live peak because memory that the first step
  freed stays in the process and the second step reuses it.
"""


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    from dcgen_quant.tables import format_table

    ap = argparse.ArgumentParser(prog="python -m dcgen_quant.bench.adapt_memory")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="narrow check model, no plan rows")
    ap.add_argument("--no-measure", action="store_true", help="plan rows only")
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="frozen weights of the measured model (bf16 GEMMs are very slow on CPUs without "
        "AVX512-BF16 / AMX; the plan rows are bf16 either way)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from dcgen_quant.cli import _quiet_library_logs

    _quiet_library_logs()  # diffusers warns on every .to(dtype) of a model built here
    env = environment()
    plan_rows: list[dict] = []
    if not args.quick:
        for setting in SETTINGS:
            for n in (1, 8):
                plan_rows += _plan_rows(setting, n)
    dtype = getattr(torch, args.dtype)
    cfg = QUICK if args.quick else CHECK
    check_rows = [] if args.no_measure else check_plan(cfg, args.quick, dtype)
    doc = {
        "environment": env,
        "gpu_gib": GPU_GIB,
        "headroom_gib": MP.HEADROOM_GIB,
        "check_model": {**cfg, "quick": args.quick, "dtype": args.dtype},
        "plan": plan_rows,
        "check": check_rows,
    }
    title = "memory plan per GPU (GiB), bf16 weights, LoRA r256, AdamW + EMA in float32"
    text = format_table(plan_rows, PLAN_COLUMNS, title=title) if plan_rows else ""
    if check_rows:
        cfg = doc["check_model"]
        check_title = (
            f"check on this CPU: FLUX {'narrow' if args.quick else 'full width'}, "
            f"{cfg['num_layers']} double + {cfg['num_single_layers']} single blocks, random "
            f"{args.dtype} weights, stage 3 batch 1, {cfg['latent'][1] * cfg['latent'][2]} image "
            f"+ {cfg['text']} text tokens (GiB)"
        )
        text += ("\n\n" if text else "") + format_table(check_rows, CHECK_COLUMNS, check_title)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{NAME}-cpu-{env['date'][:10]}"
    from dcgen_quant.atomic import atomic_write_text

    atomic_write_text(stem.with_suffix(".json"), json.dumps(doc, indent=1, default=str) + "\n")
    md = (
        f"# DC-Gen post-training memory ({env['date']})\n\n"
        f"`python -m dcgen_quant.bench.adapt_memory{' --quick' if args.quick else ''}` on "
        f"{env['cpu']} ({env['cpu_count']} cores, load average {env['load_average']}), torch "
        f"{env['torch']}.\n\n```\n{text}\n```\n\n{LEGEND}"
    )
    atomic_write_text(stem.with_suffix(".md"), md)
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(text)
        print(f"\nwrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
