"""The training loop every stage uses: AdamW, grad clip, EMA, resumable atomic checkpoints.

Determinism: the randomness of step ``s`` comes only from a generator seeded with (seed, stage
name, s), handed to the stage's loss function; nothing reads the global RNG. A run that is
interrupted and resumed from a checkpoint therefore takes exactly the same steps as one that is
not (same batches, noise, sigmas, dropped captions), and ends with the same weights up to
floating-point reassociation (none on CPU in practice: the ops run in the same order).

Checkpoints (``torch.save`` of a dict, written atomically every ``ckpt_every`` steps and at the
end): trainable parameters by name, AdamW state, EMA weights, the completed step count, the loss
history and the hyperparameters. If the loop is interrupted (KeyboardInterrupt or any other
exception) between two updates, the state is consistent and is checkpointed before the exception
propagates, so no completed step is lost; if it is interrupted inside an update (optimizer /
EMA), the half-updated state is not saved and the last periodic checkpoint stands.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path

# Called as hook(stage_name, completed_steps) after every completed step (a consistent state).
# Tests append a hook that raises to simulate an interrupt at step k.
STEP_HOOKS: list[Callable[[str, int], None]] = []

CKPT_FORMAT = 1


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

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (everything but steps / ckpt_every)."""
        d = asdict(self)
        d.pop("steps")
        d.pop("ckpt_every")
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


def _save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(
    name: str,
    params: dict[str, nn.Parameter],
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    config: TrainConfig,
    *,
    ckpt_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Minimize ``loss_fn`` over ``params`` for ``config.steps`` steps.

    Parameters
    ----------
    name : stage name (seeds the generators, labels the progress bar and the checkpoint)
    params : the trainable parameters by name (their ``requires_grad`` is set True)
    loss_fn : ``loss_fn(step, generator) -> scalar loss``; it must draw all randomness from the
        generator it is given
    config : hyperparameters
    ckpt_path : checkpoint file; None disables checkpointing
    resume : continue from ``ckpt_path`` if it exists (its hyperparameters and parameter names
        and shapes must match); without it an existing checkpoint is an error
    progress : show a tqdm bar

    Returns
    -------
    :class:`TrainResult`. On return the parameters hold the final weights (EMA ones with EMA).
    """
    from tqdm.auto import tqdm

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
    opt = torch.optim.AdamW(
        plist, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    ema = {n: params[n].detach().clone() for n in names} if config.ema else None
    result = TrainResult(steps=config.steps)
    start = 0
    ckpt = Path(ckpt_path) if ckpt_path is not None else None
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

    def state() -> dict:
        return {
            "format": CKPT_FORMAT,
            "name": name,
            "step": done,
            "params": {n: params[n].detach().clone() for n in names},
            "optimizer": opt.state_dict(),
            "ema": ema,
            "losses": list(result.losses),
            "config": config.fingerprint(),
        }

    bar = tqdm(total=config.steps, initial=start, desc=name, disable=not progress, leave=False)
    saved = start
    try:
        for step in range(start, config.steps):
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = loss_fn(step, step_generator(config.seed, name, step))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}")
            loss.backward()
            consistent = False
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(plist, config.grad_clip)
            opt.step()
            if ema is not None:
                decay = min(config.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for n in names:
                        ema[n].lerp_(params[n].detach(), 1 - decay)
            result.losses.append(float(loss.detach()))
            done = step + 1
            consistent = True
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4g}")
            if ckpt is not None and (done % config.ckpt_every == 0 or done == config.steps):
                _save(ckpt, state())
                saved = done
            for hook in STEP_HOOKS:
                hook(name, done)
    except BaseException:
        if ckpt is not None and consistent and done > saved:
            _save(ckpt, state())
        raise
    finally:
        bar.close()
    if ckpt is not None and done == config.steps and saved != done:
        _save(ckpt, state())
    if ema is not None:
        with torch.no_grad():
            for n in names:
                params[n].copy_(ema[n])
    return result


def _load(ckpt, name, params, names, opt, ema, config, result) -> int:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state.get("format") != CKPT_FORMAT or state.get("name") != name:
        raise ValueError(
            f"ckpt_path: {ckpt} is a {state.get('name')!r} checkpoint (format "
            f"{state.get('format')}); expected {name!r} format {CKPT_FORMAT}"
        )
    if state["config"] != config.fingerprint():
        diff = {
            k: (state["config"].get(k), v)
            for k, v in config.fingerprint().items()
            if state["config"].get(k) != v
        }
        raise ValueError(f"config: differs from the checkpoint's (saved, now): {diff}")
    saved = state["params"]
    if sorted(saved) != names:
        raise ValueError(
            f"ckpt_path: {ckpt} holds parameters {sorted(saved)[:4]}...; expected {names[:4]}..."
        )
    with torch.no_grad():
        for n in names:
            if saved[n].shape != params[n].shape:
                raise ValueError(
                    f"ckpt_path: parameter {n} has shape {tuple(saved[n].shape)}; the model's is "
                    f"{tuple(params[n].shape)}"
                )
            params[n].copy_(saved[n])
    opt.load_state_dict(state["optimizer"])
    if ema is not None:
        if state["ema"] is None:
            raise ValueError(f"ckpt_path: {ckpt} has no EMA state but config.ema is {config.ema}")
        for n in names:
            ema[n].copy_(state["ema"][n])
    result.losses = list(state["losses"])
    return int(state["step"])
