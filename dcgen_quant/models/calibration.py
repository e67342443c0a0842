"""Calibration inputs for the quantizer: one dict of ``transformer.forward`` kwargs per sample.

* :func:`synthetic_calibration`: random inputs of the right shapes for any FLUX or SANA config
  (no text encoder, no VAE): noisy latents along a flow-matching schedule, random text
  embeddings, guidance when the model embeds it. For the embedded tiny model and for tests.
* :func:`capture_pipeline_calibration`: run a real diffusers ``FluxPipeline`` / ``SanaPipeline``
  on prompts and record the transformer's arguments at every denoising step (what SVDQuant's
  reference calibration does with 128 COCO captions).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import family_for


def flow_matching_sigmas(steps: int, shift: float | None = None, mu: float | None = None):
    """Noise levels of a flow-matching sampler: ``linspace(1, 1/steps, steps)``, then shifted.

    ``shift`` (SD3 / SANA): ``s' = shift s / (1 + (shift - 1) s)``; ``mu`` (FLUX's resolution-
    dependent shift): ``s' = e^mu / (e^mu + 1/s - 1)``. Returns a list of floats in (0, 1].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
    if steps == 1:
        sigmas = [1.0]
    if shift is not None:
        sigmas = [shift * s / (1 + (shift - 1) * s) for s in sigmas]
    if mu is not None:
        sigmas = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in sigmas]
    return sigmas


def flux_mu(image_tokens: int) -> float:
    """FLUX's shift parameter: linear in the image token count, 0.5 at 256 and 1.15 at 4096."""
    return 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)


def _text_embeddings(gen, samples: int, tokens: int, channels: int, dtype) -> list[torch.Tensor]:
    # Encoder outputs have channels of very different scales (and T5 / Gemma a few large
    # outliers); a fixed per-channel log-normal scale with a few 20x channels mimics that.
    scale = torch.exp(0.5 * torch.randn(channels, generator=gen))
    scale[torch.randperm(channels, generator=gen)[: max(1, channels // 64)]] *= 20.0
    return [
        (torch.randn(1, tokens, channels, generator=gen) * scale).to(dtype) for _ in range(samples)
    ]


def synthetic_calibration(
    model: nn.Module,
    samples: int = 4,
    steps: int = 4,
    seed: int = 0,
    *,
    latent_size: int | None = None,
    text_tokens: int = 32,
    guidance: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Random calibration inputs for a FLUX or SANA transformer: ``samples * steps`` dicts.

    Parameters
    ----------
    model : FluxTransformer2DModel or SanaTransformer2DModel (any config)
    samples : int; distinct "images" (latent, noise and text embedding)
    steps : int; denoising steps per sample along the flow-matching schedule
    seed : int
    latent_size : tokens per side of the image grid (FLUX: packed 2x2 latent patches, default 16
        = 256 tokens; SANA: latent pixels, default ``config.sample_size``)
    text_tokens : length of the text embedding sequence
    guidance : embedded guidance scale (default 3.5 for FLUX, 4.5 for SANA), used only when the
        model embeds guidance
    dtype, device : of the returned tensors (default: those of the model's parameters; give them
        for a model whose parameters are on the meta device)

    Returns
    -------
    list of dicts of ``model.forward`` keyword arguments (tensors on the model's device and
    dtype; batch 1). Latents are ``x_t = sigma * noise + (1 - sigma) * x0`` with a random
    ``x0``; text embeddings are random with per-channel scales and a few outlier channels.
    """
    family = family_for(model)
    cfg = model.config
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, Any]] = []
    if family.name == "flux":
        side = latent_size or 16
        n_img = side * side
        sigmas = flow_matching_sigmas(steps, mu=flux_mu(n_img))
        texts = _text_embeddings(gen, samples, text_tokens, cfg.joint_attention_dim, dtype)
        rows = torch.arange(side).repeat_interleave(side)
        img_ids = torch.stack(
            [torch.zeros(n_img), rows.float(), torch.arange(side).repeat(side)], 1
        )
        txt_ids = torch.zeros(text_tokens, 3)
        for i in range(samples):
            x0 = torch.randn(1, n_img, cfg.in_channels, generator=gen)
            noise = torch.randn(1, n_img, cfg.in_channels, generator=gen)
            pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen)
            for s in sigmas:
                kw = {
                    "hidden_states": (s * noise + (1 - s) * x0).to(dtype),
                    "encoder_hidden_states": texts[i],
                    "pooled_projections": pooled.to(dtype),
                    "timestep": torch.tensor([s], dtype=dtype),
                    "img_ids": img_ids.to(dtype),
                    "txt_ids": txt_ids.to(dtype),
                    "return_dict": False,
                }
                if cfg.guidance_embeds:
                    kw["guidance"] = torch.tensor([3.5 if guidance is None else guidance])
                out.append(kw)
    elif family.name == "sana":
        side = latent_size or cfg.sample_size
        sigmas = flow_matching_sigmas(steps, shift=3.0)
        texts = _text_embeddings(gen, samples, text_tokens, cfg.caption_channels, dtype)
        for i in range(samples):
            shape = (1, cfg.in_channels, side, side)
            x0 = torch.randn(shape, generator=gen)
            noise = torch.randn(shape, generator=gen)
            for s in sigmas:
                kw = {
                    "hidden_states": (s * noise + (1 - s) * x0).to(dtype),
                    "encoder_hidden_states": texts[i],
                    "encoder_attention_mask": torch.ones(1, text_tokens, dtype=torch.long),
                    "timestep": torch.tensor([s * 1000.0 * cfg.timestep_scale], dtype=dtype),
                    "return_dict": False,
                }
                if cfg.guidance_embeds:
                    g = (4.5 if guidance is None else guidance) * cfg.guidance_embeds_scale
                    kw["guidance"] = torch.tensor([g], dtype=dtype)
                out.append(kw)
    else:  # pragma: no cover - family_for only returns registered families
        raise ValueError(f"no synthetic calibration for family {family.name!r}")
    return [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()} for kw in out
    ]


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


def capture_pipeline_calibration(
    pipeline,
    prompts: Sequence[str],
    steps: int,
    *,
    seed: int = 0,
    **call_kwargs,
) -> list[dict[str, Any]]:
    """Run ``pipeline`` on each prompt and record the transformer's inputs at every step.

    Parameters
    ----------
    pipeline : a diffusers pipeline with a ``transformer`` (FluxPipeline, SanaPipeline, ...)
    prompts : the prompts, one pipeline call each
    steps : ``num_inference_steps`` of each call
    seed : the generator of prompt i is seeded with ``seed + i``
    call_kwargs : passed to the pipeline call (height, width, guidance_scale,
        max_sequence_length, ...); ``output_type`` defaults to "latent" (no VAE decode)

    Returns
    -------
    list of dicts of ``transformer.forward`` keyword arguments (positional arguments bound to
    their names, ``return_dict`` forced to False), ``len(prompts) * steps`` of them for a
    one-call-per-step sampler (a classifier-free-guidance batch is one dict with batch 2).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("prompts must not be empty")
    transformer = pipeline.transformer
    signature = inspect.signature(transformer.forward)
    records: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        bound = dict(signature.bind(*args, **kwargs).arguments)
        bound["return_dict"] = False
        records.append(_detach(bound))

    call_kwargs.setdefault("output_type", "latent")
    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                generator = torch.Generator().manual_seed(seed + i)
                pipeline(
                    prompt=prompt, num_inference_steps=steps, generator=generator, **call_kwargs
                )
    finally:
        handle.remove()
    return records
