"""What a chain run loads once: the base transformer and the cached latents and text.

:class:`Context` reads the base transformer (kept on the CPU: each stage copies it onto its
device, so at full size only the model being trained is on the GPU) and builds the on-disk
caches of :mod:`dcgen_quant.adapt.latent_cache`: both autoencoders' latents of every image and
the text embeddings of every caption. The autoencoders and text encoders are loaded only when a
cache has to be built, and dropped right after, so they are never in memory while the
transformer trains. With N processes, rank 0 builds the caches while the others wait, then every
rank opens them (so ``OUT`` must be on a file system every node sees).
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data as D
from . import family as fam
from . import latent_cache as LC
from .distributed import Dist

TRANSFORMERS = ("FluxTransformer2DModel", "SanaTransformer2DModel")
AUTOENCODERS = ("AutoencoderKL", "AutoencoderDC")
PIPELINES = {"FluxPipeline": "flux", "SanaPipeline": "sana"}
ENCODE_BATCH = 8


def _class_of(path: Path, what: str) -> tuple[str, str]:
    """("pipeline" | "model", class name) of a diffusers directory."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what}: {path} is not a directory")
    for kind, name in (("pipeline", "model_index.json"), ("model", "config.json")):
        f = path / name
        if f.is_file():
            cls = json.loads(f.read_text()).get("_class_name")
            return kind, str(cls)
    raise ValueError(
        f"{what}: {path} is neither a diffusers pipeline (model_index.json) nor a diffusers "
        "model (config.json)"
    )


def autoencoder_config(path: str | Path, what: str) -> tuple[str, dict]:
    """(class name, config dict) of an autoencoder directory, without loading its weights."""
    path = Path(path)
    kind, cls = _class_of(path, what)
    if kind != "model" or cls not in AUTOENCODERS:
        raise ValueError(f"{what}: {path} holds a {cls}; expected one of {AUTOENCODERS}")
    return cls, json.loads((path / "config.json").read_text())


def load_autoencoder(path: str | Path, what: str):
    import diffusers

    cls, _ = autoencoder_config(path, what)
    return getattr(diffusers, cls).from_pretrained(Path(path), local_files_only=True).eval()


def config_downsample(cls: str, config: dict) -> int:
    """Spatial compression factor of an autoencoder from its config (as data.ae_downsample)."""
    key = "block_out_channels" if cls == "AutoencoderKL" else "encoder_block_out_channels"
    return 2 ** (len(config[key]) - 1)


def load_base(path: str | Path, torch_dtype: torch.dtype | None = None):
    """(transformer, vae dir or None, pipeline class or None) from a pipeline or model dir."""
    import diffusers

    path = Path(path)
    kw = {"local_files_only": True}
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    kind, cls = _class_of(path, "base")
    if kind == "pipeline":
        if cls not in PIPELINES:
            raise ValueError(f"base: {path} is a {cls}; expected one of {tuple(PIPELINES)}")
        sub = path / "transformer"
        _, tcls = _class_of(sub, "base transformer")
        if tcls not in TRANSFORMERS:
            raise ValueError(f"base: {sub} holds a {tcls}; expected one of {TRANSFORMERS}")
        model = getattr(diffusers, tcls).from_pretrained(sub, **kw)
        vae = path / "vae"
        return model.eval(), (vae if vae.is_dir() else None), cls
    if cls not in TRANSFORMERS:
        raise ValueError(
            f"base: {path} holds a {cls}; expected one of {TRANSFORMERS} or a pipeline"
        )
    return getattr(diffusers, cls).from_pretrained(path, **kw).eval(), None, None


def _has_text_encoders(base_dir: Path, pipeline_cls) -> bool:
    return pipeline_cls is not None and (base_dir / "text_encoder").is_dir()


