"""diffusers ``FluxTransformer2DModel``: double-stream blocks, then single-stream blocks.

Both block kinds take ``(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
joint_attention_kwargs)`` and return ``(encoder_hidden_states, hidden_states)``, so the last
double block hands its outputs to the first single block unchanged.

Per block (hidden = 3072 in FLUX.1):

* double: ``attn.to_q/k/v`` (image stream) and ``attn.add_q/k/v_proj`` (text stream) are two
  fused groups; ``attn.to_out.0``, ``attn.to_add_out``, ``ff.net.0.proj``, ``ff.net.2``,
  ``ff_context.net.0.proj``, ``ff_context.net.2`` are W4A4 alone (the two ``net.2`` read a
  tanh-GELU output, so INT4 quantizes their inputs unsigned); ``norm1.linear`` and
  ``norm1_context.linear`` (AdaLayerNormZero modulation) are W4A16;
* single: ``attn.to_q/k/v`` and ``proj_mlp`` read the same normalized input: one fused group;
  ``proj_out`` (attention + MLP concatenated, K = hidden * 5) alone, in INT4 split in two parts
  at column ``hidden`` (the MLP columns are a tanh-GELU output: unsigned codes); ``norm.linear``
  W4A16.

Kept in 16 bits: the embedders, the final AdaLayerNormContinuous and output projection, the
per-head RMSNorms (no linears) and attention itself.
"""

from __future__ import annotations

from .base import ModelFamily, register_family

FLUX = register_family(
    ModelFamily(
        name="flux",
        class_name="FluxTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        block_outputs=("encoder_hidden_states", "hidden_states"),
        fused=(
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        ),
        weight_only=("norm1.linear", "norm1_context.linear", "norm.linear"),
        gelu_inputs=("ff.net.2", "ff_context.net.2"),
        gelu_tails=(("proj_out", "proj_mlp"),),
        outside_reasons=(
            ("x_embedder", "image patch embedder (kept in 16 bits)"),
            ("context_embedder", "text embedder (kept in 16 bits)"),
            ("time_text_embed", "timestep / guidance / pooled-text embedder (kept in 16 bits)"),
            ("norm_out", "final AdaLayerNormContinuous (kept in 16 bits)"),
            ("proj_out", "final output projection (kept in 16 bits)"),
        ),
    )
)
