"""The training loop every stage uses: AdamW, grad clip, EMA, resumable sharded checkpoints.

Determinism: the randomness of step ``s`` comes only from a generator seeded with (seed, stage
name, s), handed to the stage's loss function; nothing reads the global RNG. A run that is
interrupted and resumed from a checkpoint therefore takes exactly the same steps as one that is
not (same batches, noise, sigmas, dropped captions), and ends with the same weights up to
floating-point reassociation (none on CPU in practice: the ops run in the same order).

Global batch: a loss function written for it (``split_batch=True``) is called as
``loss_fn(step, generator, rows)`` and returns the mean loss of ``rows`` (int64 positions in the
step's global batch of ``batch_size``); it draws the whole batch's randomness from the generator
and keeps its rows. The loop gives each process its share of the rows
(:meth:`~dcgen_quant.adapt.distributed.Dist.rows`) in ``grad_accum`` micro-batches and weights
each by rows / batch_size, so 1 process, N processes and any ``grad_accum`` take the same steps
up to float reduction order.

Checkpoints (a directory, :mod:`dcgen_quant.adapt.stage_ckpt`, written atomically every
``ckpt_every`` steps and at the end): trainable parameters by name, AdamW state, EMA weights, the
completed step count, the loss history and the hyperparameters; saved by N processes, they load
into M. If a 1-process loop is interrupted (KeyboardInterrupt or any other exception) between
two updates, the state is consistent and is checkpointed before the exception propagates, so no
completed step is lost; if it is interrupted inside an update (optimizer / EMA), the half-updated
state is not saved and the last periodic checkpoint stands. With N processes an interrupt keeps
the last periodic checkpoint: saving is a collective, which one failed rank would leave hanging.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import stage_ckpt
from .distributed import Dist

# Called as hook(stage_name, completed_steps) after every completed step (a consistent state).
# Tests append a hook that raises to simulate an interrupt at step k.
STEP_HOOKS: list[Callable[[str, int], None]] = []


@dataclass
class TrainConfig:
    """Hyperparameters of one stage.

    Attributes
    ----------
    steps : number of optimizer steps
    lr, betas, weight_decay : AdamW (REFERENCE.md: lr 1e-4, betas (0.9, 0.95))
    batch_size : samples per step
    grad_clip : max global grad norm, or None
    ema : EMA decay (REFERENCE.md stage 3: 0.999) or None; the decay at step t is
        min(ema, (1 + t) / (10 + t)), diffusers' EMAModel default warm-up, so short runs are not
        dominated by the initial weights. With EMA the final weights are the EMA weights.
    ckpt_every : checkpoint period in steps
    seed : seeds every step's generator
    autocast : None (plain float32) or "bfloat16": for models whose frozen weights are bf16.
        The loss runs under ``torch.autocast`` in bf16, and the trainable parameters are kept
        (made) float32, as are their optimizer and EMA states. (float16 would need loss scaling,
        which this loop does not do.)
    grad_accum : micro-batches per process and step (a split_batch loss only); the step's
        global batch stays ``batch_size``, so this changes memory, not the optimization
    """

    steps: int
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_clip: float | None = None
    ema: float | None = None
    ckpt_every: int = 100
    seed: int = 0
    autocast: str | None = None
    grad_accum: int = 1

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps: got {self.steps!r}; expected an int >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr: got {self.lr!r}; expected > 0")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: got {self.batch_size!r}; expected an int >= 1")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema: got {self.ema!r}; expected a decay in (0, 1) or None")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: got {self.grad_clip!r}; expected > 0 or None")
        if not isinstance(self.ckpt_every, int) or self.ckpt_every < 1:
            raise ValueError(f"ckpt_every: got {self.ckpt_every!r}; expected an int >= 1")
        self.betas = tuple(float(b) for b in self.betas)
        if self.autocast not in (None, "bfloat16"):
            raise ValueError(f"autocast: got {self.autocast!r}; expected None or 'bfloat16'")
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum: got {self.grad_accum!r}; expected an int >= 1")

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (everything but steps, ckpt_every and
        grad_accum, which do not change the optimization)."""
        d = asdict(self)
        for key in ("steps", "ckpt_every", "grad_accum"):
            d.pop(key)
        if d["autocast"] is None:
            d.pop("autocast")  # so that float32 checkpoints from before the option still match
        d["betas"] = list(d["betas"])
        return d


@dataclass
class TrainResult:
    """losses: per-step training loss (all steps, resumed ones included); resumed_from: the step
    count loaded from a checkpoint (0 for a fresh run)."""

    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    steps: int = 0


