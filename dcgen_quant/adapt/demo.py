"""``python -m dcgen_quant adapt --demo``: the whole DC-Gen chain on tiny models, real images.

What the demo builds (all seeded, under ``OUT/inputs``), then hands to the same chain the CLI
runs on real directories:

- data: crops of scikit-image's photographs (random squares of 40-100% of the shorter side,
  saved as PNG with a caption sidecar). Training crops come from 11 images, held-out crops from
  4 *other* images, so held-out numbers measure generalization to unseen photographs.
- autoencoders (FLUX family): a small AutoencoderKL, f4 c16, which the tiny FLUX reads in 2x2
  packed patches (64 channels, an effective f8 token grid, like FLUX.1's f8c16 with 2x2
  patches); target: an AutoencoderDC f16 c32 at patch 1 (effective f16, like DC-AE f32c32 at
  patch 1 for FLUX): 4x fewer tokens. SANA family: base AutoencoderDC f8 c32 (as SANA's f32c32
  at patch 1), target AutoencoderDC f16 c128 (as DC-AE-1.5 f64c128): 4x fewer tokens.
- the autoencoders are random at construction, so the demo pre-trains each one for a few
  seconds on reconstruction (MSE, Adam, random half-resolution crops of the training images);
  latents then carry image structure instead of being random features. Their scaling factor
  (and the KL shift factor) is set so that the training latents have zero mean (KL) and unit
  standard deviation, as FLUX's and SANA's released factors do.
- base transformer: ``dcgen_quant.models.tiny`` (tiny FLUX or SANA, random weights); with
  ``pretrain_steps > 0`` it is first trained briefly with the flow-matching loss on the base
  latents so that it is a (weak) pretrained model with something to transfer.
- FLUX: a complete ``FluxPipeline`` directory with tiny CLIP and T5 text encoders (random
  weights, word-level tokenizer vocabularies made from the captions), so the text embeddings come
  from the pipeline's own encoders; SANA: a bare transformer directory, so the deterministic
  :class:`~dcgen_quant.adapt.data.HashedText` fallback is used.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_path, atomic_write_text

TRAIN_IMAGES = {
    "astronaut": "a portrait of an astronaut in a white space suit with a flag",
    "chelsea": "a tabby cat looking at the camera",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "rocket": "a rocket on a launch pad under a blue sky",
    "brick": "a grey brick wall texture",
    "immunohistochemistry": "a microscope image of stained tissue",
    "coins": "old coins on a dark background",
    "clock": "a black and white photo of a clock",
    "retina": "a photo of the retina of an eye",
    "grass": "a black and white photo of grass",
    "text": "black text printed on a white page",
}
HELDOUT_IMAGES = {
    "coffee": "a cup of coffee on a table",
    "hubble_deep_field": "galaxies in deep space",
    "colorwheel": "a color wheel",
    "moon": "the surface of the moon in black and white",
}


# The demo's FLUX: dcgen_quant.models.tiny's tiny FLUX at half the width (hidden 128 = 2 heads of
# 64), ~3x cheaper to train on a CPU; every linear's in_features is still a multiple of 64.
DEMO_FLUX = {"num_attention_heads": 2}

# max global gradient norm of the autoencoders' pre-training (see pretrain_ae)
AE_GRAD_CLIP = 1.0


@dataclass
class DemoConfig:
    """The demo's inputs. ``crops_train`` 64 and ``target_ae_steps`` 100 (were 24 and 400): with
    the stable autoencoder recipe, stage 2 (embedder + head on the frozen backbone) fits the
    training images well but generalizes worse to the held-out photographs the fewer training
    crops it sees and the more detail the target latents carry; measured in docs/ADAPT.md."""

    family: str = "flux"
    resolution: int = 64
    crops_train: int = 64
    crops_heldout: int = 4
    ae_steps: int = 150
    target_ae_steps: int = 100
    ae_lr: float = 1e-3
    pretrain_steps: int = 300
    pretrain_lr: float = 1e-3
    text_length: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.family not in ("flux", "sana"):
            raise ValueError(f"family: got {self.family!r}; expected 'flux' or 'sana'")
        if self.resolution % 32:
            raise ValueError(f"resolution: got {self.resolution}; expected a multiple of 32")


def write_images(folder: Path, names: dict[str, str], crops: int, size: int, seed: int) -> None:
    """Random square crops (40-100% of the shorter side) of skimage images, as PNG + caption."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, caption in names.items():
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
        w, h = img.size
        for k in range(crops):
            side = int(rng.integers(int(0.4 * min(w, h)), min(w, h) + 1))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize(
                (size, size), Image.Resampling.LANCZOS
            )
            crop.save(folder / f"{name}_{k:02d}.png")
            (folder / f"{name}_{k:02d}.txt").write_text(caption + "\n")


