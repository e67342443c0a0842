"""DC-Gen surgery: a new patch embedder and output head for a new latent space.

Everything but the two layers stays the base model's (same weights). The model config is
updated (``in_channels``, ``out_channels``, and for SANA ``patch_size`` / ``sample_size``) so that
``save_pretrained`` / ``from_pretrained`` round-trip into the same diffusers class.

Initialization (documented choice)
----------------------------------
- Embedder, ``embedder_init="default"``: the layer's own PyTorch initialization (uniform in
  +-1/sqrt(fan_in), what diffusers gives any freshly built layer), drawn from a generator seeded
  with ``seed``. On unit-variance latents its outputs have variance ~1/3, the same order as a
  trained embedder's, and stage 1 replaces it anyway. ``"zeros"`` is available. A least-squares
  fit to the teacher (:func:`dcgen_quant.adapt.stages.lstsq_embedder`) is *not* used as the init:
  it needs latent pairs, and on badly conditioned latents it produces huge weights along
  directions that the noise of x_t excites (see its docstring).
- Head, ``head_init="zeros"`` (default): the adapted model then predicts v = 0 before stage 2,
  whose flow-matching loss E||eps - x0||^2 is a known, finite baseline; a random head would add
  an arbitrary random projection of the final hidden states to every prediction, inflating the
  first stage-2 gradients into the embedder. Zero-initialized final layers are the DiT / adaLN-zero
  convention. The gradient into the head is non-zero from the first step (it is the outer
  product of the error and the hidden states), so nothing is stuck. ``"default"`` is available.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from . import family as fam

SIDECAR = "dcgen_adapt.json"
_INITS = ("default", "zeros")


def _init_layer(layer: nn.Module, how: str, seed: int, what: str) -> None:
    if how not in _INITS:
        raise ValueError(f"{what}: got {how!r}; expected one of {_INITS}")
    if how == "zeros":
        with torch.no_grad():
            for param in layer.parameters():
                param.zero_()
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer.reset_parameters()


def surgery(
    base_transformer: nn.Module,
    new_channels: int,
    new_patch_size: int,
    *,
    embedder_init: str = "default",
    head_init: str = "zeros",
    sample_size: int | None = None,
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Build the adapted transformer for a new autoencoder's latent space.

    Parameters
    ----------
    base_transformer : a diffusers ``FluxTransformer2DModel`` or ``SanaTransformer2DModel``
    new_channels : latent channels ``C`` of the new autoencoder
    new_patch_size : patch size ``p`` on the new latent (DC-Gen uses 1 on DC-AE f32 / f64)
    embedder_init, head_init : ``"default"`` or ``"zeros"`` (see the module docstring)
    sample_size : SANA only, the new latent size at the training resolution (config
        ``sample_size``); the base's value is kept when None
    seed : seeds the random initialization
    inplace : modify ``base_transformer`` itself instead of a deep copy (saves memory at full
        scale; the base embedder and head are then gone)

    Returns
    -------
    The adapted model (same class), with the new embedder / head in the base's dtype and device.
    New embedder: FLUX ``x_embedder`` Linear(C*p*p, D); SANA ``patch_embed.proj`` Conv2d(C, D,
    kernel p, stride p). New head: ``proj_out`` Linear(D, C*p*p).
    """
    family = fam.family_of(base_transformer)
    for name, value in (("new_channels", new_channels), ("new_patch_size", new_patch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: got {value!r}; expected a positive int")
    model = base_transformer if inplace else copy.deepcopy(base_transformer)
    old = fam.embedder(model)
    ref = next(old.parameters())
    dim = model.proj_out.in_features
    c, p = new_channels, new_patch_size
    with torch.random.fork_rng(devices=[]):  # building layers must not consume the caller's RNG
        if family == "flux":
            if model.config.patch_size != 1:
                raise ValueError(
                    f"base_transformer: FLUX config patch_size is {model.config.patch_size}; "
                    "expected 1 (FLUX packs latent patches outside the model)"
                )
            model.x_embedder = nn.Linear(c * p * p, dim)
            model.register_to_config(in_channels=c * p * p, out_channels=c * p * p)
            model.out_channels = c * p * p
        else:
            from diffusers.models.embeddings import PatchEmbed

            cfg = model.config
            size = int(sample_size or cfg.sample_size)
            scale = cfg.interpolation_scale
            model.patch_embed = PatchEmbed(
                height=size,
                width=size,
                patch_size=p,
                in_channels=c,
                embed_dim=dim,
                interpolation_scale=scale,
                pos_embed_type="sincos" if scale is not None else None,
            ).to(ref.device)
            model.register_to_config(in_channels=c, out_channels=c, patch_size=p, sample_size=size)
        model.proj_out = nn.Linear(dim, c * p * p)
    new_embed, new_head = fam.embedder(model), model.proj_out
    _init_layer(new_embed, embedder_init, seed, "embedder_init")
    _init_layer(new_head, head_init, seed + 1, "head_init")
    new_embed.to(device=ref.device, dtype=ref.dtype)
    new_head.to(device=ref.device, dtype=ref.dtype)
    return model


def save_adapted(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """``save_pretrained`` into ``path`` atomically, plus a ``dcgen_adapt.json`` sidecar.

    The sidecar records what a pipeline needs beyond the diffusers config (latent channels,
    latent patch size, autoencoder, reconciliation, stages done). ``from_pretrained`` ignores it.
    """
    path = Path(path)
    with atomic_path(path, directory=True, replaceable=_is_saved_model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if meta is not None:
            (tmp / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def _is_saved_model_dir(path: Path) -> bool:
    """Whether ``path`` holds only what :func:`save_adapted` writes (so it may be replaced)."""
    allowed = ("config.json", SIDECAR, "diffusion_pytorch_model*.safetensors", "*.index.json")
    names = [p.name for p in path.iterdir()]
    return "config.json" in names and all(
        any(fnmatch.fnmatch(n, pattern) for pattern in allowed) for n in names
    )


def load_adapted(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Load a directory written by :func:`save_adapted`: (model, sidecar dict or {})."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"path: {path} has no config.json; expected a diffusers model dir")
    cls_name = json.loads(config.read_text()).get("_class_name")
    import diffusers

    if cls_name not in ("FluxTransformer2DModel", "SanaTransformer2DModel"):
        raise ValueError(
            f"path: {path} holds a {cls_name}; expected FluxTransformer2DModel or "
            "SanaTransformer2DModel"
        )
    model = getattr(diffusers, cls_name).from_pretrained(path, local_files_only=True)
    sidecar = path / SIDECAR
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return model.to(device).eval(), meta
