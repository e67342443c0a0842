"""The post-training chain on local diffusers directories, resumable in an output directory.

Output directory layout (``OUT``)::

    adapt.json            the run: inputs (+ fingerprints), surgery, stages done, hyperparameters
    cache/                latents-*.pt, text-*.pt (see dcgen_quant.adapt.data)
    <stage>/ckpt.pt       the running stage's checkpoint (align, head, lora)
    <stage>/params.safetensors   a finished stage's trained parameters
    model/                the adapted (LoRA-merged) transformer after every finished stage: a
                          plain diffusers directory + dcgen_adapt.json

A stage that is done is never re-run; a stage that was interrupted continues from its checkpoint
with ``resume=True``. Stages run in the order align, head, lora; a stage may be skipped (e.g.
``lora`` alone on the unaligned surgery model) but never run before one that is already done.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_path, atomic_write_text
from . import family as fam
from . import memory_plan as MP

# re-exported: generate_cli and tests import the loaders from here
from .context import (  # noqa: F401
    AUTOENCODERS,
    PIPELINES,
    TRANSFORMERS,
    Context,
    Inputs,
    _class_of,
    load_autoencoder,
    load_base,
    text_encoder_for,
)
from .flow import FlowObjective
from .stages import add_lora, align, align_head, finetune_lora, merge
from .surgery import save_adapted, surgery
from .train import TrainConfig

STAGES = ("align", "head", "lora")
STATE_FILE = "adapt.json"


@dataclass
class ChainOptions:
    """Hyperparameters of a chain run; per-stage dicts are keyed by stage name."""

    stage: str = "all"
    steps: dict = field(default_factory=lambda: {"align": 20000, "head": 5000, "lora": 5000})
    lr: dict = field(default_factory=lambda: {"align": 1e-4, "head": 1e-4, "lora": 1e-4})
    batch_size: dict = field(default_factory=lambda: {"align": 64, "head": 8, "lora": 8})
    rank: int = 256
    alpha: float = 256.0
    ema: float | None = 0.999
    grad_clip: float = 0.1
    reconcile: str = "pool"
    patch_size: int = 1
    seed: int = 0
    ckpt_every: int = 100
    resume: bool = False
    progress: bool = True
    # the frozen transformer weights' dtype; "bfloat16" trains under autocast with float32
    # trainable parameters (TrainConfig.autocast). The device is the Context's. (float16 would
    # need loss scaling, which the loop does not do.)
    dtype: str = "float32"
    # activation checkpointing of every transformer block (stages 2 and 3)
    grad_checkpoint: bool = False
    # micro-batches per process and step (the global batch stays batch_size)
    grad_accum: int = 1
    # GiB per device that the memory plan must fit in; None: the CUDA device's own memory, no
    # limit on a CPU
    memory_limit_gib: float | None = None

    def __post_init__(self):
        if self.stage not in (*STAGES, "all"):
            raise ValueError(f"stage: got {self.stage!r}; expected one of {(*STAGES, 'all')}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: got {self.dtype!r}; expected float32 or bfloat16")

    def config(self, stage: str) -> TrainConfig:
        return TrainConfig(
            steps=int(self.steps[stage]),
            lr=float(self.lr[stage]),
            batch_size=int(self.batch_size[stage]),
            grad_clip=None if stage == "align" else self.grad_clip,
            ema=self.ema if stage == "lora" else None,
            ckpt_every=self.ckpt_every,
            seed=self.seed,
            autocast=None if self.dtype == "float32" else self.dtype,
            grad_accum=self.grad_accum,
        )


def _surgery(ctx: Context, opts_record: dict):
    sample = None
    if ctx.family == "sana":
        sample = ctx.inputs.resolution // ctx.new_downsample
    return surgery(
        ctx.base,
        ctx.new_channels,
        opts_record["patch_size"],
        sample_size=sample,
        seed=opts_record["seed"],
    )


def _save_params(path: Path, params: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp))


def _apply_params(model, path: Path) -> None:
    """Load a finished stage's trained parameters into ``model``, in their trained dtype
    (float32: trainable parameters are float32 next to 16-bit frozen ones)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = dict(model.named_parameters())
    missing = [k for k in saved if k not in own]
    if missing:
        raise ValueError(f"{path}: parameters {missing[:3]} do not exist in the model")
    with torch.no_grad():
        for k, v in saved.items():
            if own[k].shape != v.shape:
                raise ValueError(
                    f"{path}: {k} has shape {tuple(v.shape)}; the model's is {tuple(own[k].shape)}"
                )
            own[k].data = v.to(own[k].device)


