"""Test helpers: tiny diffusers models whose layers are swapped for 4-bit layers with valid,
random-ish quantized contents (no calibration; for checkpoint and runtime tests)."""

from __future__ import annotations

import torch
from torch import nn

from dcgen_quant.formats import quantize_weight
from dcgen_quant.models.tiny import tiny_flux
from dcgen_quant.nn import SVDQLinear, W4A16Linear
from dcgen_quant.quantize.config import QuantConfig

# A quantizer configuration that runs in seconds on tiny models (a 2-point smoothing grid, one
# low-rank refinement, few tokens): for tests of plumbing, not of quantization quality.
FAST_QUANT = {"smooth_grid": 2, "lowrank_iters": 1, "calib_tokens": 512, "search_tokens": 256}
# Smaller still, for tests of plumbing and memory on many blocks: rank 4, one (alpha, beta) point,
# no refinement, 32 tokens, round-to-nearest's scales (GPTQ stays as configured).
MINIMAL_QUANT = {"rank": 4, "smooth_grid": 1, "lowrank_iters": 0, "calib_tokens": 32,
                 "search_tokens": 32, "clip": False}  # fmt: skip
# The same for the ``quantize`` command's tests of files, flags and errors: rank 4, one
# calibration sample of one step, a 2-point grid, one refinement, one thread.
CHEAP_CLI = ["--rank", "4", "--calib-samples", "1", "--steps", "1", "--threads", "1",
             "--smooth-grid", "2", "--lowrank-iters", "1"]  # fmt: skip


def fill_from_linear(layer, linear: nn.Linear, rank: int, g: torch.Generator) -> None:
    """Quantize ``linear.weight`` (round to nearest) into ``layer``; random low-rank factors."""
    qw = quantize_weight(linear.weight.detach().float(), layer.fmt, layer.wscales.dtype
                         if layer.fmt == "int4" else None)  # fmt: skip
    layer.qweight.copy_(qw.qweight)
    layer.wscales.copy_(qw.wscales)
    if qw.wtscale is not None:
        layer.wtscale.copy_(qw.wtscale)
    if layer.bias is not None:
        layer.bias.copy_(linear.bias.detach())
    if isinstance(layer, SVDQLinear):
        k, n = layer.in_features, layer.out_features
        layer.smooth_factor.copy_(torch.rand(k, generator=g) + 0.5)
        layer.proj_down.copy_(torch.randn(k, rank, generator=g) * 0.02)
        layer.proj_up.copy_(torch.randn(n, rank, generator=g) * 0.02)


def randomly_quantized_tiny_flux(
    fmt: str = "int4", rank: int = 4, seed: int = 0, dtype=torch.float32
):
    """Tiny FLUX with every block linear as SVDQLinear and AdaLayerNorm linears as W4A16Linear."""
    model = tiny_flux(seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and "transformer_blocks" in name and m.in_features % 64 == 0
    ]
    for name, linear in targets:
        bias = linear.bias is not None
        if name.endswith(".linear"):  # AdaLayerNorm modulation: weight-only
            layer = W4A16Linear(linear.in_features, linear.out_features, fmt, bias, dtype)
        else:
            layer = SVDQLinear(linear.in_features, linear.out_features, rank, fmt, bias, dtype)
        fill_from_linear(layer, linear, rank, g)
        model.set_submodule(name, layer)
    model.dcgen_quant_config = QuantConfig(format=fmt, rank=rank, dtype=dtype)
    return model


def tiny_flux_inputs(model, tokens: int = 64, text: int = 16, seed: int = 0) -> dict:
    """Random forward kwargs for a (tiny) FluxTransformer2DModel."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    dtype = next(model.parameters()).dtype
    side = int(tokens**0.5)
    img_ids = torch.stack(
        torch.meshgrid(
            torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij"
        ),
        -1,
    ).reshape(-1, 3)
    return {
        "hidden_states": torch.randn(1, side * side, c.in_channels, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim, generator=g).to(dtype),
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g).to(dtype),
        "timestep": torch.tensor([0.7]),
        "img_ids": img_ids.float(),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.tensor([3.5]) if c.guidance_embeds else None,
    }
