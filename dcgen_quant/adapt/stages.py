"""The three DC-Gen post-training stages and the LoRA merge.

- :func:`align` (stage 1): only the new embedder trains; MSE between its tokens on the new
  latents and the frozen base embedder's tokens on the base latents of the same images, the two
  token grids reconciled by :func:`reconcile`.
- :func:`align_head` (stage 2): backbone frozen; embedder + head train on the flow-matching loss
  (w = 1 for guidance-embedding models), grad clip 0.1.
- :func:`finetune_lora` (stage 3): peft LoRA on every Linear (and SANA 1x1 conv) of the blocks,
  embedder + head trained fully, optional EMA; the guidance-distilled objective for
  guidance-embedding models.
- :func:`merge`: folds the LoRA into plain weights, leaving a plain diffusers model.

Defaults are REFERENCE.md's (lr 1e-4, AdamW betas (0.9, 0.95), batch 64 in stage 1, grad clip 0.1
in stage 2, LoRA rank 256 / alpha 256, EMA 0.999); the step counts are the caller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import family as fam
from .data import LatentSet
from .flow import FlowObjective, flow_loss
from .train import TrainConfig, TrainResult, train

RECONCILE = ("pool", "bilinear")


def _as_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    b, n, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, *grid)


def reconcile(
    a: torch.Tensor,
    grid_a: tuple[int, int],
    b: torch.Tensor,
    grid_b: tuple[int, int],
    mode: str = "pool",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two token sequences onto one grid.

    Parameters
    ----------
    a, b : float32 [B, h*w, D] tokens, row-major over ``grid_a`` / ``grid_b``
    mode : ``"pool"`` average-pools the larger grid down to the smaller (the paper; an exact
        f x f mean when the sizes divide), ``"bilinear"`` upsamples the smaller bilinearly
        (align_corners=False) to the larger (the released default)

    Returns
    -------
    (a', b') float32 [B, h'*w', D] on the common grid.
    """
    if mode not in RECONCILE:
        raise ValueError(f"reconcile: got {mode!r}; expected one of {RECONCILE}")
    if tuple(grid_a) == tuple(grid_b):
        return a, b
    small, large = sorted([tuple(grid_a), tuple(grid_b)], key=lambda g: g[0] * g[1])
    if not (small[0] <= large[0] and small[1] <= large[1]):
        raise ValueError(f"grids {grid_a} and {grid_b}: one must contain the other")

    def fix(t, grid):
        g = _as_grid(t, grid)
        if tuple(grid) == (small if mode == "pool" else large):
            return t
        if mode == "pool":
            g = F.adaptive_avg_pool2d(g, small)
        else:
            g = F.interpolate(g, size=large, mode="bilinear", align_corners=False)
        return g.flatten(2).transpose(1, 2)

    return fix(a, grid_a), fix(b, grid_b)


def _patch_features(model: nn.Module, z: torch.Tensor, p: int) -> torch.Tensor:
    """The embedder's input per token, [B, h*w, C*p*p] in its weight's column order."""
    if fam.family_of(model) == "flux":
        return fam.pack(z, p)
    return F.unfold(z, kernel_size=p, stride=p).transpose(1, 2)  # (C, py, px) = Conv2d order


def _grids(base, adapted, data):
    pb = fam.latent_patch_size(base, data.base.shape[1])
    pn = fam.latent_patch_size(adapted, data.new.shape[1])
    return pb, pn, fam.token_grid(data.base.shape[-2:], pb), fam.token_grid(data.new.shape[-2:], pn)


