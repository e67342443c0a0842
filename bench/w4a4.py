"""Turn a FLUX / SANA transformer into its W4A4 (SVDQuant) form for benchmarking.

Which layers become 4-bit is the quantizer's plan (``ModelFamily.plan_block`` with the default
QuantConfig, SVDQuant's recipe, REFERENCE.md section 2): every Linear (and SANA's 1x1
convolutions) inside the transformer blocks becomes an :class:`SVDQLinear` (4-bit weights and
activations, rank-32 16-bit low-rank branch); AdaLayerNorm modulation linears (``norm1.linear``,
``norm1_context.linear``, ``norm.linear``) become :class:`W4A16Linear` (4-bit weights, 16-bit
activations); embedders, the final norm and projection, norms and the attention math stay
16-bit. A layer whose input width is not a multiple of the format's group size stays 16-bit
(SANA's GLUMBConv ``conv_point`` has K = 5600, not a multiple of 64).

The weights are for timing only: on the meta device nothing is allocated; on a real device every
4-bit layer gets a *valid* random quantized weight (a random normal weight quantized by
:func:`dcgen_quant.formats.quantize_weight`) and random low-rank factors, so that kernels see
realistic codes and scales. This is not a calibrated model (use ``dcgen_quant.quantize`` for
that).

Following the same plan, INT4 FLUX layers that read a GELU output get unsigned activation codes,
and the single blocks' ``proj_out`` becomes a two-part :class:`SVDQSplitLinear`.

By default each FLUX attention's q/k/v (and added q/k/v) then run as one fused layer
(:func:`dcgen_quant.fusion.fuse_projections`), as a checkpoint loaded with ``fuse=True`` runs,
on meta as on a real device: the latency model's op trace sees one ``quantize_act`` and one
GEMM of three times the width per group, the kernels a fused model launches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcgen_quant.formats import quantize_weight
from dcgen_quant.models.base import PlannedGroup, family_for
from dcgen_quant.nn import SVDQLinear, SVDQSplitLinear
from dcgen_quant.quantize.config import QuantConfig
from dcgen_quant.quantize.layer import make_module, make_split_module

__all__ = ["convert_to_w4a4", "share_group_inputs_"]


def _set_random_(layer, weight_shape, generator) -> None:
    """Fill a 4-bit layer with a valid random quantized weight (on the layer's device)."""
    n, k = weight_shape
    dev = layer.qweight.device
    w = torch.randn(n, k, device=dev, generator=generator) / math.sqrt(k)
    qw = quantize_weight(w, layer.fmt, scale_dtype=layer.dtype)
    layer.qweight.copy_(qw.qweight)
    layer.wscales.copy_(qw.wscales)
    if qw.wtscale is not None:
        layer.wtscale.copy_(qw.wtscale)
    if getattr(layer, "bias", None) is not None:
        layer.bias.zero_()
    if isinstance(layer, SVDQLinear) and layer.rank:
        layer.smooth_factor.fill_(1.0)
        r = layer.rank
        layer.proj_down.copy_(torch.randn(k, r, device=dev, generator=generator) / math.sqrt(k))
        layer.proj_up.copy_(torch.randn(n, r, device=dev, generator=generator) / math.sqrt(r))


@torch.no_grad()
def convert_to_w4a4(
    model: nn.Module,
    fmt: str,
    rank: int = 32,
    seed: int = 0,
    fuse: bool = True,
) -> dict[str, int]:
    """Replace the block linears of ``model`` in place by 4-bit layers (see module docstring).

    Parameters
    ----------
    model : a diffusers FLUX or SANA transformer, on ``meta`` or a real device, 16-bit
    fmt : "int4" | "nvfp4"
    rank : rank of the low-rank branch of the SVDQLinear layers
    seed : seed of the random quantized weights (ignored on meta)
    fuse : give each FLUX attention's q/k/v (and added q/k/v) layers one smoothing vector,
        down projection and tensor scale, as the quantizer does, and run them fused
        (:func:`dcgen_quant.fusion.fuse_projections`), as a loaded model with ``fuse=True``
        runs; on meta too (the latency model's op trace). False: every projection separate

    Returns
    -------
    counts : ``{"w4a4": n, "w4a16": n, "kept": n, "unsigned": n, "split": n,
        "fused_attentions": n}``; "kept": block layers the plan keeps in 16 bits; unsigned and
        split layers are among the w4a4 ones
    """
    family = family_for(model)
    config = QuantConfig(format=fmt, rank=rank, skip_incompatible=True)
    counts = {"w4a4": 0, "w4a16": 0, "kept": 0, "unsigned": 0, "split": 0}
    generator = None
    for block_name, block in family.blocks(model):
        plan = family.plan_block(block_name, block, config)
        counts["kept"] += len(plan.skipped)
        for group in plan.groups:
            for name in group.names:
                module = model.get_submodule(name)
                layer = _empty_layer(module, group, rank, fmt)
                if module.weight.device.type != "meta":
                    if generator is None:
                        generator = torch.Generator(module.weight.device).manual_seed(seed)
                    for part in layer.parts if isinstance(layer, SVDQSplitLinear) else [layer]:
                        _set_random_(part, (part.out_features, part.in_features), generator)
                model.set_submodule(name, layer)
                counts[group.kind] += 1
                counts["split"] += group.split_at is not None
                counts["unsigned"] += group.act_unsigned
    counts["fused_attentions"] = _fuse(model) if fuse else 0
    return counts


def _empty_layer(module: nn.Module, group: PlannedGroup, rank: int, fmt: str) -> nn.Module:
    """The 4-bit layer that the plan's ``group`` makes of ``module`` (a Linear or 1x1 conv), as
    the quantizer builds it (an unsigned layer's bias holds the shift: always present)."""
    conv = isinstance(module, nn.Conv2d)
    if conv:
        k, n = module.in_channels, module.out_channels
    else:
        k, n = module.in_features, module.out_features
    dev, dtype, bias = module.weight.device, module.weight.dtype, module.bias is not None
    if group.split_at is not None:
        return make_split_module(k, n, group.split_at, rank, bias, fmt, dtype, dev)
    unsigned = group.act_unsigned
    return make_module(group.kind, conv, k, n, rank, bias or unsigned, fmt, dtype, dev, unsigned)


@torch.no_grad()
def share_group_inputs_(layers: list[SVDQLinear]) -> None:
    """Give ``layers`` the first one's smoothing, down projection and tensor scale, as the
    quantizer gives the members of a group that reads one input (so they can be fused).

    On a real device the values are copied. Meta tensors hold no values, so there the members
    get the first layer's tensors themselves, which :meth:`SVDQLinear.concat` accepts as shared.
    """
    first = layers[0]
    names = ("smooth_factor", "proj_down") + (("wtscale",) if first.wtscale is not None else ())
    for m in layers[1:]:
        for name in names:
            if first.proj_down.is_meta:
                setattr(m, name, getattr(first, name))
            else:
                getattr(m, name).copy_(getattr(first, name))


def _fuse(model: nn.Module) -> int:
    """Share the input-side tensors within each q/k/v group, then fuse; returns the count."""
    from dcgen_quant.fusion import GROUPS, fuse_projections

    for attn in model.modules():
        for _, members in GROUPS:
            layers = [getattr(attn, m, None) for m in members]
            if all(type(m) is SVDQLinear for m in layers):
                share_group_inputs_(layers)
    return sum(v == "fused" for v in fuse_projections(model).values())
