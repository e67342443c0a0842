"""Runtime fusion: the q/k/v projections of a FLUX attention run as one 4-bit GEMM.

The quantizer treats the projections that read the same input as one group: ``to_q`` /
``to_k`` / ``to_v`` (and, in FLUX's double-stream blocks, the text stream's ``add_q_proj`` /
``add_k_proj`` / ``add_v_proj``) share one smoothing vector, one down projection and, for NVFP4,
one tensor scale. :meth:`SVDQLinear.concat` can therefore stack them into one layer that
quantizes the activations once (one ``quantize_act`` instead of three) and runs one GEMM with
three times the output width, computing every output column exactly as its own layer does.

diffusers' ``FluxAttention`` already has the fused path: with ``attn.fused_projections`` set,
its processors (and :class:`dcgen_quant.attention_processor.DcgenFluxAttnProcessor`) call
``attn.to_qkv`` and ``attn.to_added_qkv`` and split the result. :func:`fuse_projections`
installs those layers and removes the members, so no weight is held twice.

Checkpoints always hold the members: :func:`dcgen_quant.checkpoint.save_quantized` saves a
fused model through :func:`unfused`, and :func:`unfuse_projections` restores the members
exactly. SANA is not fused: diffusers' SANA attention processors call ``to_q`` / ``to_k`` /
``to_v`` one by one.

A model on the meta device fuses too, where each group's members hold the same smoothing / down
projection / tensor-scale tensors (meta tensors have no values to compare, see
:meth:`SVDQLinear.concat`): that is how the latency model (``dcgen_quant.bench``) traces the
fused forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .nn import SVDQLinear

# (fused layer, members) of a FluxAttention, in diffusers' names
GROUPS = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)
# on a fused attention: ([(fused name, member names, out sizes)], submodule order before fusing)
_RECORD = "_dcgen_fused"


def _flux_attention_class():
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return FluxAttention


def _plan(attn: nn.Module) -> tuple[list[tuple[str, tuple[str, ...]]], str | None]:
    """The groups of ``attn`` to fuse, or (.., reason) why it cannot be fused as a whole."""
    groups = []
    for fused, members in GROUPS:
        layers = [getattr(attn, m, None) for m in members]
        if all(m is None for m in layers):
            continue
        if any(type(m) is not SVDQLinear for m in layers):
            kinds = sorted({type(m).__name__ for m in layers})
            return groups, f"{'/'.join(members)} are {', '.join(kinds)}, not all SVDQLinear"
        if reason := SVDQLinear.concat_mismatch(layers):
            return groups, f"{'/'.join(members)}: {reason}"
        groups.append((fused, members))
    if not groups:
        return groups, "no q/k/v projections"
    return groups, None


def fuse_projections(model: nn.Module) -> dict[str, str]:
    """Fuse the quantized q/k/v projections of every FLUX attention of ``model`` (in place).

    An attention is fused as a whole (diffusers reads either all fused or all separate
    projections) or not at all.

    Returns
    -------
    {attention module name: "fused", "already fused" or the reason it was left unfused}, for
    every FLUX attention whose projections are quantized.
    """
    flux_attention = _flux_attention_class()
    result = {}
    for name, attn in model.named_modules():
        if not isinstance(attn, flux_attention):
            continue
        if getattr(attn, _RECORD, None):
            result[name] = "already fused"
            continue
        if not any(isinstance(getattr(attn, m, None), SVDQLinear) for _, ms in GROUPS for m in ms):
            continue  # a 16-bit attention: diffusers' own fuse_projections serves it
        groups, reason = _plan(attn)
        if reason is not None:
            result[name] = reason
            continue
        record, order = [], list(attn._modules)
        for fused, members in groups:
            layers = [getattr(attn, m) for m in members]
            setattr(attn, fused, SVDQLinear.concat(layers))
            record.append((fused, members, [m.out_features for m in layers]))
            for m in members:
                delattr(attn, m)
        setattr(attn, _RECORD, (record, order))
        attn.fused_projections = True
        result[name] = "fused"
    return result


def unfuse_projections(model: nn.Module) -> list[str]:
    """Restore the member projections of every attention :func:`fuse_projections` fused.

    Exact: the members get back the tensors they had, in their old place among the
    attention's submodules (so ``state_dict`` keys come in the same order as before fusing).
    Returns the attention names unfused.
    """
    names = []
    for name, attn in list(model.named_modules()):
        saved = getattr(attn, _RECORD, None)
        if not saved:
            continue
        record, order = saved
        for fused, members, sizes in record:
            for member, layer in zip(members, getattr(attn, fused).split(sizes)):
                setattr(attn, member, layer)
            delattr(attn, fused)
        mods = attn._modules
        ordered = {k: mods[k] for k in order if k in mods}
        ordered.update({k: v for k, v in mods.items() if k not in ordered})
        mods.clear()
        mods.update(ordered)
        setattr(attn, _RECORD, None)
        attn.fused_projections = False
        names.append(name)
    return names


def is_fused(model: nn.Module) -> bool:
    return any(getattr(m, _RECORD, None) for m in model.modules())


@contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its projections unfused inside the block, fused again after it."""
    if not is_fused(model):
        yield model
        return
    unfuse_projections(model)
    try:
        yield model
    finally:
        fuse_projections(model)