def _write_state(out: Path, state: dict) -> None:
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def stage_sequence(state: dict) -> list[str]:
    return [s for s in STAGES if state["stages"].get(s, {}).get("done")]


def states(ctx: Context, out: str | Path, state: dict | None = None, device=None):
    """Yield (label, model) for the surgery model and after each finished stage, in order.

    One model is rebuilt (from ``ctx.base``, moved to ``device`` when given) and advanced in
    place (evaluate each before taking the next); the LoRA state is yielded merged.
    """
    out = Path(out)
    state = state or json.loads((out / STATE_FILE).read_text())
    model = _surgery(ctx, state["surgery"])
    if device is not None:
        model.to(device)
    yield "surgery", model
    for stage in stage_sequence(state):
        if stage == "lora":
            lora = state["lora"]
            add_lora(model, lora["rank"], lora["alpha"], targets=lora["targets"])
        _apply_params(model, out / stage / "params.safetensors")
        if stage == "lora":
            merge(model)
        yield stage, model


def trainable_names(model, stage: str) -> list[str]:
    """The parameters stage ``stage`` trains (embedder; embedder + head; + LoRA)."""
    names = [n for n, _ in model.named_parameters()]
    emb = fam.embedder_name(model) + "."
    if stage == "align":
        return [n for n in names if n.startswith(emb)]
    keep = [n for n in names if n.startswith((emb, "proj_out."))]
    if stage == "lora":
        keep += [n for n in names if ".lora_" in n]
    return keep


def stage_model(ctx: Context, out: Path, state: dict, stage: str, opts: ChainOptions):
    """The model stage ``stage`` starts from, on the CPU: the surgery model, the parameters of
    every earlier finished stage, LoRA adapters for stage 3; trainable parameters float32 with
    requires_grad, everything else frozen. Returns (model, trainable names)."""
    model = _surgery(ctx, state["surgery"])
    for done in stage_sequence(state):
        if STAGES.index(done) < STAGES.index(stage):
            _apply_params(model, out / done / "params.safetensors")
    if stage == "lora":
        lora = state.get("lora")
        if lora is not None:
            add_lora(model, lora["rank"], lora["alpha"], targets=lora["targets"])
        else:
            targets = add_lora(model, opts.rank, opts.alpha, seed=opts.seed)
            state["lora"] = {"rank": opts.rank, "alpha": opts.alpha, "targets": targets}
    for p in model.parameters():
        p.requires_grad_(False)
    names = trainable_names(model, stage)
    params = dict(model.named_parameters())
    for n in names:
        params[n].data = params[n].data.float()
        params[n].requires_grad_(True)
    return model, names


def _train_stage(ctx: Context, out: Path, state: dict, stage: str, opts: ChainOptions):
    """Train one stage on ``ctx.device`` (sharded over the processes); returns (result, the
    trained parameters as full CPU tensors, gathered on every rank)."""
    dist = ctx.dist
    model, names = stage_model(ctx, out, state, stage, opts)
    cfg = opts.config(stage)
    kw = {
        "ckpt_path": out / stage / "ckpt",
        "resume": opts.resume,
        "progress": opts.progress,
        "dist": dist,
    }
    teacher = None
    try:
        if stage == "align":
            # only the two embedders compute: the rest of both models stays on the CPU
            teacher = fam.embedder(ctx.base).to(ctx.device)
            fam.embedder(model).to(ctx.device)
            result = align(model, ctx.base, ctx.train, cfg, reconcile_mode=opts.reconcile, **kw)
        else:
            if opts.grad_checkpoint:
                model.enable_gradient_checkpointing()
            blocks = [b for _, b in fam.blocks(model)]
            model = dist.prepare(model, blocks, getattr(torch, opts.dtype))
            if stage == "head":
                result = align_head(model, ctx.train, cfg, **kw)
            else:
                objective = FlowObjective(
                    guidance="distilled" if fam.has_guidance(model) else "fixed", text_drop=0.1
                )
                result = finetune_lora(model, ctx.train, cfg, objective=objective, **kw)
        params = dict(model.named_parameters())
        trained = {n: dist.full(params[n]) for n in names}
    finally:
        if teacher is not None:
            teacher.to("cpu")
        del model
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return result, trained