def tiny_kl(seed: int, latent_channels: int = 16):
    """AutoencoderKL f4 (3 levels), ~0.25M parameters."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            mid_block_add_attention=False,
        )


def tiny_dc(seed: int, latent_channels: int, levels: int):
    """AutoencoderDC with ``levels`` levels (f = 2**(levels-1)), ResBlocks only."""
    from diffusers import AutoencoderDC

    chans = list((16, 32, 32, 64, 64, 64)[:levels])
    # the encoder's output shortcut averages groups of last-level channels into latent channels,
    # so the last level needs at least as many channels as the latent
    chans[-1] = max(chans[-1], latent_channels)
    chans = tuple(chans)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderDC(
            in_channels=3,
            latent_channels=latent_channels,
            encoder_block_types="ResBlock",
            decoder_block_types="ResBlock",
            encoder_block_out_channels=chans,
            decoder_block_out_channels=chans,
            encoder_layers_per_block=(1,) * levels,
            decoder_layers_per_block=(1,) * levels,
            encoder_qkv_multiscales=((),) * levels,
            decoder_qkv_multiscales=((),) * levels,
        )


def ae_lr_factor(step: int, steps: int) -> float:
    """The autoencoders' learning-rate factor at ``step`` (0-based) of ``steps``: a linear
    warm-up over the first 5% of the steps (at least one), then a cosine decay towards 0 (it
    would reach 0 one step after the last)."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def pretrain_ae(ae, images: torch.Tensor, steps: int, lr: float, seed: int, progress=True):
    """Reconstruction pre-training; then sets scaling (and KL shift) factors. Returns PSNR (dB)
    of the trained autoencoder on ``images`` [N, 3, R, R] in [-1, 1].

    Adam at peak ``lr`` with :func:`ae_lr_factor`'s warm-up and cosine decay, the gradient's
    global norm clipped to ``AE_GRAD_CLIP``. Why: with a constant lr 2e-3 and no clipping (the
    first version) the target AutoencoderDC's training was chaotic: its raw latents grew to a
    std of ~200, and a 1e-6 change of the input images, or another CPU code path (AVX2 instead
    of AVX-512, oneDNN off), gave a different autoencoder (PSNR 15.7-17.5 dB) and a demo that
    passed or failed its acceptance test by machine. With this recipe the target's PSNR was
    19.1318 dB on AVX-512 and on AVX2, 19.1317 dB with the 1e-6 change (docs/ADAPT.md).
    """
    from tqdm.auto import tqdm

    from . import data as D

    kind = D.ae_kind(ae)
    ae.register_to_config(scaling_factor=1.0)
    if kind == "kl":
        ae.register_to_config(shift_factor=0.0)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    crop = images.shape[-1] // 2
    ae.train()
    for step in tqdm(range(steps), desc=f"pretrain {kind} AE", disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = lr * ae_lr_factor(step, steps)
        idx = torch.randint(images.shape[0], (8,), generator=gen)
        oy, ox = torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=gen).tolist()
        x = images[idx, :, oy : oy + crop, ox : ox + crop]
        z = ae.encode(x).latent_dist.mode() if kind == "kl" else ae.encode(x).latent
        loss = F.mse_loss(ae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), AE_GRAD_CLIP)
        opt.step()
    ae.eval()
    with torch.no_grad():
        z = ae.encode(images).latent_dist.mode() if kind == "kl" else ae.encode(images).latent
        shift = float(z.mean()) if kind == "kl" else 0.0
        scale = 1.0 / float((z - shift).std())
        ae.register_to_config(scaling_factor=scale)
        if kind == "kl":
            ae.register_to_config(shift_factor=shift)
        rec = D.decode(ae, D.encode(ae, images))
    mse = float(F.mse_loss(rec.clamp(-1, 1), images))
    return 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def _word_tokenizers(captions: list[str]):
    """A character-level CLIP tokenizer and a word-level T5 tokenizer built in code."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    words = sorted({w for c in captions for w in re.findall(r"\w+", c.lower())})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(ch, -10.0) for ch in chars]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0)
    return clip, t5


def tiny_flux_pipeline(transformer, vae, captions: list[str], seed: int):
    """A FluxPipeline with tiny random CLIP / T5 text encoders sized for ``transformer``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = _word_tokenizers(captions)
    cfg = transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=cfg.pooled_projection_dim,
                intermediate_size=2 * cfg.pooled_projection_dim,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                projection_dim=cfg.pooled_projection_dim,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=cfg.joint_attention_dim,
                d_kv=32,
                d_ff=2 * cfg.joint_attention_dim,
                num_layers=2,
                num_heads=4,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=clip_tok,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def pretrain_base(model, z: torch.Tensor, text_encoder, captions, steps, lr, seed, progress):
    """Brief flow-matching pre-training of the base transformer on base latents (w = 1)."""
    from . import family as fam
    from .flow import FlowObjective, flow_loss
    from .train import TrainConfig, train

    texts = text_encoder.encode(captions)
    empty = text_encoder.encode([""])
    p = fam.latent_patch_size(model, z.shape[1])
    # the same objective stage 3 uses: a guidance-embedding base becomes guidance-distilled
    obj = FlowObjective(guidance="distilled" if fam.has_guidance(model) else "fixed", text_drop=0.1)

    def loss_fn(step, gen):
        idx = torch.randint(z.shape[0], (8,), generator=gen)
        return flow_loss(model, z[idx], texts.select(idx), empty, gen, obj, p)

    params = dict(model.named_parameters())
    train(
        "pretrain", params, loss_fn, TrainConfig(steps=steps, lr=lr, seed=seed), progress=progress
    )
    for param in model.parameters():
        param.requires_grad_(False)