def text_encoder_for(base_dir: Path, pipeline_cls, model, length: int):
    """The pipeline's text encoders if ``base_dir`` has them, else :class:`data.HashedText`."""
    if _has_text_encoders(base_dir, pipeline_cls):
        import diffusers

        pipe = getattr(diffusers, pipeline_cls).from_pretrained(
            base_dir, transformer=None, vae=None, local_files_only=True
        )
        return D.PipelineText(pipe, length, D.dir_fingerprint(base_dir / "text_encoder"))
    cfg = model.config
    if fam.family_of(model) == "flux":
        return D.HashedText(cfg.joint_attention_dim, cfg.pooled_projection_dim, length)
    return D.HashedText(cfg.caption_channels, None, length, mask=True)


def text_fingerprint(base_dir: Path, pipeline_cls, model, length: int) -> str:
    """:func:`text_encoder_for`'s encoder fingerprint, without loading any text encoder."""
    if _has_text_encoders(base_dir, pipeline_cls):
        return f"pipeline:{pipeline_cls}:{length}:{D.dir_fingerprint(base_dir / 'text_encoder')}"
    return text_encoder_for(base_dir, None, model, length).fingerprint  # HashedText: no weights


@dataclass
class Inputs:
    """What the chain adapts, from what data (CLI arguments of the same names)."""

    base: str
    target_ae: str
    data: str
    base_ae: str | None = None
    heldout: str | None = None
    resolution: int = 1024
    holdout: int | None = None
    caption: str = "a photo"
    text_length: int = 64
    report_images: int = 16


