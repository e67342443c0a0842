"""Text-to-image sampling with a FLUX / SANA transformer in any latent space.

The stock diffusers pipelines hard-code their latent geometry (``FluxPipeline`` packs 2x2
patches of an AutoencoderKL latent), so they cannot run a DC-Gen model, which reads a deeply
compressed AutoencoderDC latent at patch 1. This module samples with the same rectified-flow
ODE those pipelines integrate, for whatever autoencoder the model was adapted to (and for 16-bit
or quantized transformers alike):

- sigmas: ``linspace(1, 1/steps, steps)`` with FLUX's resolution time shift
  (:func:`dcgen_quant.adapt.flow.resolution_shift` of the image token count), then 0, as
  ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting makes them;
- Euler steps ``x <- x + (sigma_next - sigma) * v(x, sigma)``, v the predicted eps - x0;
- guidance: models with an embedded guidance scale (FLUX.1-dev, the guidance-distilled DC-Gen
  FLUX) take w as an input, one forward per step; others (SANA) use classifier-free guidance
  ``v_u + w (v_c - v_u)`` with the empty prompt, two forwards per step;
- the latents are decoded with the autoencoder (its scaling / shift factors undone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import data as D
from . import family as fam
from .family import TextBatch
from .flow import resolution_shift, shift_sigma


def sigma_schedule(steps: int, image_tokens: int, shift: float | None = None) -> torch.Tensor:
    """Noise levels of ``steps`` Euler steps, float32 [steps + 1], from 1 down to exactly 0.

    ``shift`` overrides the resolution shift computed from ``image_tokens``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: got {steps!r}; expected an int >= 1")
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    s = shift_sigma(s, resolution_shift(image_tokens) if shift is None else float(shift))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def euler(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate dx/dsigma = v(x, sigma) from ``sigmas[0]`` to ``sigmas[-1]``.

    Parameters
    ----------
    velocity : (x [B, ...], sigma float32 [B]) -> v [B, ...]
    x : float32 [B, ...] the state at ``sigmas[0]`` (pure noise at sigma 1)
    sigmas : float32 [steps + 1], decreasing
    """
    from tqdm.auto import tqdm

    b = x.shape[0]
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, torch.full((b,), s, device=x.device))
        x = x + (s_next - s) * v.to(x.dtype)
    return x


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    text: TextBatch,
    latent_shape: tuple[int, int, int],
    *,
    steps: int = 20,
    guidance: float = 3.5,
    empty: TextBatch | None = None,
    seed: int = 0,
    shift: float | None = None,
    p: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Clean scaled latents float32 [B, C, H, W] for the B prompts of ``text``.

    Parameters
    ----------
    model : FluxTransformer2DModel / SanaTransformer2DModel (16-bit or quantized), eval mode
    text : the prompts' conditioning, B rows (on the model's device)
    latent_shape : (C, H, W) of the autoencoder latent the model reads
    guidance : w; embedded for guidance-embedding models, classifier-free otherwise (then
        ``empty``, the empty prompt's conditioning, is needed unless w = 1)
    seed : seeds the initial noise (CPU generator, so a seed gives the same image everywhere)
    p : latent patch size (FLUX; inferred when None)
    """
    embedded = fam.has_guidance(model)
    if not embedded and guidance != 1.0 and empty is None:
        raise ValueError(
            "empty: classifier-free guidance (a model without a guidance embedding, "
            f"guidance={guidance}) needs the empty prompt's conditioning"
        )
    b = text.embeds.shape[0]
    dev = text.embeds.device
    c, h, w = latent_shape
    if fam.family_of(model) == "flux":
        p = p or fam.latent_patch_size(model, c)
        tokens = fam.token_grid((h, w), p)
    else:
        tokens = fam.token_grid((h, w), int(model.config.patch_size))
    sigmas = sigma_schedule(steps, tokens[0] * tokens[1], shift)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((b, c, h, w), generator=gen).to(dev)
    w_vec = torch.full((b,), float(guidance), device=dev)
    # the model runs in its own dtype (bf16 on a GPU); the ODE state stays float32
    mdtype = next(model.parameters()).dtype
    cond = text.to(mdtype)
    uncond = empty.expand(b).to(mdtype) if empty is not None else None

    def velocity(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_in = x_t.to(mdtype)
        if embedded:
            return fam.forward(model, x_in, cond, sigma, w_vec, p).float()
        v_c = fam.forward(model, x_in, cond, sigma, None, p).float()
        if guidance == 1.0:
            return v_c
        v_u = fam.forward(model, x_in, uncond, sigma, None, p).float()
        return v_u + guidance * (v_c - v_u)

    return euler(velocity, x, sigmas, progress)


@torch.no_grad()
def generate(
    model: nn.Module,
    autoencoder: nn.Module,
    text_encoder,
    prompts: list[str],
    resolution: int,
    *,
    steps: int = 20,
    guidance: float = 3.5,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Images float32 [B, 3, R, R] in [-1, 1] for ``prompts``.

    Parameters
    ----------
    model : the transformer; autoencoder : the AutoencoderKL / AutoencoderDC it reads
    text_encoder : :class:`dcgen_quant.adapt.data.PipelineText` or ``HashedText`` (anything
        with ``encode(list[str]) -> TextBatch``)
    resolution : image side in pixels, a multiple of the autoencoder's downsampling factor
    """
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    f = D.ae_downsample(autoencoder)
    if resolution % f:
        raise ValueError(
            f"resolution: got {resolution}; expected a multiple of the autoencoder's "
            f"downsampling factor {f}"
        )
    dev = next(model.parameters()).device
    text = text_encoder.encode(list(prompts)).to(dev)
    empty = text_encoder.encode([""]).to(dev)
    shape = (int(autoencoder.config.latent_channels), resolution // f, resolution // f)
    z = sample_latents(
        model, text, shape, steps=steps, guidance=guidance, empty=empty, seed=seed,
        progress=progress,
    )  # fmt: skip
    return D.decode(autoencoder, z).clamp(-1, 1)
