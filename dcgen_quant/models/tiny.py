"""Tiny FLUX- and SANA-architecture transformers built in code (real diffusers classes).

They are the embedded default model of ``python -m dcgen_quant quantize`` and the models the
tests use: the same module structure as FLUX.1 / SANA (double + single blocks, AdaLayerNorm,
GLUMBConv, ...) at a size that runs in milliseconds on a CPU. Weights are random from a fixed
seed; every linear's in_features is a multiple of 64, so INT4 and NVFP4 apply everywhere.
"""

from __future__ import annotations

import torch

TINY_FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2x2 patch, as FLUX packs them
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 4,  # hidden 256
    "joint_attention_dim": 256,
    "pooled_projection_dim": 128,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 24, 24),  # sums to the head dim
}

TINY_SANA_CONFIG = {
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 4,
    "attention_head_dim": 32,  # hidden 128
    "num_layers": 2,
    "num_cross_attention_heads": 4,
    "cross_attention_head_dim": 32,
    "cross_attention_dim": 128,
    "caption_channels": 128,
    "mlp_ratio": 2.5,  # GLUMBConv hidden 320
    "sample_size": 16,
    "patch_size": 1,
}


def _build(cls, config: dict, seed: int, dtype: torch.dtype):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config)
    if dtype != torch.float32:
        # diffusers warns about .to(dtype) on models without fp32-pinned modules; nothing to pin
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            model = model.to(dtype)
        finally:
            diffusers_logging.set_verbosity(level)
    return model.eval()


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A ``FluxTransformer2DModel`` with :data:`TINY_FLUX_CONFIG` (+ overrides), random weights."""
    from diffusers import FluxTransformer2DModel

    return _build(FluxTransformer2DModel, {**TINY_FLUX_CONFIG, **overrides}, seed, dtype)


def tiny_sana(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A ``SanaTransformer2DModel`` with :data:`TINY_SANA_CONFIG` (+ overrides), random weights."""
    from diffusers import SanaTransformer2DModel

    return _build(SanaTransformer2DModel, {**TINY_SANA_CONFIG, **overrides}, seed, dtype)
