"""Per-GPU memory plan of a training stage, printed before it trains (and a refusal if too big).

A plan adds up, per process:

- ``weights``: the frozen weights in their dtype. With N processes the transformer blocks are
  FSDP-sharded (1/N each) and the rest is replicated; ``gather`` is FSDP's transient unsharded
  copies: two blocks' parameters (the one computing and the one prefetched) in the compute
  dtype, plus one block's unsharded float32 gradients before the reduce-scatter.
- ``trainable``, ``grads``, ``optimizer`` (AdamW's two moments), ``ema``: float32, sharded like
  the parameters (LoRA in the blocks 1/N, embedder and head replicated). ``optimizer`` also
  holds one float32 temporary of the trainable size (foreach AdamW's sqrt buffer).
- ``activations``: measured, not modelled. The stage's real loss (the same
  :func:`~dcgen_quant.adapt.flow.flow_loss` or embedding MSE the stage trains, the
  guidance-distilled objective's no-grad unconditional pass included) runs forward and backward
  on a copy of the model on the ``meta`` device, at the real micro-batch and token counts, and
  every tensor the step creates is counted while it is alive (a dispatcher-level tracker, as an
  allocator with no fragmentation would see it); the activation figure is the peak of that
  count less the trainable gradients (counted above). Two simulations give it with and without
  activation checkpointing. Attention is counted as a flash kernel keeps it (q, k, v, output
  and the float32 log-sum-exp; what torch's flash / memory-efficient / cuDNN kernels save),
  and CUDA autocast's casts are emulated (matmuls and convolutions in bf16, layer / group norm,
  softmax, pow, rsqrt, exp and mse in float32), since a meta tensor is seen by no autocast.

The grads are counted at their full size next to the activation peak, which is conservative:
the peak is usually early in the backward, when few gradients exist. Not counted: the CUDA
context and allocator fragmentation (the check keeps a margin, :data:`HEADROOM_GIB`), the
NCCL buffers, and the CPU memory (each process holds the base on the CPU). bench/adapt_memory.py
checks the plan against the measured peak of a real step.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import family as fam
from .memory_trace import AutocastEmulation, LiveBytes, simulate_step  # noqa: F401 (API)

GIB = 2**30
# kept free of the device's memory when checking a plan: CUDA context, cuBLAS workspaces,
# allocator fragmentation (a few GiB on an 80 GB GPU)
HEADROOM_GIB = 4.0


# ---------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """Estimated bytes per process of one training stage (see the module docstring)."""

    model: str
    stage: str
    processes: int
    batch: int
    micro_batch: int
    image_tokens: int
    text_tokens: int
    dtype: str
    grad_checkpoint: bool
    weights: int
    gather: int
    trainable: int
    grads: int
    optimizer: int
    ema: int
    activations_ckpt: int
    activations_plain: int

    @property
    def activations(self) -> int:
        return self.activations_ckpt if self.grad_checkpoint else self.activations_plain

    def total(self, grad_checkpoint: bool | None = None) -> int:
        ckpt = self.grad_checkpoint if grad_checkpoint is None else grad_checkpoint
        act = self.activations_ckpt if ckpt else self.activations_plain
        static = self.weights + self.gather + self.trainable + self.optimizer + self.ema
        return static + self.grads + act

    def summary(self) -> dict:
        """Byte figures in GiB (3 decimals), with the totals, for adapt.json and the tables."""
        out = {}
        for key, value in asdict(self).items():
            out[key] = round(value / GIB, 3) if key in _BYTES else value
        out["total_ckpt"] = round(self.total(True) / GIB, 3)
        out["total_plain"] = round(self.total(False) / GIB, 3)
        out["total"] = round(self.total() / GIB, 3)
        return out


_BYTES = (
    "weights",
    "gather",
    "trainable",
    "grads",
    "optimizer",
    "ema",
    "activations_ckpt",
    "activations_plain",
)
TABLE_COLUMNS = [
    ("stage", "stage", None),
    ("processes", "procs", None),
    ("micro_batch", "micro", None),
    ("weights", "weights", ".2f"),
    ("gather", "gather", ".2f"),
    ("trainable", "trainable", ".2f"),
    ("grads", "grads", ".2f"),
    ("optimizer", "optimizer", ".2f"),
    ("ema", "ema", ".2f"),
    ("activations_plain", "act", ".2f"),
    ("activations_ckpt", "act ckpt", ".2f"),
    ("total_plain", "total", ".2f"),
    ("total_ckpt", "total ckpt", ".2f"),
]


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _split(model: nn.Module):
    """(block params, other params) as lists, each [(name, param)]."""
    blocks = {id(p) for _, b in fam.blocks(model) for p in b.parameters()}
    inside = [(n, p) for n, p in model.named_parameters() if id(p) in blocks]
    outside = [(n, p) for n, p in model.named_parameters() if id(p) not in blocks]
    return inside, outside


def plan(
    model: nn.Module,
    stage: str,
    *,
    batch: int,
    latent: tuple[int, int, int],
    text: tuple[int, int],
    processes: int = 1,
    grad_accum: int = 1,
    dtype: str = "bfloat16",
    grad_checkpoint: bool = False,
    ema: bool = True,
    pooled: int | None = None,
    mask: bool = False,
    teacher=None,
    patch: int = 1,
    name: str = "model",
    emulate: bool = True,
    shallow=None,
    policy: str = "cuda",
) -> MemoryPlan:
    """The :class:`MemoryPlan` of training ``stage`` of ``model`` (a meta-device model whose
    trainable parameters are float32 with requires_grad and frozen ones in ``dtype``).

    Parameters
    ----------
    batch : the global batch; each process computes batch / processes / grad_accum rows at once
    latent, text, pooled, mask, teacher, patch : as :func:`simulate_step`
    shallow : ``shallow({config field: blocks}) -> model``, the same stage model with fewer
        blocks (see :func:`depth_fields`); when given, activations are extrapolated from 1 and 2
        blocks of each kind instead of simulating every block
    """
    if batch % processes:
        raise ValueError(f"batch_size: got {batch}; it must be a multiple of {processes} processes")
    micro = math.ceil(batch // processes / grad_accum)
    compute = getattr(torch, dtype)
    guided = stage == "lora" and fam.has_guidance(model)
    kw = {
        "pooled": pooled,
        "mask": mask,
        "guided": guided,
        "teacher": teacher,
        "autocast": None if compute == torch.float32 else compute,
        "patch": patch,
        "emulate": emulate,
        "policy": policy,
    }
    dev = next(model.parameters()).device.type

    def pair(m):
        plain, _ = simulate_step(m, stage, micro, latent, text, device=dev, **kw)
        kw_ckpt = {**kw, "grad_checkpoint": True, "device": dev}
        ckpt, _ = simulate_step(m, stage, micro, latent, text, **kw_ckpt)
        return plain, ckpt

    depths = depth_fields(model)
    if shallow is None or all(v <= 2 for v in depths.values()):
        act_plain, act_ckpt = pair(model)
    else:
        # blocks of one kind are identical: the step's peak is affine in each kind's count
        # (measured at 1 and 2 of each kind, everything else at 1), which spares simulating
        # 57 FLUX blocks on the meta device (slow: meta ops run through Python references)
        ones = dict.fromkeys(depths, 1)
        act_plain, act_ckpt = p0, c0 = pair(shallow(ones))
        for key, depth in depths.items():
            p1, c1 = pair(shallow({**ones, key: 2}))
            act_plain += (p1 - p0) * (depth - 1)
            act_ckpt += (c1 - c0) * (depth - 1)
    inside, outside = _split(model)
    n = processes
    if stage == "align":  # only the two embedders are on the device (runner._train_stage)
        emb = list(fam.embedder(model).parameters()) + list(fam.embedder(teacher[0]).parameters())
        weights = _bytes(p for p in emb if not p.requires_grad)
        gather = 0
    else:
        frozen_in = _bytes(p for _, p in inside if not p.requires_grad)
        frozen_out = _bytes(p for _, p in outside if not p.requires_grad)
        weights = frozen_in // n + frozen_out
        gather = 0
        if n > 1:
            per_block = [
                (
                    sum(p.numel() for p in b.parameters()) * compute.itemsize,
                    sum(p.numel() * 4 for p in b.parameters() if p.requires_grad),
                )
                for _, b in fam.blocks(model)
            ]
            gather = 2 * max(a for a, _ in per_block) + max(g for _, g in per_block)
    train_in = _bytes(p for _, p in inside if p.requires_grad)
    train_out = _bytes(p for _, p in outside if p.requires_grad)
    trainable = train_in // n + train_out
    grads = trainable
    return MemoryPlan(
        model=name,
        stage=stage,
        processes=n,
        batch=batch,
        micro_batch=micro,
        image_tokens=math.prod(fam.token_grid(latent[1:], patch)),
        text_tokens=text[0] if stage != "align" else 0,
        dtype=dtype,
        grad_checkpoint=grad_checkpoint,
        weights=weights,
        gather=gather,
        trainable=trainable,
        grads=grads,
        optimizer=3 * trainable,  # two AdamW moments + one foreach temporary
        ema=trainable if (ema and stage == "lora") else 0,
        activations_ckpt=act_ckpt if stage != "align" else act_plain,
        activations_plain=act_plain,
    )


# ---------------------------------------------------------------- meta models of a run


def depth_fields(model: nn.Module) -> dict[str, int]:
    """Config field -> number of blocks, per kind of block (FLUX: double and single)."""
    if fam.family_of(model) == "flux":
        return {
            "num_layers": len(model.transformer_blocks),
            "num_single_layers": len(model.single_transformer_blocks),
        }
    return {"num_layers": len(model.transformer_blocks)}


def meta_copy(model: nn.Module, **overrides) -> nn.Module:
    """A parameterless copy of a diffusers transformer (same class, config + ``overrides``) on
    the ``meta`` device, in the model's dtype."""
    from diffusers.utils import logging as diffusers_logging

    dtype = next(model.parameters()).dtype
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return type(model).from_config({**dict(model.config), **overrides}).to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def meta_stage_model(
    base_meta: nn.Module,
    stage: str,
    *,
    new_channels: int,
    patch: int,
    rank: int,
    alpha: float,
    dtype: str,
    sample_size: int | None = None,
) -> nn.Module:
    """The stage's model (surgery, LoRA for stage 3) built on ``meta`` from a meta base, with
    the stage's trainable parameters float32 + requires_grad and the rest in ``dtype``."""
    from .runner import trainable_names
    from .stages import add_lora
    from .surgery import surgery

    model = surgery(
        copy.deepcopy(base_meta), new_channels, patch, sample_size=sample_size, inplace=True
    )
    if stage == "lora":
        with torch.device("meta"):  # peft builds its layers on the CPU, then moves them
            add_lora(model, rank, alpha)
    names = set(trainable_names(model, stage))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        p.data = p.data.float() if n in names else p.data.to(getattr(torch, dtype))
    return model