def step_generator(seed: int, name: str, step: int) -> torch.Generator:
    """The CPU generator of step ``step`` of stage ``name``."""
    value = (seed * 1_000_003 + step * 7_919 + zlib.crc32(name.encode())) % (2**63)
    return torch.Generator().manual_seed(value)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, dist: Dist) -> float:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``; returns the norm.

    The norm covers every gradient of every rank once: a sharded gradient's squares are summed
    over the ranks, a replicated one's (identical on every rank after
    :meth:`Dist.sync_grads`) counted once. Same rule as ``torch.nn.utils.clip_grad_norm_``
    (coefficient max_norm / (norm + 1e-6), at most 1), for a mix of sharded and plain tensors.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [dist.local(g) for g in grads if dist.is_sharded(g)]
    plain = [g for g in grads if not dist.is_sharded(g)]

    def squares(tensors) -> float:  # one device sync per kind, not one per tensor
        if not tensors:
            return 0.0
        norms = torch._foreach_norm(tensors)
        return float(torch.stack([n.double() for n in norms]).pow(2).sum())

    norm = (dist.sum(squares(sharded)) + squares(plain)) ** 0.5
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        torch._foreach_mul_(sharded + plain, coef)
    return norm


def train(
    name: str,
    params: dict[str, nn.Parameter],
    loss_fn: Callable[..., torch.Tensor],
    config: TrainConfig,
    *,
    ckpt_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    split_batch: bool = False,
    dist: Dist | None = None,
) -> TrainResult:
    """Minimize ``loss_fn`` over ``params`` for ``config.steps`` steps.

    Parameters
    ----------
    name : stage name (seeds the generators, labels the progress bar and the checkpoint)
    params : the trainable parameters by name (their ``requires_grad`` is set True); with N
        processes, FSDP-sharded ones (DTensor) and replicated ones may be mixed
    loss_fn : ``loss_fn(step, generator) -> scalar loss``, or with ``split_batch``
        ``loss_fn(step, generator, rows) -> mean loss of rows`` (see the module docstring); it
        must draw all randomness from the generator it is given
    config : hyperparameters
    ckpt_path : checkpoint directory; None disables checkpointing
    resume : continue from ``ckpt_path`` if it exists (its hyperparameters and parameter names
        and shapes must match); without it an existing checkpoint is an error
    progress : show a tqdm bar (rank 0)
    split_batch : ``loss_fn`` takes rows of the global batch: needed for N processes and for
        ``config.grad_accum > 1``
    dist : the process world (default: one process)

    Returns
    -------
    :class:`TrainResult`. On return the parameters hold the final weights (EMA ones with EMA);
    ``losses`` are the global batch's mean losses (identical on every rank).
    """
    from tqdm.auto import tqdm

    dist = dist or Dist()
    if not split_batch and (dist.distributed or config.grad_accum > 1):
        raise ValueError(
            f"{name}: this loss computes whole batches only; it cannot be split over "
            f"{dist.world} processes x {config.grad_accum} micro-batches"
        )
    rows = dist.rows(config.batch_size)
    if config.grad_accum > len(rows):
        raise ValueError(
            f"grad_accum: got {config.grad_accum}; each of the {dist.world} processes has only "
            f"{len(rows)} rows of the batch of {config.batch_size}"
        )
    chunks = rows.tensor_split(config.grad_accum)
    names = sorted(params)
    plist = [params[n] for n in names]
    for param in plist:
        if config.autocast and param.dtype != torch.float32:
            param.data = param.data.float()  # float32 master weights next to 16-bit frozen ones
        param.requires_grad_(True)
    amp = (
        torch.autocast(plist[0].device.type, dtype=getattr(torch, config.autocast))
        if config.autocast and plist
        else contextlib.nullcontext()
    )
    # sharded (FSDP) and replicated parameters in separate groups: foreach kernels take one kind
    groups = [
        [p for p in plist if dist.is_sharded(p)],
        [p for p in plist if not dist.is_sharded(p)],
    ]
    # foreach: one (DTensor) dispatch per list op instead of one per parameter
    opt = torch.optim.AdamW(
        [{"params": g} for g in groups if g],
        lr=config.lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
        foreach=True,
    )
    ema = {n: params[n].detach().clone() for n in names} if config.ema else None
    # the EMA works on each rank's shards (views that the optimizer updates in place)
    ema_pairs = (
        (
            [dist.local(ema[n]) for n in names],
            [dist.local(params[n].detach()) for n in names],
        )
        if ema is not None
        else None
    )
    result = TrainResult(steps=config.steps)
    start = 0
    ckpt = Path(ckpt_path) if ckpt_path is not None else None
    if ckpt is not None and stage_ckpt.legacy_file(ckpt).exists():
        raise ValueError(
            f"ckpt_path: {stage_ckpt.legacy_file(ckpt)} is a checkpoint of an earlier version of "
            "this tool; remove it to restart the stage"
        )
    if ckpt is not None and ckpt.exists():
        if not resume:
            raise FileExistsError(
                f"ckpt_path: {ckpt} exists; pass resume=True to continue it or remove it"
            )
        start = _load(ckpt, name, params, names, opt, ema, config, result)
        result.resumed_from = start
    if start > config.steps:
        raise ValueError(
            f"steps: got {config.steps}; the checkpoint {ckpt} has already done {start} steps"
        )

    consistent = True
    done = start

    def save() -> None:
        meta = {
            "name": name,
            "step": done,
            "losses": list(result.losses),
            "config": config.fingerprint(),
            "world_size": dist.world,
        }
        stage_ckpt.save(ckpt, dist, _state_tensors(params, names, opt, ema), meta)

    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=name,
        disable=not (progress and dist.main),
        leave=False,
    )
    saved = start
    try:
        for step in range(start, config.steps):
            opt.zero_grad(set_to_none=True)
            loss_value = 0.0
            for chunk in chunks:
                gen = step_generator(config.seed, name, step)
                with amp:
                    if split_batch:
                        loss = loss_fn(step, gen, chunk)
                    else:
                        loss = loss_fn(step, gen)
                weight = len(chunk) / config.batch_size
                # x world: FSDP averages gradients over the ranks, the sum is what is wanted
                (loss * (weight * dist.world)).backward()
                consistent = False  # gradients of a step that may yet fail
                loss_value += float(loss.detach()) * weight
            loss_value = dist.sum(loss_value)
            if not torch.isfinite(torch.tensor(loss_value)):
                raise FloatingPointError(f"{name}: loss is {loss_value} at step {step}")
            dist.sync_grads(plist)
            if config.grad_clip is not None:
                clip_grad_norm(plist, config.grad_clip, dist)
            opt.step()
            if ema_pairs is not None:
                decay = min(config.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(*ema_pairs, 1 - decay)
            result.losses.append(loss_value)
            done = step + 1
            consistent = True
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4g}")
            if ckpt is not None and (done % config.ckpt_every == 0 or done == config.steps):
                save()
                saved = done
            for hook in STEP_HOOKS:
                hook(name, done)
    except BaseException:
        # with N processes a save after one rank failed could hang: keep the periodic one
        if ckpt is not None and consistent and done > saved and not dist.distributed:
            save()
        raise
    finally:
        bar.close()
    if ckpt is not None and done == config.steps and saved != done:
        save()
    if ema is not None:
        with torch.no_grad():
            for n in names:
                params[n].copy_(ema[n])
    return result