def _file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class Context:
    """Everything loaded once: the base model (CPU) and the cached latents and text.

    Attributes
    ----------
    base : the base transformer on the CPU, frozen, in ``dtype``
    train, held : :class:`~dcgen_quant.adapt.data.LatentSet` of memory-mapped rows
    device : where the models train (this rank's GPU under torchrun)
    dist : the process world
    """

    def __init__(
        self,
        inputs: Inputs,
        cache_dir: str | Path,
        progress: bool = True,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        dist: Dist | None = None,
        rows_per_shard: int = LC.ROWS_PER_SHARD,
    ):
        """``device`` is where the models train (the cached latents stay on disk and on the CPU,
        batches move); ``dtype`` is the frozen transformer weights' dtype (see
        :class:`~dcgen_quant.adapt.runner.ChainOptions`)."""
        self.inputs = inputs
        self.dist = dist or Dist(device=torch.device(device))
        self.device, self.dtype = self.dist.device, dtype
        progress = progress and self.dist.main
        base_dir = Path(inputs.base)
        self.base, vae_dir, pipe_cls = load_base(base_dir, getattr(torch, dtype))
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.family = fam.family_of(self.base)
        if inputs.base_ae is not None:
            vae_dir = Path(inputs.base_ae)
        if vae_dir is None:
            raise ValueError(
                f"base_ae: {base_dir} is a bare transformer; pass the base autoencoder directory "
                "(--base-ae DIR)"
            )
        base_cls, base_cfg = autoencoder_config(vae_dir, "base_ae")
        new_cls, new_cfg = autoencoder_config(inputs.target_ae, "target_ae")
        self.new_channels = int(new_cfg["latent_channels"])
        self.base_p = fam.latent_patch_size(self.base, int(base_cfg["latent_channels"]))
        self.new_downsample = config_downsample(new_cls, new_cfg)
        self.base_downsample = config_downsample(base_cls, base_cfg)
        text_fp = text_fingerprint(base_dir, pipe_cls, self.base, inputs.text_length)
        items = D.scan_folder(inputs.data, inputs.caption)
        if inputs.heldout is not None:
            train_items, held_items = items, D.scan_folder(inputs.heldout, inputs.caption)
        else:
            holdout = inputs.holdout or max(1, len(items) // 10)
            train_items, held_items = D.split_holdout(items, holdout)
        fps = {"base": D.dir_fingerprint(vae_dir), "new": D.dir_fingerprint(inputs.target_ae)}
        record = asdict(inputs)
        record.pop("report_images")  # reporting only: may change between invocations
        for key in ("base", "target_ae", "data", "base_ae", "heldout"):
            if record[key] is not None:
                record[key] = str(Path(record[key]).resolve())
        self.record = {
            "inputs": record,
            "family": self.family,
            "autoencoders": fps,
            "text": text_fp,
            "train_images": [it.path.name for it in train_items],
            "heldout_images": [it.path.name for it in held_items],
        }
        captions = sorted({it.caption for it in train_items + held_items})
        cache_dir = Path(cache_dir)
        # the encoders are loaded on first need (a missing shard) and dropped after the caches
        loaded: dict = {}
        autoencoders: dict = {}

        def encoders():
            if not autoencoders:
                dev = self.device
                autoencoders["base"] = load_autoencoder(vae_dir, "base_ae").to(dev)
                autoencoders["new"] = load_autoencoder(inputs.target_ae, "target_ae").to(dev)
            return autoencoders

        def text_encoder():
            if "text" not in loaded:
                loaded["text"] = text_encoder_for(base_dir, pipe_cls, self.base, inputs.text_length)
            return loaded["text"]

        def build(make):
            # rank 0 builds, the others wait and then open what it wrote
            if self.dist.main:
                result = make()
            self.dist.barrier()
            if not self.dist.main:
                result = make()
            return result

        def latents(group):
            key = hashlib.sha1(
                json.dumps([LC.FORMAT, inputs.resolution, sorted(fps.items())]).encode()
            )
            for it in group:
                key.update(f"{it.path.name}:{_file_sha1(it.path)}".encode())
            digest = key.hexdigest()[:20]

            def produce(start, stop):
                parts: dict[str, list] = {}
                for i in range(start, stop, ENCODE_BATCH):  # a shard is encoded 8 images at a time
                    chunk = group[i : min(stop, i + ENCODE_BATCH)]
                    imgs = torch.stack([D.load_image(it.path, inputs.resolution) for it in chunk])
                    for name, ae in encoders().items():
                        parts.setdefault(name, []).append(D.encode(ae, imgs))
                return {name: torch.cat(chunks) for name, chunks in parts.items()}

            return build(
                lambda: LC.build_cache(
                    cache_dir / f"latents-{digest}",
                    digest,
                    len(group),
                    produce,
                    extra={"names": [it.path.name for it in group]},
                    rows_per_shard=rows_per_shard,
                    progress=progress,
                    desc="encode latents",
                )
            )

        text_key = hashlib.sha1(json.dumps([LC.FORMAT, text_fp, captions]).encode()).hexdigest()
        text_key = text_key[:20]
        rows = [*captions, ""]  # the empty prompt is the last row

        def produce_text(start, stop):
            batch = text_encoder().encode(rows[start:stop])
            fields = {"embeds": batch.embeds, "pooled": batch.pooled, "mask": batch.mask}
            return {k: v.float() for k, v in fields.items() if v is not None}

        text, _ = build(
            lambda: LC.build_cache(
                cache_dir / f"text-{text_key}",
                text_key,
                len(rows),
                produce_text,
                rows_per_shard=rows_per_shard,
                progress=progress,
                desc="encode text",
            )
        )
        table = fam.TextBatch(text["embeds"], text.get("pooled"), text.get("mask"))
        n = len(captions)
        last = torch.tensor([n])
        empty = fam.TextBatch(*(None if t is None else t[last] for t in _fields(table)))
        sets = []
        for group in (train_items, held_items):
            lat, extra = latents(group)
            idx = torch.tensor([captions.index(it.caption) for it in group])
            sets.append(D.LatentSet(lat["base"], lat["new"], idx, table, empty, extra["names"]))
        self.train, self.held = sets
        loaded.clear()
        autoencoders.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _fields(batch: fam.TextBatch):
    return batch.embeds, batch.pooled, batch.mask