def stage_plan(ctx, stage: str, opts) -> MemoryPlan:
    """The plan of ``stage`` for a chain run (:class:`~dcgen_quant.adapt.context.Context`,
    :class:`~dcgen_quant.adapt.runner.ChainOptions`)."""
    res = ctx.inputs.resolution
    side = res // ctx.new_downsample
    build = {
        "new_channels": ctx.new_channels,
        "patch": opts.patch_size,
        "rank": opts.rank,
        "alpha": opts.alpha,
        "dtype": opts.dtype,
        "sample_size": side if ctx.family == "sana" else None,
    }
    base = meta_copy(ctx.base).to(getattr(torch, opts.dtype))
    model = meta_stage_model(base, stage, **build)

    def shallow(overrides):
        return meta_stage_model(meta_copy(base, **overrides), stage, **build)

    t = ctx.train.texts
    teacher = None
    if stage == "align":
        bside = res // ctx.base_downsample
        teacher = (base, (ctx.train.base.shape[1], bside, bside), ctx.base_p)
    return plan(
        model,
        stage,
        batch=int(opts.batch_size[stage]),
        latent=(ctx.new_channels, side, side),
        text=(t.embeds.shape[1], t.embeds.shape[2]),
        processes=ctx.dist.world,
        grad_accum=opts.grad_accum,
        dtype=opts.dtype,
        grad_checkpoint=opts.grad_checkpoint,
        ema=bool(opts.ema),
        pooled=None if t.pooled is None else t.pooled.shape[1],
        mask=t.mask is not None,
        teacher=teacher,
        patch=opts.patch_size,
        name=type(ctx.base).__name__,
        shallow=shallow,
    )


