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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_path, atomic_write_text
from . import data as D
from . import family as fam
from .flow import FlowObjective
from .stages import add_lora, align, align_head, finetune_lora, merge
from .surgery import save_adapted, surgery
from .train import TrainConfig

STAGES = ("align", "head", "lora")
STATE_FILE = "adapt.json"
TRANSFORMERS = ("FluxTransformer2DModel", "SanaTransformer2DModel")
AUTOENCODERS = ("AutoencoderKL", "AutoencoderDC")
PIPELINES = {"FluxPipeline": "flux", "SanaPipeline": "sana"}


def _class_of(path: Path, what: str) -> tuple[str, str]:
    """("pipeline" | "model", class name) of a diffusers directory."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what}: {path} is not a directory")
    for kind, name in (("pipeline", "model_index.json"), ("model", "config.json")):
        f = path / name
        if f.is_file():
            cls = json.loads(f.read_text()).get("_class_name")
            return kind, str(cls)
    raise ValueError(
        f"{what}: {path} is neither a diffusers pipeline (model_index.json) nor a diffusers "
        "model (config.json)"
    )


def load_autoencoder(path: str | Path, what: str):
    import diffusers

    path = Path(path)
    kind, cls = _class_of(path, what)
    if kind != "model" or cls not in AUTOENCODERS:
        raise ValueError(f"{what}: {path} holds a {cls}; expected one of {AUTOENCODERS}")
    return getattr(diffusers, cls).from_pretrained(path, local_files_only=True).eval()


def load_base(path: str | Path):
    """(transformer, vae dir or None, pipeline class or None) from a pipeline or model dir."""
    import diffusers

    path = Path(path)
    kind, cls = _class_of(path, "base")
    if kind == "pipeline":
        if cls not in PIPELINES:
            raise ValueError(f"base: {path} is a {cls}; expected one of {tuple(PIPELINES)}")
        sub = path / "transformer"
        _, tcls = _class_of(sub, "base transformer")
        if tcls not in TRANSFORMERS:
            raise ValueError(f"base: {sub} holds a {tcls}; expected one of {TRANSFORMERS}")
        model = getattr(diffusers, tcls).from_pretrained(sub, local_files_only=True)
        vae = path / "vae"
        return model.eval(), (vae if vae.is_dir() else None), cls
    if cls not in TRANSFORMERS:
        raise ValueError(
            f"base: {path} holds a {cls}; expected one of {TRANSFORMERS} or a pipeline"
        )
    return getattr(diffusers, cls).from_pretrained(path, local_files_only=True).eval(), None, None


def text_encoder_for(base_dir: Path, pipeline_cls, model, length: int):
    """The pipeline's text encoders if ``base_dir`` has them, else :class:`data.HashedText`."""
    if pipeline_cls is not None and (base_dir / "text_encoder").is_dir():
        import diffusers

        pipe = getattr(diffusers, pipeline_cls).from_pretrained(
            base_dir, transformer=None, vae=None, local_files_only=True
        )
        return D.PipelineText(pipe, length, D.dir_fingerprint(base_dir / "text_encoder"))
    cfg = model.config
    if fam.family_of(model) == "flux":
        return D.HashedText(cfg.joint_attention_dim, cfg.pooled_projection_dim, length)
    return D.HashedText(cfg.caption_channels, None, length, mask=True)


@dataclass
class Inputs:
    """What the chain adapts, from what data (CLI arguments of the same names)."""

    base: str
    target_ae: str
    data: str
    base_ae: str | None = None
    heldout: str | None = None
    resolution: int = 1024
    holdout: int | None = None
    caption: str = "a photo"
    text_length: int = 64
    report_images: int = 16