def _state_tensors(params, names, opt, ema, template: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by flat name; ``template`` makes zero tensors to load into."""
    out = {}
    for n in names:
        p = params[n]
        out[f"params/{n}"] = p.detach()
        if ema is not None:
            out[f"ema/{n}"] = ema[n]
        state = opt.state.get(p) or {}
        if template or not state:
            state = {
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                "step": torch.zeros((), dtype=torch.float32),
            }
        for key in ("exp_avg", "exp_avg_sq", "step"):
            out[f"optim/{n}/{key}"] = state[key]
    return out


def _load(ckpt, name, params, names, opt, ema, config, result) -> int:
    meta = stage_ckpt.read_meta(ckpt)
    if meta.get("name") != name:
        got = meta.get("name")
        raise ValueError(f"ckpt_path: {ckpt} is a {got!r} checkpoint; expected {name!r}")
    if meta.get("config") != config.fingerprint():
        saved = meta.get("config") or {}
        diff = {k: (saved.get(k), v) for k, v in config.fingerprint().items() if saved.get(k) != v}
        raise ValueError(f"config: differs from the checkpoint's (saved, now): {diff}")
    tensors = _state_tensors(params, names, opt, ema, template=True)
    stage_ckpt.load(ckpt, tensors)
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.copy_(tensors[f"params/{n}"])
            opt.state[p] = {
                key: tensors[f"optim/{n}/{key}"] for key in ("step", "exp_avg", "exp_avg_sq")
            }
    result.losses = [float(x) for x in meta["losses"]]
    return int(meta["step"])
