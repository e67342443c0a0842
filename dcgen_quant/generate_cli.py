"""``python -m dcgen_quant generate``: text-to-image with an adapted and/or quantized model.

    python -m dcgen_quant generate --model PATH --prompt "..." [--prompt "..."] --out DIR
        [--ae DIR] [--text PIPELINE_DIR] [--resolution R] [--steps N] [--guidance W]
        [--seed S] [--text-length L] [--device cpu|cuda] [--dtype float32|bfloat16]

``--model`` is a diffusers transformer directory (e.g. ``adapt``'s ``OUT/model``), a diffusers
pipeline directory, or a 4-bit checkpoint written by ``quantize`` (file or sharded directory;
loaded with q/k/v fused). The autoencoder defaults to the one recorded in the adapted model's
``dcgen_adapt.json`` (or the pipeline's ``vae``); prompts are embedded by the text encoders of
``--text`` (a FluxPipeline / SanaPipeline directory; default: ``--model`` when it is one). Without
text encoders the documented stand-in :class:`dcgen_quant.adapt.data.HashedText` is used, with a
warning: it carries no meaning, only word identity. Sampling is :mod:`dcgen_quant.adapt.sample`.
Writes ``OUT/<i>.png`` (atomically) and prints one row per image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

HELP = "generate images with an adapted (DC-Gen) and/or 4-bit quantized FLUX / SANA transformer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="transformer / pipeline dir or checkpoint")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for more")
    parser.add_argument("--out", required=True, help="output directory for <i>.png")
    parser.add_argument("--ae", help="autoencoder directory (default: from the model)")
    parser.add_argument("--text", help="FluxPipeline / SanaPipeline dir with text encoders")
    parser.add_argument("--resolution", type=int, default=1024, help="image side (pixels)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.5, help="guidance scale w")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image's noise")
    parser.add_argument("--text-length", type=int, help="text tokens (default FLUX 512, SANA 300)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="16-bit "
                        "default on cuda, float32 on cpu (16-bit models)")  # fmt: skip


def load_transformer(path: Path, device, dtype):
    """Load what ``--model`` names: (transformer, default autoencoder dir or None, pipeline dir
    with text encoders or None).

    ``path`` is a 4-bit checkpoint (loaded with q/k/v fused, in its own dtypes), a diffusers
    pipeline directory or a transformer directory (moved to ``dtype``); an adapted model's
    ``dcgen_adapt.json`` names its autoencoder. Shared by ``generate`` and ``evaluate``.
    """
    from .adapt.runner import load_base
    from .checkpoint import is_checkpoint, load_quantized

    if is_checkpoint(path):
        model = load_quantized(path, device=device, fuse=True)
        return model, None, None
    model, vae_dir, pipeline_cls = load_base(path)
    model = model.to(device=device, dtype=dtype)
    record = path / "dcgen_adapt.json"
    if record.is_file():
        vae_dir = Path(json.loads(record.read_text())["autoencoder"])
    return model, vae_dir, (path if pipeline_cls else None)


def text_pipeline(text: str | None, default_dir: Path | None) -> tuple[Path | None, str | None]:
    """(directory, pipeline class name) whose text encoders embed the prompts.

    ``text`` is the ``--text`` argument (must be a pipeline directory); without it
    ``default_dir`` (a pipeline directory or None) is used.
    """
    from .adapt.runner import _class_of

    if text is not None:
        kind, cls = _class_of(Path(text), "--text")
        if kind != "pipeline":
            raise ValueError(f"--text: {text} is a {cls}, not a pipeline directory")
        return Path(text), cls
    if default_dir is None:
        return None, None
    return default_dir, _class_of(default_dir, "--model")[1]


def load_text_encoder(text_dir: Path | None, pipeline_cls: str | None, model, length: int):
    """The pipeline's text encoders, or the HashedText stand-in (with a warning on stderr)."""
    from .adapt import data as D
    from .adapt.runner import text_encoder_for

    encoder = text_encoder_for(text_dir or Path("."), pipeline_cls, model, length)
    if isinstance(encoder, D.HashedText):
        print(
            "warning: no text encoders (--text PIPELINE_DIR); prompts are embedded by the "
            "HashedText stand-in, which carries word identity, not meaning",
            file=sys.stderr,
        )
    return encoder


def to_pixels(image) -> np.ndarray:
    """uint8 [R, R, 3] of an image float32 [3, R, R] in [-1, 1] (what the PNG holds)."""
    return ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def save_png(pixels: np.ndarray, target: Path) -> None:
    """Write uint8 [H, W, 3] pixels as a PNG, atomically."""
    from PIL import Image

    from .atomic import atomic_path

    with atomic_path(target) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def run(args) -> int:
    import torch

    from .adapt import family as fam
    from .adapt.runner import load_autoencoder
    from .adapt.sample import generate
    from .tables import format_table

    if args.steps < 1:
        raise ValueError(f"--steps: got {args.steps}; expected >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    path = Path(args.model)
    if not path.exists():
        raise FileNotFoundError(f"--model: {path} does not exist")
    model, ae_dir, text_dir = load_transformer(path, device, dtype)
    model.eval()
    if args.ae is not None:
        ae_dir = Path(args.ae)
    if ae_dir is None:
        raise ValueError(
            f"--ae: {path} records no autoencoder; pass the autoencoder directory it reads"
        )
    ae = load_autoencoder(ae_dir, "--ae").to(device)
    channels = int(ae.config.latent_channels)
    fam.latent_patch_size(model, channels)  # raises if the model cannot read this latent
    text_dir, pipeline_cls = text_pipeline(args.text, text_dir)
    family = fam.family_of(model)
    length = args.text_length or (512 if family == "flux" else 300)
    encoder = load_text_encoder(text_dir or path, pipeline_cls, model, length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(args.prompt):
        start = time.perf_counter()
        image = generate(
            model, ae, encoder, [prompt], args.resolution, steps=args.steps,
            guidance=args.guidance, seed=args.seed + i, progress=True,
        )[0]  # fmt: skip
        seconds = time.perf_counter() - start
        target = out / f"{i}.png"
        save_png(to_pixels(image), target)
        rows.append({"image": str(target), "seconds": seconds, "prompt": prompt})
    cols = [("image", "image", None), ("seconds", "seconds", ".2f"), ("prompt", "prompt", None)]
    print(format_table(rows, cols))
    return 0
