"""Rectified-flow training objective and held-out evaluation (REFERENCE.md section 1).

x_t = sigma * eps + (1 - sigma) * x0, target v = eps - x0. Training sigmas are logit-normal:
s = sigmoid(u), u ~ N(mean, std) (default N(0, 1)), then shifted for the resolution with
sigma = shift * s / (1 + (shift - 1) * s), where shift = exp(mu) and mu grows linearly with the
image token count as in ``FluxPipeline``'s ``calculate_shift`` (0.5 at 256 tokens, 1.15 at 4096).
The same shift rule is used for SANA here; pass ``shift`` to override it.

Guidance-distilled models (an embedded guidance scale w, e.g. FLUX-dev and the tiny FLUX) are
trained with the distilled objective: w ~ U[1, 14], the text dropped (replaced by the empty
prompt's embedding) 10% of the time, and

    v_hat = [ v(x_t, c, t, w) - (1 - w) * stopgrad(v(x_t, empty, t, w=1)) ] / w

regressed onto eps - x0. Rationale: the guided model should output the CFG combination
w * v_c + (1 - w) * v_u; solving for v_c gives v_hat, which must match the conditional target.
At w = 1 it reduces to plain flow matching, which is what ``guidance="fixed"`` trains (stage 2)
and what the held-out evaluation measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import family as fam
from .family import TextBatch

_GUIDANCE_MODES = ("fixed", "distilled")


def resolution_shift(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """exp(mu) with mu linear in the image token count (FLUX's ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (seq_len - base_seq_len))


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift sigma = shift * s / (1 + (shift - 1) * s); float32 [n] -> [n]."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sample_sigma(
    n: int,
    generator: torch.Generator,
    shift: float,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Logit-normal(mean, std) sigmas with the time shift: float32 [n] in (0, 1)."""
    u = torch.randn(n, generator=generator) * std + mean
    return shift_sigma(torch.sigmoid(u), shift)


def eval_sigmas(k: int, shift: float) -> torch.Tensor:
    """k deterministic sigmas: the logit-normal(0, 1) quantiles (i + 0.5) / k, shifted. [k]."""
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    u = math.sqrt(2.0) * torch.erfinv(2 * q - 1)
    return shift_sigma(torch.sigmoid(u), shift).float()


@dataclass
class FlowObjective:
    """What the flow-matching loss does for a batch.

    Attributes
    ----------
    guidance : ``"fixed"`` (w = 1: plain flow matching) or ``"distilled"`` (w ~ U[range], the
        guidance-distilled objective); only matters for guidance-embedding models
    guidance_range : (low, high) of the uniform w distribution
    text_drop : probability of replacing a sample's caption with the empty prompt
    shift : time shift; None = :func:`resolution_shift` of the token count
    logit_mean, logit_std : the logit-normal parameters
    """

    guidance: str = "fixed"
    guidance_range: tuple[float, float] = (1.0, 14.0)
    text_drop: float = 0.1
    shift: float | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.guidance not in _GUIDANCE_MODES:
            raise ValueError(f"guidance: got {self.guidance!r}; expected one of {_GUIDANCE_MODES}")
        lo, hi = self.guidance_range
        if not 0 < lo <= hi:
            raise ValueError(f"guidance_range: got {self.guidance_range}; expected 0 < low <= high")
        if not 0 <= self.text_drop < 1:
            raise ValueError(f"text_drop: got {self.text_drop}; expected a probability in [0, 1)")


def _shift_for(objective_shift: float | None, z: torch.Tensor, p: int) -> float:
    if objective_shift is not None:
        return float(objective_shift)
    h, w = fam.token_grid(z.shape[-2:], p)
    return resolution_shift(h * w)


def _select_text(text: TextBatch, empty: TextBatch, drop: torch.Tensor) -> TextBatch:
    """Rows of ``text`` with ``drop`` [B] bool replaced by the (1-row) empty prompt."""

    def mix(a, b):
        if a is None:
            return None
        mask = drop.to(a.device).view(-1, *([1] * (a.dim() - 1)))
        return torch.where(mask, b.expand_as(a), a)

    return TextBatch(
        mix(text.embeds, empty.embeds), mix(text.pooled, empty.pooled), mix(text.mask, empty.mask)
    )


def flow_loss(
    model: nn.Module,
    x0: torch.Tensor,
    text: TextBatch,
    empty: TextBatch,
    generator: torch.Generator,
    objective: FlowObjective,
    p: int,
    rows: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """One batch of the (guidance-distilled) rectified-flow loss, or some rows of one.

    Parameters
    ----------
    model : FLUX / SANA transformer (train mode or not; gradients flow to trainable params)
    x0 : float32 [B, C, H, W] clean scaled latents (only the ``rows`` of the batch when given)
    text : the captions' conditioning, B rows; empty : the empty prompt's, 1 row
    generator : CPU generator; draws, in this order, sigma [N], eps [N, C, H, W], the text-drop
        uniforms [N] and w [N] for the whole batch of N = ``batch_size`` (default B), whether
        used or not, so a step's randomness depends only on it
    objective : see :class:`FlowObjective`
    p : latent patch size of ``model`` on these latents
    rows : int64 [B], which rows of the batch of ``batch_size`` ``x0`` and ``text`` are (the
        part one process or one micro-batch computes; default all)

    Returns
    -------
    float32 scalar: mean squared error of v_hat against eps - x0 over the B rows.
    """
    n = batch_size or x0.shape[0]
    sigma = sample_sigma(
        n, generator, _shift_for(objective.shift, x0, p), objective.logit_mean, objective.logit_std
    )
    eps = torch.randn((n, *x0.shape[1:]), generator=generator)
    drop = torch.rand(n, generator=generator) < objective.text_drop
    lo, hi = objective.guidance_range
    w = lo + (hi - lo) * torch.rand(n, generator=generator)
    if rows is not None:
        sigma, eps, drop, w = sigma[rows], eps[rows], drop[rows], w[rows]
    if eps.shape[0] != x0.shape[0]:
        raise ValueError(f"rows: {eps.shape[0]} rows for a batch x0 of {x0.shape[0]}")
    b = x0.shape[0]
    dev = x0.device
    sigma, eps, w = sigma.to(dev), eps.to(dev, x0.dtype), w.to(dev)
    s = sigma.view(-1, 1, 1, 1).to(x0.dtype)
    x_t = s * eps + (1 - s) * x0
    target = eps - x0
    cond = _select_text(text, empty, drop)
    ones = torch.ones(b, device=dev)
    if fam.has_guidance(model) and objective.guidance == "distilled":
        v = fam.forward(model, x_t, cond, sigma, w, p)
        with torch.no_grad():
            v_u = fam.forward(model, x_t, empty.to(dev).expand(b), sigma, ones, p)
        wv = w.view(-1, 1, 1, 1).to(x0.dtype)
        v_hat = (v - (1 - wv) * v_u) / wv
    else:
        v_hat = fam.forward(model, x_t, cond, sigma, ones, p)
    return torch.mean((v_hat.float() - target.float()) ** 2)


@torch.no_grad()
def heldout_flow_loss(
    model: nn.Module,
    x0: torch.Tensor,
    text: TextBatch,
    p: int,
    *,
    empty: TextBatch | None = None,
    guidance: tuple[float, ...] = (1.0,),
    k_sigmas: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    shift: float | None = None,
) -> float:
    """Mean flow-matching loss over fixed sigmas, fixed noise and fixed guidance scales.

    Every sample is evaluated at the ``k_sigmas`` quantile sigmas of :func:`eval_sigmas` with
    noise from a generator seeded with ``seed``, so two models evaluated on the same latents
    see exactly the same (x_t, sigma) pairs and their losses compare without sampling noise.
    With the default ``guidance=(1.0,)`` this is plain flow matching (v(x_t, c, t, w=1) against
    eps - x0). Other scales evaluate the guidance-distilled objective of stage 3, v_hat =
    [v(x_t, c, t, w) - (1 - w) v(x_t, empty, t, 1)] / w, averaged over the scales (no text
    drop); they need ``empty`` and a guidance-embedding model. :func:`heldout_flow_losses`
    gives the same number broken down by scale.

    Parameters
    ----------
    x0 : float32 [N, C, H, W] clean scaled latents; text : N rows of conditioning
    empty : the empty prompt's conditioning (1 row)
    """
    guided = any(w != 1.0 for w in guidance)
    # the empty prompt only matters to the guided objective; passed without it, it would add
    # the empty-caption pass that heldout_flow_losses then does
    kw = {"k_sigmas": k_sigmas, "seed": seed, "batch_size": batch_size, "shift": shift}
    return heldout_flow_losses(
        model, x0, text, p, empty=empty if guided else None, guidance=guidance, **kw
    )["mean"]


@torch.no_grad()
def heldout_flow_losses(
    model: nn.Module,
    x0: torch.Tensor,
    text: TextBatch,
    p: int,
    *,
    empty: TextBatch | None = None,
    guidance: tuple[float, ...] = (1.0,),
    k_sigmas: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    shift: float | None = None,
) -> dict:
    """:func:`heldout_flow_loss` per guidance scale, and with the empty caption.

    The same fixed sigmas, noise and batches as :func:`heldout_flow_loss`, whose value is
    ``"mean"`` here (computed in the same order, so bit-identical).

    Parameters
    ----------
    model, x0, text, p, guidance, k_sigmas, seed, batch_size, shift : as in
        :func:`heldout_flow_loss`; x0 is float32 [N, C, H, W], text has N rows
    empty : the empty prompt's conditioning (1 row); needed for scales other than 1, and with
        it the empty-caption loss is measured too

    Returns
    -------
    dict with ``"mean"``: the loss averaged over ``guidance``; ``"per_w"``: {w: the loss at
    scale w alone} for each scale; ``"empty"``: plain flow matching (w = 1) with the empty
    prompt in place of every caption, or None without ``empty``. With a scale other than 1 the
    empty-caption prediction is the guided objective's unconditional term v(x_t, empty, t, 1),
    so it costs no extra forward pass; otherwise it is one more pass per batch.
    """
    guided = any(w != 1.0 for w in guidance)
    if guided and (empty is None or not fam.has_guidance(model)):
        raise ValueError(
            f"guidance: got {guidance}; scales other than 1 need a guidance-embedding model "
            "and the empty prompt"
        )
    n = x0.shape[0]
    sig = eval_sigmas(k_sigmas, _shift_for(shift, x0, p))
    gen = torch.Generator().manual_seed(seed)
    eps_all = torch.randn((k_sigmas, *x0.shape), generator=gen)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    per_w = dict.fromkeys(guidance, 0.0)
    per_w_count = dict.fromkeys(guidance, 0)
    total_empty, count_empty = 0.0, 0
    try:
        for k in range(k_sigmas):
            for i in range(0, n, batch_size):
                j = min(n, i + batch_size)
                xb = x0[i:j]
                eps = eps_all[k, i:j].to(xb.device, xb.dtype)
                sigma = torch.full((j - i,), float(sig[k]), device=xb.device)
                x_t = sig[k] * eps + (1 - sig[k]) * xb
                target = (eps - xb).float()
                ones = torch.ones(j - i, device=xb.device)
                cond = text.select(slice(i, j)).to(xb.device)
                v_u = None
                if empty is not None:
                    v_u = fam.forward(
                        model, x_t, empty.to(xb.device).expand(j - i), sigma, ones, p
                    ).float()
                    total_empty += torch.sum((v_u - target) ** 2).item()
                    count_empty += v_u.numel()
                for w in guidance:
                    v = fam.forward(model, x_t, cond, sigma, ones * w, p).float()
                    if w != 1.0:
                        v = (v - (1 - w) * v_u) / w
                    err = torch.sum((v - target) ** 2).item()
                    total += err
                    count += v.numel()
                    per_w[w] += err
                    per_w_count[w] += v.numel()
    finally:
        model.train(was_training)
    return {
        "mean": total / count,
        "per_w": {w: per_w[w] / per_w_count[w] for w in guidance},
        "empty": total_empty / count_empty if empty is not None else None,
    }
