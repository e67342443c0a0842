"""The safetensors metadata of a Nunchaku v1.0 single file (NUNCHAKU_FORMAT.md section 4.2).

Every value is a string:

* ``config``: JSON of the diffusers transformer config; both Nunchaku loaders rebuild the model
  with ``from_config(json.loads(metadata["config"]))``, so a DC-Gen-adapted FLUX (other
  ``in_channels`` / ``out_channels``) rebuilds with its own embedder and head;
* ``quantization_config``: JSON ``{"method": "svdquant", "weight": {...}, "activation": {...},
  "rank": R}`` as ``nunchaku.merge_safetensors`` writes it (the C++ path checks the precision
  against the GPU; V2 reads ``rank``);
* ``comfy_config``: JSON ``{"model_class": "Flux" | "FluxSchnell", "model_config": {...}}`` for
  ComfyUI-nunchaku, whose FLUX loader needs both keys;
* ``model_class``: ``"NunchakuFluxTransformer2dModel"``.
"""

from __future__ import annotations

import json
from typing import Any

MODEL_CLASS = "NunchakuFluxTransformer2dModel"
DIFFUSERS_CLASS = "FluxTransformer2DModel"
EXPORT_KEY = "dcgen_quant_export"  # our provenance record (JSON); Nunchaku ignores it


def quantization_config(fmt: str, rank: int) -> dict[str, Any]:
    """Nunchaku's ``quantization_config`` for ``fmt`` ("int4" or "nvfp4") and ``rank``."""
    fp4 = fmt == "nvfp4"
    dtype = "fp4_e2m1_all" if fp4 else "int4"
    return {
        "method": "svdquant",
        "weight": {
            "dtype": dtype,
            "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
            "group_size": 16 if fp4 else 64,
        },
        "activation": {
            "dtype": dtype,
            "scale_dtype": "fp8_e4m3_nan" if fp4 else None,
            "group_size": 16 if fp4 else 64,
        },
        "rank": int(rank),
    }


def default_latent_patch_size(config: dict[str, Any]) -> int:
    """ComfyUI's ``patch_size`` for a diffusers FLUX config: 2 when the model outputs 64
    channels (FLUX.1's 16 latent channels in 2x2 patches, every BFL variant), else 1 (a
    DC-Gen-adapted FLUX on a deep-compression autoencoder, patch size 1)."""
    out = config.get("out_channels") or config.get("in_channels")
    return 2 if out == 64 else 1


def comfy_config(config: dict[str, Any], patch_size: int) -> dict[str, Any]:
    """ComfyUI-nunchaku's ``comfy_config`` for a diffusers FLUX config.

    ComfyUI's FLUX counts latent channels before patching (``in_channels`` 16, ``patch_size`` 2
    for FLUX.1-dev, whose diffusers ``in_channels`` is the packed 64).
    """
    p2 = patch_size * patch_size
    in_ch = int(config["in_channels"])
    out_ch = int(config.get("out_channels") or in_ch)
    if patch_size < 1 or in_ch % p2 or out_ch % p2:
        raise ValueError(
            f"--latent-patch-size {patch_size}: in_channels={in_ch} and out_channels={out_ch} "
            f"must be multiples of {p2}"
        )
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    guidance = bool(config.get("guidance_embeds", False))
    return {
        "model_class": "Flux" if guidance else "FluxSchnell",
        "model_config": {
            "axes_dim": list(config.get("axes_dims_rope", [16, 56, 56])),
            "context_in_dim": int(config["joint_attention_dim"]),
            "depth": int(config["num_layers"]),
            "depth_single_blocks": int(config["num_single_layers"]),
            "disable_unet_model_creation": True,
            "guidance_embed": guidance,
            "hidden_size": heads * head_dim,
            "image_model": "flux",
            "in_channels": in_ch // p2,
            "mlp_ratio": 4.0,  # diffusers' FLUX blocks are built with mlp_ratio 4.0
            "num_heads": heads,
            "out_channels": out_ch // p2,
            "patch_size": int(patch_size),
            "qkv_bias": True,
            "theta": 10000,  # diffusers' FluxPosEmbed theta
            "vec_in_dim": int(config["pooled_projection_dim"]),
        },
    }


def diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``config`` entry: the model's diffusers config with ``_class_name``."""
    out = {"_class_name": DIFFUSERS_CLASS}
    out.update({k: v for k, v in config.items() if k != "_class_name"})
    return out


def build_metadata(
    config: dict[str, Any], fmt: str, rank: int, patch_size: int, export: dict[str, Any]
) -> dict[str, str]:
    """All metadata strings of an exported FLUX file (``export``: our provenance record)."""
    return {
        "config": json.dumps(diffusers_config(config)),
        "quantization_config": json.dumps(quantization_config(fmt, rank)),
        "comfy_config": json.dumps(comfy_config(config, patch_size)),
        "model_class": MODEL_CLASS,
        EXPORT_KEY: json.dumps(export),
    }