def run_chain(ctx: Context, out: str | Path, opts: ChainOptions) -> dict:
    """Run the requested stages in ``out``; returns the run state (also in ``out/adapt.json``).

    With N processes every rank calls this; rank 0 writes every file except the checkpoints'
    shards.
    """
    out = Path(out)
    dist = ctx.dist
    surgery_record = {"patch_size": opts.patch_size, "seed": opts.seed, "reconcile": opts.reconcile}
    state_path = out / STATE_FILE
    if dist.all_ok(not state_path.exists()):
        state = {"version": 1, "run": ctx.record, "surgery": surgery_record, "stages": {}}
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            _write_state(out, state)
    else:
        if not opts.resume:
            raise ValueError(
                f"out: {out} already holds a run ({STATE_FILE}); pass --resume to continue it "
                "or choose another --out"
            )
        state = json.loads(state_path.read_text())
        for key in ("inputs", "family", "autoencoders", "text", "train_images"):
            if state["run"].get(key) != ctx.record.get(key):
                raise ValueError(f"out: {out} was run with different {key}; use another --out")
        if state["surgery"] != surgery_record:
            raise ValueError(
                f"out: {out} was run with surgery/alignment options {state['surgery']}; "
                f"now {surgery_record}"
            )
    done = stage_sequence(state)
    requested = list(STAGES) if opts.stage == "all" else [opts.stage]
    todo = [s for s in requested if s not in done]
    for s in todo:
        later = [d for d in done if STAGES.index(d) > STAGES.index(s)]
        if later:
            raise ValueError(
                f"stage: {s} would run after {later[0]}, which {out} already finished; use a new "
                "--out"
            )
    # every stage's memory plan is checked before any of them trains (on a GPU, or wherever a
    # limit is given: on a CPU without one it would only cost time)
    limit = MP.device_limit(ctx.device, opts.memory_limit_gib)
    plans = {s: MP.stage_plan(ctx, s, opts) for s in todo} if limit is not None else {}
    for plan in plans.values():
        if dist.main:
            MP.print_plan(plan)
        MP.check(plan, limit)
    for stage in todo:
        t0 = time.perf_counter()
        result, trained = _train_stage(ctx, out, state, stage, opts)
        cfg = opts.config(stage)
        state["stages"][stage] = {
            "done": True,
            "config": asdict(cfg),
            "processes": dist.world,
            "micro_batch": cfg.batch_size // dist.world // cfg.grad_accum,
            # wall time of this invocation's training of the stage (model build to gathered
            # parameters; bench/adapt_scaling.py compares it between process counts)
            "seconds": round(time.perf_counter() - t0, 3),
            "memory_plan": plans[stage].summary() if stage in plans else None,
            "resumed_from": result.resumed_from,
            "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None,
        }
        if dist.main:
            _save_params(out / stage / "params.safetensors", trained)
            _write_state(out, state)
            shutil.rmtree(out / stage / "ckpt", ignore_errors=True)
        dist.barrier()
        done.append(stage)
    sequence = stage_sequence(state)
    if state.get("model", {}).get("stages") != sequence or not (out / "model").is_dir():
        if dist.main:  # written once, by rank 0, from the finished stages' parameters
            *_, (_, model) = states(ctx, out, state, device=ctx.device)
            meta = {
                "family": ctx.family,
                "latent_channels": ctx.new_channels,
                "latent_patch_size": opts.patch_size,
                "packing": "outside the model, (C, py, px) per token"
                if ctx.family == "flux"
                else "model patch_embed",
                "autoencoder": str(Path(ctx.inputs.target_ae).resolve()),
                "stages": sequence,
                "reconcile": opts.reconcile,
            }
            save_adapted(model, out / "model", meta)
            del model
            state["model"] = {"stages": sequence}
            _write_state(out, state)
        dist.barrier()
        state["model"] = {"stages": sequence}
    return state


def _embed_head(model) -> dict:
    prefixes = (fam.embedder_name(model) + ".", "proj_out.")
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


GUIDANCE_EVAL = (1.0, 3.5, 7.0, 14.0)


