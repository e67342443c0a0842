"""diffusers attention processors that run FLUX / SANA softmax attention through
``dcgen_quant.ops.attention`` (the Triton or CUDA flash kernel on GPUs, the reference on CPU).

:func:`use_dcgen_attention` switches, in a diffusers model:

* every ``FluxAttention`` whose processor is the stock ``FluxAttnProcessor`` (FLUX joint
  attention: text and image tokens concatenated into one sequence, text first, RoPE applied to
  q and k exactly as diffusers does, with its own ``apply_rotary_emb``), in the double-stream
  and the single-stream blocks;
* every SANA attention whose processor is ``SanaAttnProcessor2_0``: SANA's *cross*-attention
  (image queries, text keys / values). SANA's self-attention is linear attention
  (``SanaLinearAttnProcessor2_0``, a ReLU kernel, no softmax) and is left as it is.

Masks: the flash kernel has no mask argument. A key-padding mask (the same for every head and
query, entries 0 for kept keys and <= -1e4 or False for dropped ones, which is what SANA builds
from ``encoder_attention_mask``) is served by dropping the padded keys per batch element; any
other mask falls back to the stock processor for that call.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops

__all__ = ["DcgenFluxAttnProcessor", "DcgenSanaAttnProcessor", "use_dcgen_attention"]

_DROPPED = -1.0e4  # an additive mask entry at or below this removes the key exactly in fp32


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> [B, S, H, D] through the custom op (which takes [B, H, S, D])."""
    o = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None)
    return o.transpose(1, 2)


def _kept_keys(mask: torch.Tensor, batch: int, s_kv: int) -> list[torch.Tensor] | None:
    """Indices of the kept keys per batch element if ``mask`` is a pure key-padding mask
    (broadcastable to [B, 1, 1, S_kv]), else None."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[-1] != s_kv or mask.shape[0] not in (1, batch):
        return None
    first = mask[:, :1, :1, :]
    if not bool((mask == first).all()):
        return None  # varies over heads or queries
    row = first.reshape(first.shape[0], s_kv).expand(batch, s_kv)
    if row.dtype == torch.bool:
        kept = row
    else:
        kept = row == 0
        if not bool((kept | (row <= _DROPPED)).all()):
            return None  # soft biases: not a padding mask
    keys = [kept[b].nonzero().flatten() for b in range(batch)]
    return None if any(k.numel() == 0 for k in keys) else keys


def _masked_attention(q, k, v, mask):
    """[B, S, H, D] attention with an optional mask; None if the mask is not key padding."""
    if mask is None:
        return _attention(q, k, v)
    keys = _kept_keys(mask, q.shape[0], k.shape[1])
    if keys is None:
        return None
    outs = [_attention(q[b : b + 1], k[b : b + 1, idx], v[b : b + 1, idx]) for b, idx in
            enumerate(keys)]  # fmt: skip
    return torch.cat(outs, dim=0)


def _flux_projections(attn, hidden_states, encoder_hidden_states):
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = (
            attn.to_q(hidden_states),
            attn.to_k(hidden_states),
            attn.to_v(hidden_states),
        )
    enc = (None, None, None)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            enc = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            enc = (
                attn.add_q_proj(encoder_hidden_states),
                attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states),
            )
    return query, key, value, *enc


class DcgenFluxAttnProcessor:
    """FLUX joint attention through ``dcgen_quant.ops.attention``; same inputs and outputs as
    diffusers' ``FluxAttnProcessor`` (hidden_states [B, S_img, C], encoder_hidden_states
    [B, S_txt, C], image_rotary_emb (cos, sin) [S_txt + S_img, D])."""

    def __init__(self, fallback=None):
        self.fallback = fallback  # the stock processor, for masks the kernel cannot serve

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value, e_query, e_key, e_value = _flux_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, S, H, D]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if e_query is not None:
            e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
            e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
            e_value = e_value.unflatten(-1, (-1, attn.head_dim))
            # joint attention: text tokens first, then image tokens, one sequence
            query = torch.cat([e_query, query], dim=1)
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = _masked_attention(query, key, value, attention_mask)
        if out is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 image_rotary_emb)  # fmt: skip
        hidden_states = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        s_txt = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :s_txt], hidden_states[:, s_txt:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class DcgenSanaAttnProcessor:
    """SANA (cross-)attention through ``dcgen_quant.ops.attention``; same inputs and outputs as
    diffusers' ``SanaAttnProcessor2_0`` (hidden_states [B, S, C], encoder_hidden_states
    [B, S_txt, C_txt], attention_mask: the additive key-padding bias SANA builds)."""

    def __init__(self, fallback=None):
        self.fallback = fallback

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attention_mask
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])

        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))

        out = _masked_attention(query, key, value, mask)
        if out is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask)
        hidden_states = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


def use_dcgen_attention(model: nn.Module) -> int:
    """Switch the FLUX / SANA softmax attention modules of ``model`` to the processors above.

    Parameters
    ----------
    model : a diffusers model (e.g. ``FluxTransformer2DModel``, ``SanaTransformer2DModel``) or
        any module containing such attention modules

    Returns
    -------
    int, how many attention modules were switched (0 if none was a stock FLUX / SANA softmax
    attention)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    switched = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is FluxAttnProcessor:
            module.set_processor(DcgenFluxAttnProcessor(fallback=processor))
        elif type(processor) is SanaAttnProcessor2_0:
            module.set_processor(DcgenSanaAttnProcessor(fallback=processor))
        else:
            continue
        switched += 1
    return switched
