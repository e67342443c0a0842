"""What DC-Gen needs to know about each model family (FLUX, SANA), in one place.

Both families are driven here exactly the way their diffusers pipelines drive them, with the
latent grid ``z`` [B, C, H, W] (float32, already scaled by the autoencoder's scaling/shift
factors) as the common currency:

FLUX (``FluxTransformer2DModel``)
    The transformer's own ``patch_size`` config is 1: ``FluxPipeline._pack_latents`` packs 2x2
    latent patches into 64 channels *outside* the model. We generalize that packing to a patch
    size ``p`` (the DC-Gen FLUX models use ``p = 1`` on DC-AE f32c32): token order row-major over
    the (H/p, W/p) grid, channel order (C, py, px) inside a token, the same order diffusers uses
    for p = 2. ``in_channels = out_channels = C * p * p`` and ``patch_size`` stays 1, so ``p`` is
    ``sqrt(in_channels / C)`` for an autoencoder with ``C`` latent channels. Positions (``img_ids``)
    are the integer (row, col) of the token grid, as ``FluxPipeline._prepare_latent_image_ids``
    makes them. ``timestep`` is sigma in [0, 1] and ``guidance`` the guidance scale; the model
    multiplies both by 1000 itself.
SANA (``SanaTransformer2DModel``)
    The model patchifies itself: ``patch_embed.proj`` is a Conv2d(C, D, kernel=p, stride=p) and
    ``proj_out`` a Linear(D, p*p*C) whose outputs are ordered (py, px, C) by the model's
    unpatchify. ``in_channels = out_channels = C`` and ``patch_size = p``. ``timestep`` is
    ``1000 * sigma * timestep_scale`` as ``SanaPipeline`` passes it; a guidance-embedding model
    gets ``guidance * guidance_embeds_scale`` as ``SanaSprintPipeline`` passes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextBatch:
    """Precomputed text conditioning for a batch.

    Attributes
    ----------
    embeds : float32 [B, T, D_text] (FLUX: T5 states, D_text = joint_attention_dim;
        SANA: Gemma states, D_text = caption_channels)
    pooled : float32 [B, P] or None (FLUX only: CLIP pooled output, P = pooled_projection_dim)
    mask : float32 [B, T] of 0/1 or None (SANA: attention mask of the prompt tokens)
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def _map(self, fn) -> TextBatch:
        return TextBatch(
            *(None if t is None else fn(t) for t in (self.embeds, self.pooled, self.mask))
        )

    def to(self, device) -> TextBatch:
        return self._map(lambda t: t.to(device))

    def select(self, index) -> TextBatch:
        """Rows ``index`` (a slice or an int64 tensor of row numbers)."""
        return self._map(lambda t: t[index])

    def expand(self, batch: int) -> TextBatch:
        """A 1-row batch repeated to ``batch`` rows (a view)."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def __len__(self) -> int:
        return self.embeds.shape[0]


def family_of(model: nn.Module) -> str:
    """``"flux"`` or ``"sana"`` for a diffusers transformer; ``TypeError`` otherwise."""
    name = type(model).__name__
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "SanaTransformer2DModel":
        return "sana"
    raise TypeError(
        f"model: got a {name}; expected a diffusers FluxTransformer2DModel or "
        "SanaTransformer2DModel"
    )


def embedder(model: nn.Module) -> nn.Module:
    """The patch embedder DC-Gen replaces (FLUX ``x_embedder``, SANA ``patch_embed.proj``)."""
    return model.x_embedder if family_of(model) == "flux" else model.patch_embed.proj


def embedder_name(model: nn.Module) -> str:
    return "x_embedder" if family_of(model) == "flux" else "patch_embed.proj"


def head(model: nn.Module) -> nn.Linear:
    """The output projection DC-Gen replaces (``proj_out`` in both families)."""
    family_of(model)
    return model.proj_out


def has_guidance(model: nn.Module) -> bool:
    """Whether the model takes an embedded guidance scale (guidance-distilled, e.g. FLUX-dev)."""
    family_of(model)
    return bool(model.config.get("guidance_embeds", False))


def latent_patch_size(model: nn.Module, latent_channels: int) -> int:
    """The patch size ``p`` with which ``model`` consumes latents of ``latent_channels``.

    FLUX: ``in_channels = latent_channels * p**2`` (packing outside the model); SANA: the
    config's ``patch_size`` (and ``in_channels`` must equal ``latent_channels``).
    """
    cfg = model.config
    if family_of(model) == "flux":
        p = math.isqrt(cfg.in_channels // latent_channels) if latent_channels > 0 else 0
        if p < 1 or latent_channels * p * p != cfg.in_channels:
            raise ValueError(
                f"latent_channels: got {latent_channels}; a FLUX model with in_channels "
                f"{cfg.in_channels} needs latent_channels * p**2 == in_channels for an integer p"
            )
        return p
    if cfg.in_channels != latent_channels:
        raise ValueError(
            f"latent_channels: got {latent_channels}; the SANA model has in_channels "
            f"{cfg.in_channels}"
        )
    return int(cfg.patch_size)


def token_grid(latent_hw: tuple[int, int], p: int) -> tuple[int, int]:
    """Token grid (h, w) of a latent of spatial size ``latent_hw`` at patch size ``p``."""
    h, w = latent_hw
    if h % p or w % p:
        raise ValueError(f"latent size: got {h}x{w}; both sides must be multiples of p={p}")
    return h // p, w // p


def pack(z: torch.Tensor, p: int) -> torch.Tensor:
    """FLUX packing: latents [B, C, H, W] -> tokens [B, (H/p)(W/p), C*p*p], order (C, py, px).

    For ``p = 2`` this is exactly ``FluxPipeline._pack_latents``.
    """
    b, c, h, w = z.shape
    token_grid((h, w), p)
    z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // p) * (w // p), c * p * p)


def unpack(tokens: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """Inverse of :func:`pack`: tokens [B, h*w, C*p*p] -> latents [B, C, h*p, w*p]."""
    b, n, cpp = tokens.shape
    h, w = grid
    c = cpp // (p * p)
    if n != h * w or c * p * p != cpp:
        raise ValueError(
            f"tokens: got shape {tuple(tokens.shape)}; expected [B, {h * w}, C*{p * p}]"
        )
    z = tokens.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c, h * p, w * p)


def image_ids(grid: tuple[int, int], device=None) -> torch.Tensor:
    """FLUX position ids float32 [h*w, 3]: (0, row, col) per token, row-major."""
    h, w = grid
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] += torch.arange(h, device=device)[:, None]
    ids[..., 2] += torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def embed_tokens(model: nn.Module, module: nn.Module, z: torch.Tensor, p: int) -> torch.Tensor:
    """Apply a patch embedder ``module`` (of ``model``'s family) to latents.

    Parameters
    ----------
    z : float32 [B, C, H, W] scaled latents
    p : latent patch size

    Returns
    -------
    float32 [B, (H/p)(W/p), D] tokens, row-major over the token grid.
    """
    if family_of(model) == "flux":
        return module(pack(z, p))
    token_grid(z.shape[-2:], p)
    return module(z).flatten(2).transpose(1, 2)


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks whose image hidden states the alignment report compares."""
    if family_of(model) == "flux":
        return [(f"double.{i}", b) for i, b in enumerate(model.transformer_blocks)] + [
            (f"single.{i}", b) for i, b in enumerate(model.single_transformer_blocks)
        ]
    return [(f"block.{i}", b) for i, b in enumerate(model.transformer_blocks)]


def block_image_states(output) -> torch.Tensor:
    """Image hidden states [B, N, D] from a block's output (FLUX blocks return (text, image))."""
    return output[1] if isinstance(output, tuple) else output


def lora_targets(model: nn.Module, include_conv1x1: bool = True) -> list[str]:
    """Full names of every Linear (and 1x1 Conv2d: SANA's GLUMBConv) inside the blocks."""
    roots = ("transformer_blocks.", "single_transformer_blocks.")
    names = []
    for name, module in model.named_modules():
        if not name.startswith(roots):
            continue
        is_linear = isinstance(module, nn.Linear)
        is_pointwise = (
            include_conv1x1
            and isinstance(module, nn.Conv2d)
            and module.kernel_size == (1, 1)
            and module.groups == 1
        )
        if is_linear or is_pointwise:
            names.append(name)
    return names


def forward(
    model: nn.Module,
    z: torch.Tensor,
    text: TextBatch,
    sigma: torch.Tensor,
    guidance: torch.Tensor | None = None,
    p: int | None = None,
) -> torch.Tensor:
    """Run ``model`` the way its diffusers pipeline does; returns the velocity as a latent grid.

    Parameters
    ----------
    z : float32 [B, C, H, W] noisy scaled latents x_t
    text : conditioning for the batch (B rows)
    sigma : float32 [B] noise level in [0, 1] (x_t = sigma * eps + (1 - sigma) * x0)
    guidance : float32 [B] embedded guidance scale w, for guidance-embedding models (ignored
        with a model that has none; defaults to 1 for one that has)
    p : latent patch size (FLUX; inferred from in_channels and C when None)

    Returns
    -------
    float32 [B, C, H, W] predicted velocity (eps - x0).
    """
    b, c = z.shape[:2]
    cfg = model.config
    if has_guidance(model) and guidance is None:
        guidance = torch.ones(b, device=z.device)
    if family_of(model) == "flux":
        p = p or latent_patch_size(model, c)
        grid = token_grid(z.shape[-2:], p)
        out = model(
            hidden_states=pack(z, p),
            encoder_hidden_states=text.embeds,
            pooled_projections=text.pooled,
            timestep=sigma.to(z.dtype),
            img_ids=image_ids(grid, z.device),
            txt_ids=torch.zeros(text.embeds.shape[1], 3, device=z.device),
            guidance=guidance.to(z.dtype) if has_guidance(model) else None,
            return_dict=False,
        )[0]
        return unpack(out, grid, p)
    kwargs = {}
    if has_guidance(model):
        kwargs["guidance"] = guidance.to(z.dtype) * cfg.guidance_embeds_scale
    return model(
        hidden_states=z,
        encoder_hidden_states=text.embeds,
        encoder_attention_mask=text.mask,
        timestep=sigma.to(z.dtype) * 1000.0 * cfg.timestep_scale,
        return_dict=False,
        **kwargs,
    )[0]