@torch.no_grad()
def lstsq_embedder(
    adapted: nn.Module,
    base: nn.Module,
    data: LatentSet,
    reconcile_mode: str = "pool",
    batch_size: int = 64,
    ridge: float = 1e-6,
) -> float:
    """Set the new embedder to the least-squares optimum of the stage-1 loss; returns that loss.

    The embedder is affine in its patch inputs and both reconciliations are linear with weights
    that sum to 1, so the stage-1 objective is an ordinary (ridge-regularized) least-squares
    problem; its value is the floor any number of stage-1 steps can reach on ``data``. It is a
    diagnostic, not an initialization: on badly conditioned latents the optimum puts large
    weights on directions the clean latents barely use, which the isotropic noise of x_t then
    excites (measured in the SANA demo: |W| 561 vs 7.5 after AdamW, and stage 2 drove the
    feature MSE to ~500). Gradient descent from a small init does not have that problem.
    """
    pb, pn, gb, gn = _grids(base, adapted, data)
    emb_b = fam.embedder(base)
    xtx = xty = None
    yy, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        zb, zn = data.base[i : i + batch_size], data.new[i : i + batch_size]
        teacher = fam.embed_tokens(base, emb_b, zb, pb).double()
        feats = _patch_features(adapted, zn, pn).double()
        feats = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)
        feats, teacher = reconcile(feats, gn, teacher, gb, reconcile_mode)
        x, y = feats.reshape(-1, feats.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
        xty = x.T @ y if xty is None else xty + x.T @ y
        yy += float((y * y).sum())
        count += y.numel()
    reg = ridge * torch.trace(xtx) / xtx.shape[0]
    sol = torch.linalg.solve(xtx + reg * torch.eye(xtx.shape[0], dtype=xtx.dtype), xty)
    emb = fam.embedder(adapted)
    w, bias = sol[:-1].T, sol[-1]
    emb.weight.copy_(w.reshape(emb.weight.shape).to(emb.weight.dtype))
    emb.bias.copy_(bias.to(emb.bias.dtype))
    # residual sum of squares = y'y - 2 sol'X'y + sol'X'X sol
    rss = yy - 2 * float((sol * xty).sum()) + float((sol * (xtx @ sol)).sum())
    return max(rss, 0.0) / count


@torch.no_grad()
def align_loss(
    adapted: nn.Module,
    base: nn.Module,
    data: LatentSet,
    reconcile_mode: str = "pool",
    batch_size: int = 64,
) -> float:
    """The stage-1 objective (embedding MSE) over all of ``data``."""
    pb, pn, gb, gn = _grids(base, adapted, data)
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        teacher = fam.embed_tokens(base, fam.embedder(base), data.base[i : i + batch_size], pb)
        student = fam.embed_tokens(adapted, fam.embedder(adapted), data.new[i : i + batch_size], pn)
        s, t = reconcile(student, gn, teacher, gb, reconcile_mode)
        total += float(((s.float() - t.float()) ** 2).sum())
        count += s.numel()
    return total / count


def _freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def _named(model: nn.Module, modules: list[nn.Module]) -> dict[str, nn.Parameter]:
    wanted = {id(p) for m in modules for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def align(
    adapted: nn.Module,
    base: nn.Module,
    data: LatentSet,
    config: TrainConfig | None = None,
    *,
    reconcile_mode: str = "pool",
    ckpt_path=None,
    resume: bool = False,
    progress: bool = True,
    dist=None,
) -> TrainResult:
    """Stage 1, embedding alignment: train only the new embedder of ``adapted``.

    Parameters
    ----------
    adapted : the model from :func:`dcgen_quant.adapt.surgery`
    base : the base model (frozen; only its embedder is used)
    data : latent pairs (``data.base`` for the teacher, ``data.new`` for the student)
    config : default ``TrainConfig(steps=20000, lr=1e-4, betas=(0.9, 0.95), batch_size=64)``
    reconcile_mode : ``"pool"`` or ``"bilinear"`` (see :func:`reconcile`)
    ckpt_path, resume, progress, dist : see :func:`dcgen_quant.adapt.train.train`
    """
    config = config or TrainConfig(steps=20000, batch_size=64)
    if reconcile_mode not in RECONCILE:
        raise ValueError(f"reconcile_mode: got {reconcile_mode!r}; expected one of {RECONCILE}")
    pb, pn, gb, gn = _grids(base, adapted, data)
    _freeze(adapted)
    _freeze(base)
    emb_b, emb_n = fam.embedder(base), fam.embedder(adapted)
    dev = next(emb_n.parameters()).device

    def loss_fn(step, gen, rows):
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)[rows]
        zb, zn = data.base[idx].to(dev), data.new[idx].to(dev)
        with torch.no_grad():
            teacher = fam.embed_tokens(base, emb_b, zb, pb)
        student = fam.embed_tokens(adapted, emb_n, zn, pn)
        s, t = reconcile(student, gn, teacher, gb, reconcile_mode)
        return F.mse_loss(s.float(), t.float())

    result = train(
        "align",
        _named(adapted, [emb_n]),
        loss_fn,
        config,
        ckpt_path=ckpt_path,
        resume=resume,
        progress=progress,
        split_batch=True,
        dist=dist,
    )
    _freeze(adapted)
    return result


def _flow_stage(name, model, data, config, objective, params, ckpt_path, resume, progress, dist):
    p = fam.latent_patch_size(model, data.new.shape[1])
    dev = next(model.parameters()).device
    empty = data.empty.to(dev)
    batch = config.batch_size

    def loss_fn(step, gen, rows):
        # the whole batch's indices (and, inside flow_loss, noise) are drawn; rows are kept, so
        # each process reads only its samples from the cache
        idx = torch.randint(len(data), (batch,), generator=gen)[rows]
        z, text = data.new[idx].to(dev), data.text(idx).to(dev)
        return flow_loss(model, z, text, empty, gen, objective, p, rows=rows, batch_size=batch)

    result = train(
        name,
        params,
        loss_fn,
        config,
        ckpt_path=ckpt_path,
        resume=resume,
        progress=progress,
        split_batch=True,
        dist=dist,
    )
    _freeze(model)
    return result


def align_head(
    adapted: nn.Module,
    data: LatentSet,
    config: TrainConfig | None = None,
    *,
    objective: FlowObjective | None = None,
    ckpt_path=None,
    resume: bool = False,
    progress: bool = True,
    dist=None,
) -> TrainResult:
    """Stage 2, output-head alignment: backbone frozen, embedder + head on the flow loss.

    Parameters
    ----------
    adapted : the model after stage 1
    data : ``data.new`` latents and captions
    config : default ``TrainConfig(steps=5000, lr=1e-4, grad_clip=0.1)``
    objective : default ``FlowObjective(guidance="fixed", text_drop=0.0)``: plain flow matching
        (w = 1 for guidance-embedding models)
    """
    config = config or TrainConfig(steps=5000, grad_clip=0.1)
    objective = objective or FlowObjective(guidance="fixed", text_drop=0.0)
    _freeze(adapted)
    params = _named(adapted, [fam.embedder(adapted), fam.head(adapted)])
    return _flow_stage(
        "head", adapted, data, config, objective, params, ckpt_path, resume, progress, dist
    )


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int = 0, targets=None) -> list[str]:
    """Inject peft LoRA adapters (in place) into every Linear / 1x1 conv of the blocks.

    Returns the adapted module names. A is peft's default (Kaiming-uniform, drawn from a
    generator seeded with ``seed``) and B zero, so the model is unchanged until trained.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: got {rank!r}; expected a positive int")
    if not alpha > 0:
        raise ValueError(f"alpha: got {alpha!r}; expected > 0")
    targets = list(targets or fam.lora_targets(model))
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg, model)
    return targets


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def finetune_lora(
    adapted: nn.Module,
    data: LatentSet,
    config: TrainConfig | None = None,
    *,
    rank: int = 256,
    alpha: float = 256.0,
    objective: FlowObjective | None = None,
    targets: list[str] | None = None,
    ckpt_path=None,
    resume: bool = False,
    progress: bool = True,
    dist=None,
) -> TrainResult:
    """Stage 3: LoRA on the blocks + embedder + head, flow-matching loss; LoRA left unmerged.

    Parameters
    ----------
    adapted : the model after stage 2 (LoRA adapters are injected into it in place)
    data : ``data.new`` latents and captions
    config : default ``TrainConfig(steps=5000, lr=1e-4, ema=0.999)``
    rank, alpha : LoRA rank and alpha (scale alpha / rank); the release uses 256 / 256
    objective : default ``FlowObjective(guidance="distilled", text_drop=0.1)`` for
        guidance-embedding models, plain flow matching with 10% text drop otherwise
    targets : module names to adapt; default every Linear / 1x1 conv of the blocks

    Call :func:`merge` afterwards to fold the adapters into plain weights.
    """
    config = config or TrainConfig(steps=5000, ema=0.999)
    objective = objective or FlowObjective(guidance="distilled", text_drop=0.1)
    _freeze(adapted)
    if not lora_parameters(adapted):
        add_lora(adapted, rank, alpha, seed=config.seed, targets=targets)
    params = {
        **lora_parameters(adapted),
        **_named(adapted, [fam.embedder(adapted), fam.head(adapted)]),
    }
    return _flow_stage(
        "lora", adapted, data, config, objective, params, ckpt_path, resume, progress, dist
    )


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every peft LoRA adapter into its base layer and remove the wrappers (in place).

    Returns the same model object, now a plain diffusers model (no peft modules or config),
    whose outputs equal the unmerged model's up to float rounding.
    """
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model