# ---------------------------------------------------------------- report and check


def device_limit(device: torch.device, gib: float | None) -> float | None:
    """The memory (GiB) a plan must fit in: ``gib``, else a CUDA device's total, else None."""
    if gib is not None:
        return float(gib)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return None


def check(plan_: MemoryPlan, limit_gib: float | None) -> None:
    """Raise a one-line ValueError when the plan does not fit ``limit_gib`` less the headroom."""
    if limit_gib is None:
        return
    need = plan_.total() / GIB
    if need > limit_gib - HEADROOM_GIB:
        s = plan_.summary()
        parts = ", ".join(
            f"{k} {s[k]:.1f}"
            for k in ("weights", "gather", "trainable", "grads", "optimizer", "ema")
            if s[k]
        )
        act = "activations" + (" (checkpointed)" if plan_.grad_checkpoint else "")
        hints = [] if plan_.grad_checkpoint else ["--grad-checkpoint"]
        hints += ["more processes (torchrun)", "--grad-accum", "a smaller --batch-size"]
        raise ValueError(
            f"memory: stage {plan_.stage} needs about {need:.1f} GiB per device ({parts}, "
            f"{act} {s['activations_ckpt' if plan_.grad_checkpoint else 'activations_plain']:.1f})"
            f" but {limit_gib:.1f} GiB less {HEADROOM_GIB:.0f} GiB headroom is available; try "
            + ", ".join(hints)
        )


def print_plan(plan_: MemoryPlan, file=None) -> None:
    """The plan as a one-row table (GiB) on ``file`` (stderr: stdout holds --json)."""
    from ..tables import format_table

    s = plan_.summary()
    title = (
        f"memory plan per device, GiB: {plan_.model} stage {plan_.stage}, batch {plan_.batch}, "
        f"{plan_.image_tokens}+{plan_.text_tokens} tokens, {plan_.dtype}, "
        f"checkpointing {'on' if plan_.grad_checkpoint else 'off'}"
    )
    print(format_table([s], TABLE_COLUMNS, title=title), file=file or sys.stderr)
