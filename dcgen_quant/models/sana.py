"""diffusers ``SanaTransformer2DModel``: one list of blocks.

A block is called positionally as ``(hidden_states, attention_mask, encoder_hidden_states,
encoder_attention_mask, timestep, height, width)`` and returns ``hidden_states``.

Per block: ``attn1.to_q/k/v`` (linear self-attention, same input) are one fused group;
``attn2.to_k/v`` (cross-attention, reading the caption) another; ``attn2.to_q``,
``attn1.to_out.0`` and ``attn2.to_out.0`` are alone. The GLUMBConv feed-forward's
``conv_inverted`` and ``conv_point`` are 1x1 convolutions, i.e. linears over channels: they become
``SVDQConv1x1``. Its ``conv_depth`` (depthwise 3x3) stays 16-bit. SANA's AdaLayerNorm is
"single": the block modulation is a learned table plus the top-level ``time_embed`` output, so
there is no modulation linear inside the blocks.

Kept in 16 bits: ``patch_embed``, ``time_embed`` (AdaLayerNormSingle / timestep-guidance
embedder), ``caption_projection``, ``caption_norm``, ``norm_out`` and ``proj_out``.
"""

from __future__ import annotations

from .base import ModelFamily, register_family

SANA = register_family(
    ModelFamily(
        name="sana",
        class_name="SanaTransformer2DModel",
        block_lists=("transformer_blocks",),
        block_outputs=("hidden_states",),
        fused=(
            ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
            ("attn2.to_k", "attn2.to_v"),
        ),
        block_skips=(("ff.conv_depth", "depthwise 3x3 convolution (kept in 16 bits)"),),
        outside_reasons=(
            ("patch_embed", "patch embedder (kept in 16 bits)"),
            ("time_embed", "timestep embedder / AdaLayerNormSingle (kept in 16 bits)"),
            ("caption_projection", "caption projection (kept in 16 bits)"),
            ("caption_norm", "caption norm (kept in 16 bits)"),
            ("norm_out", "final norm (kept in 16 bits)"),
            ("proj_out", "final output projection (kept in 16 bits)"),
        ),
    )
)
