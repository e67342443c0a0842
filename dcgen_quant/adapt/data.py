"""Training data: an image folder, captions, text embeddings and cached latent pairs.

Folder format: image files (png, jpg, jpeg, webp, bmp, tif, tiff) of any size, each optionally
with a sidecar caption ``<stem>.txt`` (UTF-8, whitespace-stripped); images without one get the
default caption. Every image is resized (shorter side to the resolution, Lanczos) and
center-cropped to resolution x resolution, RGB in [-1, 1].

Latents: the posterior mean of an AutoencoderKL (``latent_dist.mode()``, deterministic), then
``(z - shift_factor) * scaling_factor`` as the FLUX pipeline scales them; an AutoencoderDC's
``latent * scaling_factor``. Both autoencoders' latents of every image are computed once and
cached in ``<out>/cache/latents-<fingerprint>.pt``; the fingerprint covers the image bytes, the
resolution and both autoencoders (config + weight files), so a stale cache is never used.

Text embeddings come from the pipeline's own text encoders (``FluxPipeline.encode_prompt`` /
``SanaPipeline.encode_prompt``) when the base directory is a pipeline with them, else from
:class:`HashedText`, a documented deterministic stand-in for tiny demos. They are computed once
per distinct caption (plus the empty prompt) and cached in ``<out>/cache/text-<fingerprint>.pt``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_path
from .family import TextBatch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class ImageItem:
    path: Path
    caption: str


def scan_folder(data_dir: str | Path, default_caption: str) -> list[ImageItem]:
    """Images of ``data_dir`` (sorted by name) with their captions."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise NotADirectoryError(f"data: {data_dir} is not a directory of images")
    items = []
    for path in sorted(data_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
            continue
        side = path.with_suffix(".txt")
        caption = side.read_text(encoding="utf-8").strip() if side.is_file() else default_caption
        items.append(ImageItem(path, caption))
    if not items:
        raise FileNotFoundError(f"data: {data_dir} holds no images ({', '.join(IMAGE_EXTS)})")
    return items


def split_holdout(items: list[ImageItem], holdout: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(train, held-out): the ``holdout`` images with the smallest sha1(file name) are held out,
    a split that does not depend on the order or number of the other files."""
    if not 0 < holdout < len(items):
        raise ValueError(
            f"holdout: got {holdout}; expected 1 .. {len(items) - 1} for {len(items)} images"
        )
    ranked = sorted(items, key=lambda it: hashlib.sha1(it.path.name.encode()).hexdigest())
    held = {it.path for it in ranked[:holdout]}
    return [it for it in items if it.path not in held], [it for it in items if it.path in held]


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """float32 [3, R, R] in [-1, 1]: RGB, shorter side resized to R, center crop."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


# ---------------------------------------------------------------- autoencoders


def ae_kind(ae) -> str:
    """``"kl"`` (AutoencoderKL) or ``"dc"`` (AutoencoderDC)."""
    name = type(ae).__name__
    if name == "AutoencoderKL":
        return "kl"
    if name == "AutoencoderDC":
        return "dc"
    raise TypeError(f"autoencoder: got a {name}; expected AutoencoderKL or AutoencoderDC")


def ae_downsample(ae) -> int:
    """Spatial compression factor of an autoencoder."""
    cfg = ae.config
    chans = cfg.block_out_channels if ae_kind(ae) == "kl" else cfg.encoder_block_out_channels
    return 2 ** (len(chans) - 1)


@torch.no_grad()
def encode(ae, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents float32 [B, C, R/f, R/f] of images float32 [B, 3, R, R] in [-1, 1]."""
    cfg = ae.config
    x = images.to(next(ae.parameters()).device, next(ae.parameters()).dtype)
    if ae_kind(ae) == "kl":
        z = ae.encode(x).latent_dist.mode()
        z = (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    else:
        z = ae.encode(x).latent * cfg.scaling_factor
    return z.float().cpu()


@torch.no_grad()
def decode(ae, z: torch.Tensor) -> torch.Tensor:
    """Images float32 [B, 3, H, W] in about [-1, 1] from scaled latents [B, C, h, w]."""
    cfg = ae.config
    z = z.to(next(ae.parameters()).device, next(ae.parameters()).dtype)
    if ae_kind(ae) == "kl":
        return ae.decode(z / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample.float().cpu()
    return ae.decode(z / cfg.scaling_factor).sample.float().cpu()


def dir_fingerprint(path: str | Path) -> str:
    """sha1 of a model directory's config files and its weight files' names, sizes, mtimes."""
    path = Path(path)
    h = hashlib.sha1(str(path.resolve()).encode())
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        if f.suffix == ".json" and st.st_size < 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()


def _file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def cached_latents(
    cache_dir: str | Path,
    items: list[ImageItem],
    resolution: int,
    encoders: dict,
    fingerprints: dict[str, str],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Latents of every image under every autoencoder, computed once and cached.

    Parameters
    ----------
    items : the images
    encoders : name -> autoencoder (e.g. ``{"base": vae, "new": dc_ae}``)
    fingerprints : name -> a string identifying that autoencoder's weights

    Returns
    -------
    dict: ``names`` (file names), and per encoder name a float32 [N, C, h, w] tensor.
    """
    from tqdm.auto import tqdm

    key = hashlib.sha1()
    key.update(json.dumps([resolution, sorted(fingerprints.items())]).encode())
    for it in items:
        key.update(f"{it.path.name}:{_file_sha1(it.path)}".encode())
    path = Path(cache_dir) / f"latents-{key.hexdigest()[:20]}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    out: dict = {"names": [it.path.name for it in items]}
    chunks: dict[str, list] = {name: [] for name in encoders}
    for i in tqdm(
        range(0, len(items), batch_size), desc="encode latents", disable=not progress, leave=False
    ):
        imgs = torch.stack([load_image(it.path, resolution) for it in items[i : i + batch_size]])
        for name, ae in encoders.items():
            chunks[name].append(encode(ae, imgs))
    for name in encoders:
        out[name] = torch.cat(chunks[name])
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    return out


# ---------------------------------------------------------------- text


def _hash_vector(key: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % (2**63)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class HashedText:
    """Deterministic stand-in text encoder for tiny demos (no text model is loaded).

    A caption is lower-cased and split into words (``\\w+``); word i of the first ``length``
    becomes a unit-variance Gaussian vector seeded by sha256 of the word (so captions that share
    words share embeddings), the remaining positions a fixed ``<pad>`` vector. The pooled vector
    (FLUX) is the sum of per-word vectors seeded by ``"pooled:" + word``, divided by sqrt(words)
    (unit variance); an empty caption gets the ``<empty>`` vector. The mask (SANA) is 1 on the
    words and on the first pad position (an end-of-text token), 0 elsewhere.
    """

    def __init__(self, dim: int, pooled_dim: int | None = None, length: int = 16, mask=False):
        self.dim, self.pooled_dim, self.length, self.mask = dim, pooled_dim, length, mask
        self.fingerprint = f"hashed-v1:{dim}:{pooled_dim}:{length}:{mask}"

    def encode(self, captions: list[str]) -> TextBatch:
        embeds, pooled, masks = [], [], []
        for caption in captions:
            words = re.findall(r"\w+", caption.lower())[: self.length]
            rows = [_hash_vector("word:" + w, self.dim) for w in words]
            rows += [_hash_vector("<pad>", self.dim)] * (self.length - len(words))
            embeds.append(torch.stack(rows))
            if self.pooled_dim:
                if words:
                    vec = sum(_hash_vector("pooled:" + w, self.pooled_dim) for w in words)
                    pooled.append(vec / len(words) ** 0.5)
                else:
                    pooled.append(_hash_vector("<empty>", self.pooled_dim))
            m = torch.zeros(self.length)
            m[: min(self.length, len(words) + 1)] = 1.0
            masks.append(m)
        return TextBatch(
            torch.stack(embeds),
            torch.stack(pooled) if self.pooled_dim else None,
            torch.stack(masks) if self.mask else None,
        )


class PipelineText:
    """Text embeddings from a diffusers FLUX / SANA pipeline's own text encoders.

    Parameters
    ----------
    pipe : a ``FluxPipeline`` or ``SanaPipeline`` (its transformer and vae may be None)
    length : max_sequence_length passed to ``encode_prompt``
    fingerprint : identifies the encoders' weights (e.g. :func:`dir_fingerprint` of the dir)
    """

    def __init__(self, pipe, length: int, fingerprint: str, batch_size: int = 8):
        self.pipe, self.length, self.batch_size = pipe, length, batch_size
        self.kind = type(pipe).__name__
        if self.kind not in ("FluxPipeline", "SanaPipeline"):
            raise TypeError(f"pipe: got a {self.kind}; expected FluxPipeline or SanaPipeline")
        self.fingerprint = f"pipeline:{self.kind}:{length}:{fingerprint}"

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextBatch:
        parts = []
        for i in range(0, len(captions), self.batch_size):
            chunk = captions[i : i + self.batch_size]
            if self.kind == "FluxPipeline":
                embeds, pooled, _ = self.pipe.encode_prompt(
                    prompt=chunk, prompt_2=None, device="cpu", max_sequence_length=self.length
                )
                parts.append(TextBatch(embeds.float(), pooled.float(), None))
            else:
                embeds, mask, _, _ = self.pipe.encode_prompt(
                    chunk,
                    do_classifier_free_guidance=False,
                    device="cpu",
                    max_sequence_length=self.length,
                    complex_human_instruction=None,
                )
                parts.append(TextBatch(embeds.float(), None, mask.float()))
        return TextBatch(
            *(
                None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                for f in ("embeds", "pooled", "mask")
            )
        )


def cached_text(cache_dir: str | Path, encoder, captions: list[str]) -> tuple[TextBatch, TextBatch]:
    """(table, empty): ``table`` has one row per caption of ``captions`` (in order), ``empty``
    the 1-row embedding of the empty prompt. Computed once per (encoder, caption set)."""
    key = hashlib.sha1(json.dumps([encoder.fingerprint, captions]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"text-{key}.pt"
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        both = encoder.encode([*captions, ""])
        state = {f: getattr(both, f) for f in ("embeds", "pooled", "mask")}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    full = TextBatch(state["embeds"], state["pooled"], state["mask"])
    n = len(captions)
    return full.select(slice(0, n)), full.select(slice(n, n + 1))


@dataclass
class LatentSet:
    """Cached latents of a set of images, in both latent spaces, with their captions.

    Attributes
    ----------
    base : float32 [N, C_base, H_base, W_base] base-autoencoder latents (scaled)
    new : float32 [N, C_new, H_new, W_new] new-autoencoder latents (scaled)
    caption_idx : int64 [N], row of ``texts`` for each image
    texts : one row per distinct caption; empty : the empty prompt (1 row)
    names : the image file names
    """

    base: torch.Tensor
    new: torch.Tensor
    caption_idx: torch.Tensor
    texts: TextBatch
    empty: TextBatch
    names: list[str]

    def __len__(self) -> int:
        return self.new.shape[0]

    def text(self, index) -> TextBatch:
        """Conditioning rows for images ``index`` (int64 tensor or slice)."""
        return self.texts.select(self.caption_idx[index])
