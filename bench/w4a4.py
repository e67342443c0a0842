"""Turn a FLUX / SANA transformer into its W4A4 (SVDQuant) form for benchmarking.

Which layers become 4-bit follows SVDQuant's recipe (REFERENCE.md section 2): every Linear (and
SANA's 1x1 convolutions) inside the transformer blocks becomes an :class:`SVDQLinear` (4-bit
weights and activations, rank-32 16-bit low-rank branch); AdaLayerNorm modulation linears
(``norm1.linear``, ``norm1_context.linear``, ``norm.linear``) become :class:`W4A16Linear`
(4-bit weights, 16-bit activations); embedders, the final norm and projection, norms and the
attention math stay 16-bit. A layer whose input width is not a multiple of the format's group
size stays 16-bit (SANA's GLUMBConv ``conv_point`` has K = 5600, not a multiple of 64).

The weights are for timing only: on the meta device nothing is allocated; on a real device every
4-bit layer gets a *valid* random quantized weight (a random normal weight quantized by
:func:`dcgen_quant.formats.quantize_weight`) and random low-rank factors, so that kernels see
realistic codes and scales. This is not a calibrated model (use ``dcgen_quant.quantize`` for
that).

INT4 FLUX layers that read a GELU output get unsigned activation codes, and the single blocks'
``proj_out`` becomes a two-part :class:`SVDQSplitLinear`, as the quantizer's plan for the model
decides (``ModelFamily.plan_block`` with the default QuantConfig).

By default each FLUX attention's q/k/v (and added q/k/v) then run as one fused layer
(:func:`dcgen_quant.fusion.fuse_projections`), as a checkpoint loaded with ``fuse=True`` runs,
on meta as on a real device: the latency model's op trace sees one ``quantize_act`` and one
GEMM of three times the width per group, the kernels a fused model launches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcgen_quant.formats import get_format, quantize_weight
from dcgen_quant.nn import SVDQConv1x1, SVDQLinear, SVDQSplitLinear, W4A16Conv1x1, W4A16Linear

__all__ = ["convert_to_w4a4", "share_group_inputs_", "BLOCK_PREFIXES", "MODULATION_SUFFIXES"]

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
MODULATION_SUFFIXES = ("norm1.linear", "norm1_context.linear", "norm.linear")


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.groups == 1
    )


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
        "fused_attentions": n}`` (unsigned and split layers are among the w4a4 ones)
    """
    from dcgen_quant.quantize.layer import make_split_module

    group = get_format(fmt).group_size
    counts = {"w4a4": 0, "w4a16": 0, "kept": 0, "unsigned": 0, "split": 0}
    unsigned, splits = _gelu_plan(model, fmt)
    generator = None
    targets = []
    for name, module in model.named_modules():
        if not name.startswith(BLOCK_PREFIXES):
            continue
        if isinstance(module, nn.Linear):
            targets.append((name, module, module.in_features, module.out_features, False))
        elif isinstance(module, nn.Conv2d) and _is_pointwise(module):
            targets.append((name, module, module.in_channels, module.out_channels, True))
    for name, module, k, n, conv in targets:
        if k % group:
            counts["kept"] += 1
            continue
        weight_only = name.endswith(MODULATION_SUFFIXES)
        dev, dtype = module.weight.device, module.weight.dtype
        bias = module.bias is not None
        if weight_only:
            cls = W4A16Conv1x1 if conv else W4A16Linear
            layer = cls(k, n, fmt=fmt, bias=bias, dtype=dtype, device=dev)
        elif name in splits:
            layer = make_split_module(k, n, splits[name], rank, bias, fmt, dtype, dev)
            counts["split"] += 1
        else:
            cls = SVDQConv1x1 if conv else SVDQLinear
            u = name in unsigned  # an unsigned layer's bias holds the shift: always present
            layer = cls(k, n, rank=rank, fmt=fmt, bias=bias or u, dtype=dtype, device=dev,
                        act_unsigned=u)  # fmt: skip
            counts["unsigned"] += u
        if dev.type != "meta":
            if generator is None:
                generator = torch.Generator(device=dev).manual_seed(seed)
            for part in layer.parts if isinstance(layer, SVDQSplitLinear) else [layer]:
                _set_random_(part, (n, part.in_features), generator)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        counts["w4a16" if weight_only else "w4a4"] += 1
    counts["fused_attentions"] = _fuse(model) if fuse else 0
    return counts


def _gelu_plan(model: nn.Module, fmt: str) -> tuple[set[str], dict[str, int]]:
    """(linears with unsigned activations, {linear: split position}) as the quantizer plans
    them for ``model`` in ``fmt`` with the default QuantConfig (none for NVFP4 or SANA)."""
    from dcgen_quant.models.base import family_for
    from dcgen_quant.quantize.config import QuantConfig

    family = family_for(model)
    config = QuantConfig(format=fmt, skip_incompatible=True)
    unsigned, splits = set(), {}
    for block_name, block in family.blocks(model):
        for group in family.plan_block(block_name, block, config).groups:
            if group.act_unsigned:
                unsigned.update(group.names)
            if group.split_at is not None:
                splits[group.names[0]] = group.split_at
    return unsigned, splits


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