class Context:
    """Everything loaded once: base model, autoencoders, text, cached latents of both sets."""

    def __init__(
        self,
        inputs: Inputs,
        cache_dir: str | Path,
        progress: bool = True,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
    ):
        """``device`` holds the models (the cached latents stay on the CPU, batches move);
        ``dtype`` is the frozen transformer weights' dtype (see :class:`ChainOptions`)."""
        self.inputs = inputs
        self.device, self.dtype = torch.device(device), dtype
        base_dir = Path(inputs.base)
        self.base, vae_dir, pipe_cls = load_base(base_dir)
        self.base.to(device=self.device, dtype=getattr(torch, dtype))
        self.family = fam.family_of(self.base)
        if inputs.base_ae is not None:
            vae_dir = Path(inputs.base_ae)
        if vae_dir is None:
            raise ValueError(
                f"base_ae: {base_dir} is a bare transformer; pass the base autoencoder directory "
                "(--base-ae DIR)"
            )
        self.base_ae = load_autoencoder(vae_dir, "base_ae").to(self.device)
        self.target_ae = load_autoencoder(inputs.target_ae, "target_ae").to(self.device)
        for p in (
            *self.base.parameters(),
            *self.base_ae.parameters(),
            *self.target_ae.parameters(),
        ):
            p.requires_grad_(False)
        self.new_channels = int(self.target_ae.config.latent_channels)
        self.base_p = fam.latent_patch_size(self.base, int(self.base_ae.config.latent_channels))
        self.text_encoder = text_encoder_for(base_dir, pipe_cls, self.base, inputs.text_length)
        items = D.scan_folder(inputs.data, inputs.caption)
        if inputs.heldout is not None:
            train_items, held_items = items, D.scan_folder(inputs.heldout, inputs.caption)
        else:
            holdout = inputs.holdout or max(1, len(items) // 10)
            train_items, held_items = D.split_holdout(items, holdout)
        fps = {"base": D.dir_fingerprint(vae_dir), "new": D.dir_fingerprint(inputs.target_ae)}
        encoders = {"base": self.base_ae, "new": self.target_ae}
        record = asdict(inputs)
        record.pop("report_images")  # reporting only: may change between invocations
        for key in ("base", "target_ae", "data", "base_ae", "heldout"):
            if record[key] is not None:
                record[key] = str(Path(record[key]).resolve())
        self.record = {
            "inputs": record,
            "family": self.family,
            "autoencoders": fps,
            "text": self.text_encoder.fingerprint,
            "train_images": [it.path.name for it in train_items],
            "heldout_images": [it.path.name for it in held_items],
        }
        captions = sorted({it.caption for it in train_items + held_items})
        texts, empty = D.cached_text(cache_dir, self.text_encoder, captions)
        sets = []
        for group in (train_items, held_items):
            lat = D.cached_latents(
                cache_dir, group, inputs.resolution, encoders, fps, progress=progress
            )
            idx = torch.tensor([captions.index(it.caption) for it in group])
            sets.append(D.LatentSet(lat["base"], lat["new"], idx, texts, empty, lat["names"]))
        self.train, self.held = sets
        self.new_downsample = D.ae_downsample(self.target_ae)


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
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = dict(model.named_parameters())
    missing = [k for k in saved if k not in own]
    if missing:
        raise ValueError(f"{path}: parameters {missing[:3]} do not exist in the model")
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)


def _write_state(out: Path, state: dict) -> None:
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def stage_sequence(state: dict) -> list[str]:
    return [s for s in STAGES if state["stages"].get(s, {}).get("done")]


def states(ctx: Context, out: str | Path, state: dict | None = None):
    """Yield (label, model) for the surgery model and after each finished stage, in order.

    One model is rebuilt and advanced in place (evaluate each before taking the next); the
    LoRA state is yielded merged.
    """
    out = Path(out)
    state = state or json.loads((out / STATE_FILE).read_text())
    model = _surgery(ctx, state["surgery"])
    yield "surgery", model
    for stage in stage_sequence(state):
        if stage == "lora":
            lora = state["lora"]
            add_lora(model, lora["rank"], lora["alpha"], targets=lora["targets"])
        _apply_params(model, out / stage / "params.safetensors")
        if stage == "lora":
            merge(model)
        yield stage, model


def run_chain(ctx: Context, out: str | Path, opts: ChainOptions) -> dict:
    """Run the requested stages in ``out``; returns the run state (also in ``out/adapt.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    surgery_record = {"patch_size": opts.patch_size, "seed": opts.seed, "reconcile": opts.reconcile}
    state_path = out / STATE_FILE
    if state_path.exists():
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
    else:
        state = {"version": 1, "run": ctx.record, "surgery": surgery_record, "stages": {}}
        _write_state(out, state)
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
    model = _surgery(ctx, surgery_record)
    for stage in sorted(done + todo, key=STAGES.index):
        ckpt = out / stage / "ckpt.pt"
        params_path = out / stage / "params.safetensors"
        if stage == "lora":
            if stage in done:
                lora = state["lora"]
                add_lora(model, lora["rank"], lora["alpha"], targets=lora["targets"])
            else:
                targets = add_lora(model, opts.rank, opts.alpha, seed=opts.seed)
                state["lora"] = {"rank": opts.rank, "alpha": opts.alpha, "targets": targets}
        if stage in done:
            _apply_params(model, params_path)
            continue
        cfg = opts.config(stage)
        kw = {"ckpt_path": ckpt, "resume": opts.resume, "progress": opts.progress}
        if stage == "align":
            result = align(model, ctx.base, ctx.train, cfg, reconcile_mode=opts.reconcile, **kw)
            trained = {
                n: p
                for n, p in model.named_parameters()
                if n.startswith(fam.embedder_name(model) + ".")
            }
        elif stage == "head":
            result = align_head(model, ctx.train, cfg, **kw)
            trained = _embed_head(model)
        else:
            objective = FlowObjective(
                guidance="distilled" if fam.has_guidance(model) else "fixed", text_drop=0.1
            )
            result = finetune_lora(model, ctx.train, cfg, objective=objective, **kw)
            trained = {n: p for n, p in model.named_parameters() if ".lora_" in n}
            trained.update(_embed_head(model))
        _save_params(params_path, trained)
        state["stages"][stage] = {
            "done": True,
            "config": asdict(cfg),
            "resumed_from": result.resumed_from,
            "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None,
        }
        _write_state(out, state)
        ckpt.unlink(missing_ok=True)
        done.append(stage)
    sequence = stage_sequence(state)
    if state.get("model", {}).get("stages") != sequence or not (out / "model").is_dir():
        merge(model)
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
        state["model"] = {"stages": sequence}
        _write_state(out, state)
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
    with amp:
        return _evaluate(ctx, runs, reconcile_mode, sigma, text, ctx.held.empty.to(dev), latents)


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