def w_key(w: float) -> str:
    """The breakdown's key (and column header) of guidance scale ``w``: ``"w=3.5"``."""
    return f"w={w:g}"


def evaluate(
    ctx: Context,
    runs: list[tuple[str | Path, dict[str, str]]],
    reconcile_mode: str = "pool",
    sigma: float = 0.0,
) -> tuple[dict, dict, dict]:
    """Per-block feature MSE and held-out flow losses of the states of one or more runs.

    Parameters
    ----------
    runs : (output dir, {stage label: display name}); labels are ``surgery``, ``align``,
        ``head``, ``lora``; labels missing from the dict are not evaluated
    reconcile_mode, sigma : see :mod:`dcgen_quant.adapt.report`

    Returns
    -------
    mse : name -> {block: mse}
    flow : name -> {"flow": held-out loss at w = 1, "guided": the distilled objective averaged
        over w in GUIDANCE_EVAL (guidance-embedding models; else None)}
    breakdown : name -> {"w=1", "w=3.5", "w=7", "w=14": the held-out loss at each scale of
        GUIDANCE_EVAL alone (guidance-embedding models only; "w=1" is ``flow``'s, from the same
        pass), "empty": held-out loss at w = 1 with the empty caption,
        "train": loss at w = 1 on training images}

    ``flow`` and ``breakdown`` start with ``base``: the base model on the base latents of the
    same images. Held-out images: the first ``report_images``; training images: as many,
    evenly spaced over the training set (so every photograph of a sorted folder is represented).
    All losses use :func:`~dcgen_quant.adapt.flow.heldout_flow_loss`'s fixed sigmas and noise.
    """
    import contextlib

    n = min(len(ctx.held), ctx.inputs.report_images)
    held = torch.arange(n)
    n_train = min(len(ctx.train), ctx.inputs.report_images)
    train = torch.arange(n_train) * len(ctx.train) // n_train
    dev = ctx.device
    text = {"held": ctx.held.text(held).to(dev), "train": ctx.train.text(train).to(dev)}
    latents = {
        space: {
            "held": getattr(ctx.held, space)[held].to(dev),
            "train": getattr(ctx.train, space)[train].to(dev),
        }
        for space in ("base", "new")
    }
    amp = (
        torch.autocast(dev.type, dtype=getattr(torch, ctx.dtype))
        if ctx.dtype != "float32"
        else contextlib.nullcontext()
    )
    ctx.base.to(dev)  # the base lives on the CPU while stages train; the report runs it here
    try:
        with amp:
            empty = ctx.held.empty.to(dev)
            return _evaluate(ctx, runs, reconcile_mode, sigma, text, empty, latents)
    finally:
        ctx.base.to("cpu")


def _evaluate(ctx, runs, reconcile_mode, sigma, text, empty, latents):
    from .flow import heldout_flow_loss, heldout_flow_losses
    from .report import AlignmentProbe

    probe = AlignmentProbe(ctx.base, latents["base"]["held"], text["held"], reconcile_mode, sigma)

    def losses(model, z):
        """(flow entry, breakdown entry) of ``model`` on ``z``: {"held", "train"} latents."""
        held, p = z["held"], fam.latent_patch_size(model, z["held"].shape[1])
        guided = fam.has_guidance(model)
        # one pass over the held-out images gives w = 1, every other scale and the empty caption
        # (for guided models the guided objective's unconditional term)
        res = heldout_flow_losses(
            model, held, text["held"], p, empty=empty, guidance=GUIDANCE_EVAL if guided else (1.0,)
        )
        flow = {"flow": res["per_w"][1.0], "guided": res["mean"] if guided else None}
        detail = {w_key(w): loss for w, loss in res["per_w"].items()} if guided else {}
        detail["empty"] = res["empty"]
        detail["train"] = heldout_flow_loss(model, z["train"], text["train"], p)
        return flow, detail

    flow, breakdown = {}, {}
    flow["base"], breakdown["base"] = losses(ctx.base, latents["base"])
    mse = {}
    for out, names in runs:
        for label, model in states(ctx, out):
            if label not in names:
                continue
            name = names[label]
            mse[name] = probe.mse(model, latents["new"]["held"])
            flow[name], breakdown[name] = losses(model, latents["new"])
    return mse, flow, breakdown