def build_inputs(root: str | Path, cfg: DemoConfig, progress: bool = True) -> dict:
    """Create (or reuse, when already built with the same config) the demo's input directories.

    Returns the paths and measurements as a dict: base, base_ae (SANA) , target_ae, data,
    heldout, ae_psnr.
    """
    from ..models.tiny import tiny_flux, tiny_sana
    from . import data as D
    from . import family as fam

    root = Path(root)
    marker = root / "inputs.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("config") == asdict(cfg):
            return info
        raise ValueError(
            f"out: {root} was built with demo config {info.get('config')}; now "
            f"{asdict(cfg)}; use another --out"
        )
    with atomic_path(root, directory=True) as tmp:
        r = cfg.resolution
        write_images(tmp / "data", TRAIN_IMAGES, cfg.crops_train, r + r // 2, cfg.seed)
        write_images(tmp / "heldout", HELDOUT_IMAGES, cfg.crops_heldout, r + r // 2, cfg.seed + 1)
        items = D.scan_folder(tmp / "data", "a photo")
        images = torch.stack([D.load_image(it.path, r) for it in items])
        if cfg.family == "flux":
            base_ae, target_ae = tiny_kl(cfg.seed), tiny_dc(cfg.seed + 1, 32, 5)
        else:
            base_ae, target_ae = tiny_dc(cfg.seed, 32, 4), tiny_dc(cfg.seed + 1, 128, 5)
        psnr = {
            "base": pretrain_ae(base_ae, images, cfg.ae_steps, cfg.ae_lr, cfg.seed, progress),
            "target": pretrain_ae(
                target_ae, images, cfg.target_ae_steps, cfg.ae_lr, cfg.seed + 1, progress
            ),
        }
        if cfg.family == "flux":
            base = tiny_flux(seed=cfg.seed, **DEMO_FLUX)
        else:
            base = tiny_sana(seed=cfg.seed)
        captions = [it.caption for it in items]
        if cfg.family == "flux":
            # the tokenizers' vocabulary covers every caption, held-out ones included (a real
            # tokenizer knows words the training captions lack; built from the training captions
            # alone, held-out captions would become unknown-character pieces)
            vocab = sorted(set(captions) | set(HELDOUT_IMAGES.values())) + [""]
            pipe = tiny_flux_pipeline(base, base_ae, vocab, cfg.seed)
            from .data import PipelineText

            encoder = PipelineText(pipe, cfg.text_length, "demo")
        else:
            bc = base.config
            encoder = D.HashedText(bc.caption_channels, None, cfg.text_length, mask=True)
        if cfg.pretrain_steps:
            z = D.encode(base_ae, images)
            pretrain_base(
                base, z, encoder, captions, cfg.pretrain_steps, cfg.pretrain_lr, cfg.seed, progress
            )
        if cfg.family == "flux":
            pipe.save_pretrained(tmp / "base")
            info = {"base": str(root / "base"), "base_ae": None}
        else:
            base.save_pretrained(tmp / "base")
            base_ae.save_pretrained(tmp / "base_ae")
            info = {"base": str(root / "base"), "base_ae": str(root / "base_ae")}
        target_ae.save_pretrained(tmp / "target_ae")
        info.update(
            {
                "target_ae": str(root / "target_ae"),
                "data": str(root / "data"),
                "heldout": str(root / "heldout"),
                "ae_psnr_db": psnr,
                "base_patch_size": fam.latent_patch_size(base, base_ae.config.latent_channels),
                "config": asdict(cfg),
            }
        )
        atomic_write_text(tmp / "inputs.json", json.dumps(info, indent=2) + "\n")
    return info
