"""Full-size model configurations of the DC-Gen paper's models, written in code from public facts.

Every configuration below is the public ``config.json`` (or the public source) of the model it
names, re-typed here so that the benchmark suite needs no download. Models are built on the
``meta`` device by default: no weights, no memory, but the real diffusers modules, so that the
latency model can trace their real forward (:mod:`dcgen_quant.bench.opcount`).

Transformers (``TRANSFORMERS``)
    ``flux``                FLUX.1-dev / FLUX.1-Krea-dev (same architecture): 19 double-stream
                            + 38 single-stream blocks, hidden 3072 = 24 heads x 128, text 512 T5
                            tokens (4096 wide), pooled CLIP 768, guidance embedding. Latent: FLUX
                            VAE f8c16 packed 2x2 -> 64 input channels, one token per 16x16 pixels.
                            Source: huggingface.co/black-forest-labs/FLUX.1-dev transformer/config.
    ``dcgen-flux-f64c128``  DC-Gen-FLUX for DC-AE-1.5 f64c128: the same transformer after DC-Gen
                            surgery (new patch-1 embedder 128 -> 3072 and head 3072 -> 128), one
                            token per 64x64 pixels. Source: DC-Gen paper (arXiv 2509.25180) and
                            github.com/dc-ai-projects/DC-Gen (task ``t2i_4k``).
    ``dcgen-flux-f32c32``   DC-Gen-FLUX for DC-AE f32c32 (32 channels, one token per 32x32
                            pixels). Source: as above (task ``t2i_1k``).
    ``sana-1.6b``           SANA-1.6B: 20 blocks, hidden 2240 = 70 heads x 32 (linear attention),
                            cross-attention 20 x 112 over 300 Gemma-2-2B tokens (2304 wide),
                            GLUMBConv MLP ratio 2.5, DC-AE f32c32 latent, patch 1. Source:
                            huggingface.co/Efficient-Large-Model/Sana_1600M_1024px_diffusers
                            (equal to diffusers' SanaTransformer2DModel defaults).
    ``dcgen-sana``          DC-Gen-SANA: SANA-1.6B with a 128-channel patch-1 embedder/head for
                            DC-AE-1.5 f64c128. Source: DC-Gen paper.

Autoencoders (``AUTOENCODERS``; only the decoder is timed)
    ``flux-vae``            AutoencoderKL f8c16: 4 levels (128, 256, 512, 512), 2 resnets per
                            level, mid-block self-attention, no quant convs. Source: FLUX.1-dev
                            vae/config.json.
    ``dc-ae-f32c32``        AutoencoderDC f32c32 (SANA 1.0/1.1): widths (128, 256, 512, 512, 1024,
                            1024), 3 layers per stage, ResBlock x3 + EfficientViT (multi-scale 5)
                            x3, interpolate+conv upsampling, RMSNorm, SiLU. Source:
                            huggingface.co/mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers, and
                            DC-Gen's dc_gen/aecore/models/dc_ae.py (``dc-ae-f32c32-sana-1.0``).
    ``dc-ae-1.5-f64c128``   DC-AE-1.5 f64c128: widths (128, 256, 512, 512, 1024, 1024, 1024),
                            depths (0, 5, 10, 4, 4, 4, 4), ResBlocks only, pixel-shuffle
                            upsampling, no input shortcut, SiLU output. Source: DC-Gen's
                            dc_gen/aecore/models/dc_ae.py (``dc_ae_f64_1_5``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2x2 packing, done by the pipeline
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

SANA_1600M_CONFIG: dict[str, Any] = {
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 70,
    "attention_head_dim": 32,
    "num_layers": 20,
    "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112,
    "cross_attention_dim": 2240,
    "caption_channels": 2304,
    "mlp_ratio": 2.5,
    "sample_size": 32,
    "patch_size": 1,
}

FLUX_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

_EVIT = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
DC_AE_F32C32_CONFIG: dict[str, Any] = {
    "latent_channels": 32,
    "encoder_block_types": _EVIT,
    "decoder_block_types": _EVIT,
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
}

_F64_WIDTHS = (128, 256, 512, 512, 1024, 1024, 1024)
_F64_DEPTHS = (0, 5, 10, 4, 4, 4, 4)
DC_AE_15_F64C128_CONFIG: dict[str, Any] = {
    "latent_channels": 128,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": _F64_WIDTHS,
    "decoder_block_out_channels": _F64_WIDTHS,
    "encoder_layers_per_block": _F64_DEPTHS,
    "decoder_layers_per_block": _F64_DEPTHS,
    "encoder_qkv_multiscales": ((),) * 7,
    "decoder_qkv_multiscales": ((),) * 7,
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": False,
    "decoder_in_shortcut": False,
    "decoder_conv_act_fn": "silu",
}


@dataclass(frozen=True)
class AutoencoderSpec:
    """An autoencoder: its diffusers class, config and latent geometry."""

    name: str
    cls_name: str  # "AutoencoderKL" | "AutoencoderDC"
    config: dict[str, Any]
    factor: int  # spatial compression (pixels per latent pixel, per side)
    channels: int  # latent channels

    def latent_shape(self, resolution: int, batch: int = 1) -> tuple[int, int, int, int]:
        """[B, C, H, W] latent of a square ``resolution`` x ``resolution`` image."""
        _check_resolution(resolution, self.factor, self.name)
        side = resolution // self.factor
        return (batch, self.channels, side, side)


@dataclass(frozen=True)
class TransformerSpec:
    """A denoising transformer: its diffusers class, config, latent and text geometry."""

    name: str
    family: str  # "flux" | "sana"
    cls_name: str
    config: dict[str, Any]
    autoencoder: str  # default autoencoder (AUTOENCODERS key)
    patch: int  # latent pixels per token, per side (FLUX packs 2x2 in the pipeline)
    text_tokens: int
    text_dim: int
    cfg_batch: int  # 2 when the pipeline runs classifier-free guidance as a batch of 2
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def tokens(self, resolution: int, autoencoder: str | None = None) -> int:
        """Image tokens per sample at ``resolution`` (text tokens not included)."""
        ae = AUTOENCODERS[autoencoder or self.autoencoder]
        _check_resolution(resolution, ae.factor * self.patch, self.name)
        return (resolution // (ae.factor * self.patch)) ** 2


def _check_resolution(resolution: int, multiple: int, name: str) -> None:
    if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
        raise ValueError(
            f"resolution={resolution!r} must be a positive multiple of {multiple} for {name}"
        )


AUTOENCODERS: dict[str, AutoencoderSpec] = {
    "flux-vae": AutoencoderSpec("flux-vae", "AutoencoderKL", FLUX_VAE_CONFIG, 8, 16),
    "dc-ae-f32c32": AutoencoderSpec("dc-ae-f32c32", "AutoencoderDC", DC_AE_F32C32_CONFIG, 32, 32),
    "dc-ae-1.5-f64c128": AutoencoderSpec(
        "dc-ae-1.5-f64c128", "AutoencoderDC", DC_AE_15_F64C128_CONFIG, 64, 128
    ),
}

TRANSFORMERS: dict[str, TransformerSpec] = {
    "flux": TransformerSpec(
        "flux", "flux", "FluxTransformer2DModel", FLUX_CONFIG, "flux-vae", 2, 512, 4096, 1,
        source="black-forest-labs/FLUX.1-dev (FLUX.1-Krea-dev shares it)",
    ),
    "dcgen-flux-f64c128": TransformerSpec(
        "dcgen-flux-f64c128", "flux", "FluxTransformer2DModel",
        {**FLUX_CONFIG, "in_channels": 128, "out_channels": 128}, "dc-ae-1.5-f64c128", 1, 512,
        4096, 1, source="DC-Gen-FLUX, DC-AE-1.5 f64c128 (arXiv 2509.25180)",
    ),
    "dcgen-flux-f32c32": TransformerSpec(
        "dcgen-flux-f32c32", "flux", "FluxTransformer2DModel",
        {**FLUX_CONFIG, "in_channels": 32, "out_channels": 32}, "dc-ae-f32c32", 1, 512, 4096, 1,
        source="DC-Gen-FLUX, DC-AE f32c32 (arXiv 2509.25180)",
    ),
    "sana-1.6b": TransformerSpec(
        "sana-1.6b", "sana", "SanaTransformer2DModel", SANA_1600M_CONFIG, "dc-ae-f32c32", 1, 300,
        2304, 2, source="Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    ),
    "dcgen-sana": TransformerSpec(
        "dcgen-sana", "sana", "SanaTransformer2DModel",
        {**SANA_1600M_CONFIG, "in_channels": 128, "out_channels": 128}, "dc-ae-1.5-f64c128", 1,
        300, 2304, 2, source="DC-Gen-SANA, DC-AE-1.5 f64c128 (arXiv 2509.25180)",
    ),
}  # fmt: skip


def _lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(table)}") from None


def transformer_spec(name: str) -> TransformerSpec:
    return _lookup(TRANSFORMERS, name, "transformer")


def autoencoder_spec(name: str) -> AutoencoderSpec:
    return _lookup(AUTOENCODERS, name, "autoencoder")


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def build_transformer(
    name: str,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.bfloat16,
    **overrides,
) -> torch.nn.Module:
    """Instantiate transformer ``name`` (a :data:`TRANSFORMERS` key) on ``device``.

    On ``meta`` (default) nothing is allocated; on a real device the weights are uninitialized
    (see :func:`dcgen_quant.bench.measured.init_random_`). ``overrides`` replace config entries
    (tests use them for tiny sizes).
    """
    spec = transformer_spec(name)
    cls = _diffusers_class(spec.cls_name)
    with torch.device(device):
        model = cls(**{**spec.config, **overrides})
    return model.to(dtype).eval().requires_grad_(False)


def build_autoencoder(
    name: str,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.bfloat16,
    decoder_only: bool = True,
    **overrides,
) -> torch.nn.Module:
    """Instantiate autoencoder ``name`` (an :data:`AUTOENCODERS` key) on ``device``.

    With ``decoder_only`` the encoder is dropped (set to None): only ``decode`` is benchmarked.
    """
    spec = autoencoder_spec(name)
    cls = _diffusers_class(spec.cls_name)
    with torch.device(device):
        model = cls(**{**spec.config, **overrides})
    if decoder_only:
        model.encoder = None
        if hasattr(model, "quant_conv"):
            model.quant_conv = None
    return model.to(dtype).eval().requires_grad_(False)


def transformer_inputs(
    name: str,
    resolution: int,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.bfloat16,
    autoencoder: str | None = None,
    config: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Keyword arguments of one denoising forward of transformer ``name`` at ``resolution``.

    Shapes (B = ``cfg_batch``, T image tokens, L text tokens)::

        FLUX: hidden_states [1, T, C_in], encoder_hidden_states [1, L, 4096],
              pooled_projections [1, 768], timestep [1], guidance [1], img_ids [T, 3],
              txt_ids [L, 3]
        SANA: hidden_states [B, C_in, H, W], encoder_hidden_states [B, L, 2304], timestep [B]

    ``config`` is the model's actual config (when built with overrides); inputs are random
    normal on a real device, uninitialized on ``meta``.
    """
    spec = transformer_spec(name)
    cfg = {**spec.config, **(config or {})}
    ae = autoencoder_spec(autoencoder or spec.autoencoder)
    tokens = spec.tokens(resolution, ae.name)
    on_meta = torch.device(device).type == "meta"

    def rand(*shape, dt=dtype):
        if on_meta:
            return torch.empty(*shape, device=device, dtype=dt)
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device, dt)

    def steps(n):
        return (
            torch.full((n,), 500.0, device=device) if not on_meta else torch.empty(n, device=device)
        )

    if spec.family == "flux":
        side = int(round(tokens**0.5))
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        text_dim = cfg["joint_attention_dim"]
        return {
            "hidden_states": rand(1, tokens, cfg["in_channels"]),
            "encoder_hidden_states": rand(1, spec.text_tokens, text_dim),
            "pooled_projections": rand(1, cfg["pooled_projection_dim"]),
            "timestep": steps(1) / 1000,
            "guidance": steps(1) / 1000 * 7,
            "img_ids": ids.reshape(tokens, 3).to(device),
            "txt_ids": torch.zeros(spec.text_tokens, 3).to(device),
            "return_dict": False,
        }
    side = int(round(tokens**0.5))
    b = spec.cfg_batch
    return {
        "hidden_states": rand(b, cfg["in_channels"], side, side),
        "encoder_hidden_states": rand(b, spec.text_tokens, cfg["caption_channels"]),
        "timestep": steps(b),
        "return_dict": False,
    }
