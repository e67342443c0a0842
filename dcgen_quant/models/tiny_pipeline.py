"""Tiny FLUX / SANA text-to-image pipelines built entirely in code (no files, no network).

Real diffusers pipeline classes around the tiny transformers of tiny.py, with tiny text encoders
(CLIP + T5 for FLUX, Gemma2 for SANA) from transformers configs, tiny autoencoders, and
character-level tokenizers constructed from in-memory vocabularies. Weights are random; the
point is that the pipelines *run* (and call their transformer exactly as for real models), so
that pipeline calibration capture can be tested offline.
"""

from __future__ import annotations

import string

import torch

from .tiny import TINY_FLUX_CONFIG, TINY_SANA_CONFIG, tiny_flux, tiny_sana

_CHARS = string.ascii_lowercase + string.digits + ".,"
_SPM_SPACE = "\u2581"  # sentencepiece's word-boundary marker


def _clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in _SPM_SPACE + _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _gemma_tokenizer(max_length: int):
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in _SPM_SPACE + _CHARS:
        vocab[c] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``FluxPipeline`` around :func:`dcgen_quant.models.tiny.tiny_flux` (CLIP + T5 + VAE).

    Call it with ``max_sequence_length <= 32`` (the T5 tokenizer's length) and an image size
    that is a multiple of 4 (the tiny VAE downsamples by 2 and FLUX packs 2x2 patches).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def build():
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=128, hidden_size=TINY_FLUX_CONFIG["pooled_projection_dim"],
                intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            )
        )  # fmt: skip
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=128, d_model=TINY_FLUX_CONFIG["joint_attention_dim"], d_kv=32,
                d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            )
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=TINY_FLUX_CONFIG["in_channels"] // 4,
            block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
            scaling_factor=0.3611, shift_factor=0.1159,
        )  # fmt: skip
        return clip, t5, vae

    clip, t5, vae = _seeded(seed, build)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae.to(dtype).eval(),
        text_encoder=clip.to(dtype).eval(),
        tokenizer=_clip_tokenizer(77),
        text_encoder_2=t5.to(dtype).eval(),
        tokenizer_2=_t5_tokenizer(32),
        transformer=tiny_flux(seed, dtype),
    )


def tiny_sana_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``SanaPipeline`` around :func:`dcgen_quant.models.tiny.tiny_sana` (Gemma2 + DC-AE).

    Call it with ``max_sequence_length <= 32`` and ``complex_human_instruction=None``.
    """
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    def build():
        gemma = Gemma2Model(
            Gemma2Config(
                vocab_size=128, hidden_size=TINY_SANA_CONFIG["caption_channels"],
                intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                pad_token_id=0, eos_token_id=1, bos_token_id=2,
            )
        )  # fmt: skip
        vae = AutoencoderDC(
            in_channels=3, latent_channels=TINY_SANA_CONFIG["in_channels"],
            attention_head_dim=8, encoder_block_types=("ResBlock", "ResBlock"),
            decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(16, 32),
            decoder_block_out_channels=(16, 32), encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
            decoder_qkv_multiscales=((), ()), upsample_block_type="interpolate",
            downsample_block_type="Conv", decoder_norm_types="rms_norm",
            decoder_act_fns="silu", scaling_factor=0.41,
        )  # fmt: skip
        return gemma, vae

    gemma, vae = _seeded(seed, build)
    return SanaPipeline(
        tokenizer=_gemma_tokenizer(32),
        text_encoder=gemma.to(dtype).eval(),
        vae=vae.to(dtype).eval(),
        transformer=tiny_sana(seed, dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
