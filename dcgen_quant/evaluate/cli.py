"""``python -m dcgen_quant evaluate``: compare models' images with a reference model's.

    python -m dcgen_quant evaluate --model A [--model A2 ...] [--reference B] --prompts FILE
        [--steps S] [--seed N] [--resolution R] [--guidance W] [--out DIR] [--json]
        [--ae DIR] [--text PIPELINE_DIR] [--text-length L] [--metric-weights DIR]
        [--metrics lpips,clip,image_reward,fid] [--device D] [--dtype T] [--threads N]

``--model`` / ``--reference``: anything ``generate`` takes (4-bit checkpoint, diffusers pipeline
or transformer directory, adapted model) or ``tiny-flux`` / ``tiny-sana`` (the embedded tiny
pipelines). Without ``--reference`` the models must come from an embedded model (as ``quantize``
makes them by default), which then is the reference. Every model draws prompt i from the same
noise (seed N + i) and the same text embeddings; its images are compared with the reference's
(docs/EVALUATE.md: metrics, libraries, what is skipped and why, the cache). Writes
``DIR/images/``, ``DIR/grid.png``, ``DIR/layers.png`` (4-bit checkpoints) and
``DIR/evaluate.json`` (everything printed); images already in ``DIR`` are reused.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

HELP = "compare models' images with a reference's (PSNR, SSIM, LPIPS, ...; grid and error map)"
MARKER = "evaluate.json"
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True,
                        help="checkpoint, pipeline / transformer dir, tiny-flux, tiny-sana; "
                        "repeat to compare several in one table")  # fmt: skip
    parser.add_argument("--reference", help="the 16-bit model to compare with (default: the "
                        "embedded tiny model the checkpoints were made from)")  # fmt: skip
    parser.add_argument("--prompts", required=True, type=Path, help="text file, one per line")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt 0 (prompt i: +i)")
    parser.add_argument("--resolution", type=int,
                        help="image side (default 1024; 64 for the tiny models)")  # fmt: skip
    parser.add_argument("--guidance", type=float, help="guidance w (default FLUX 3.5, SANA 4.5)")
    parser.add_argument("--out", type=Path, default=Path("evaluate-out"), help="output dir")
    parser.add_argument("--ae", help="autoencoder dir for models without one of their own")
    parser.add_argument("--text", help="pipeline dir whose text encoders embed the prompts")
    parser.add_argument("--text-length", type=int,
                        help="text tokens (default FLUX 512, SANA 300, tiny 32)")  # fmt: skip
    parser.add_argument("--metric-weights", type=Path,
                        help="directory with LPIPS / CLIP / ImageReward / FID weights")  # fmt: skip
    parser.add_argument("--metrics", default="lpips,clip,image_reward,fid",
                        help="learned metrics to try (comma list; default all)")  # fmt: skip
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="16-bit models' dtype (default: the "
                        "checkpoints' dtype, else bfloat16 on cuda, float32 on cpu)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="CPU threads (default 1 for tiny models)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _check_out(out: Path) -> None:
    """``out`` is new, empty or an earlier evaluate's output; nothing else gets written into."""
    from ..atomic import TargetExistsError

    if out.exists() and not out.is_dir():
        raise TargetExistsError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise TargetExistsError(
            f"--out {out}: an existing directory that evaluate did not write (no {MARKER}); "
            "choose a new path"
        )


@functools.cache
def _embedded_pipeline(name: str):
    from ..models.tiny_pipeline import tiny_flux_pipeline, tiny_sana_pipeline

    return (tiny_flux_pipeline if name == "tiny-flux" else tiny_sana_pipeline)(seed=0)


def _dtype_for(source, args, device, checkpoints) -> str:
    if source.kind == "checkpoint":
        return source.quant_dtype or "bfloat16"
    if args.dtype:
        return args.dtype
    dtypes = {m.quant_dtype for m in checkpoints}
    if len(dtypes) == 1:
        return dtypes.pop()  # the 4-bit models' own 16-bit dtype: only the 4 bits differ
    return "bfloat16" if device.type == "cuda" else "float32"


def _loader(source, device, dtype):
    # not cached: the model is dropped once its images are made (one full-size model at a time)
    def load():
        from ..generate_cli import load_transformer
        from ..models.tiny import tiny_flux, tiny_sana

        if source.kind == "embedded":
            build = tiny_flux if source.spec == "tiny-flux" else tiny_sana
            return build(seed=0).to(device=device, dtype=dtype).eval()
        return load_transformer(source.path, device, dtype)[0].eval()

    return load


def _autoencoders(sources, reference, args, device):
    """{label: (autoencoder, fingerprint)}: a source's own, else --ae, else the reference's."""
    from ..adapt import data as D
    from ..adapt.runner import load_autoencoder
    from .sources import library_versions

    loaded: dict[str, tuple] = {}

    def from_dir(path: Path, what: str):
        key = str(path.resolve()) if path.exists() else str(path)
        if key not in loaded:
            loaded[key] = (load_autoencoder(path, what).to(device), D.dir_fingerprint(path))
        return loaded[key]

    out = {}
    for s in [reference, *sources]:
        if s.kind == "embedded":
            ae = _embedded_pipeline(s.spec).vae.to(device)
            out[s.label] = (ae, f"embedded {s.spec} vae, {library_versions()}")
        elif s.ae_dir is not None:
            out[s.label] = from_dir(s.ae_dir, f"autoencoder of {s.spec}")
        elif args.ae is not None:
            out[s.label] = from_dir(Path(args.ae), "--ae")
        elif s is not reference and reference.label in out:
            out[s.label] = out[reference.label]
        else:
            raise ValueError(
                f"--ae: {s.spec} has no autoencoder of its own; pass the autoencoder dir it reads"
            )
    return out


def _text(reference, models, args, length):
    """(fingerprint, loader of the shared text encoder) without loading it yet."""
    from ..adapt import data as D
    from ..generate_cli import load_text_encoder, text_pipeline
    from .sources import library_versions

    if args.text is None and reference.kind == "embedded":
        name = reference.spec
        fp = f"embedded {name} text encoders, length {length}, {library_versions()}"
        return fp, lambda: D.PipelineText(_embedded_pipeline(name), length, fp)
    default = reference.text_dir or next((m.text_dir for m in models if m.text_dir), None)
    text_dir, cls = text_pipeline(args.text, default)
    if text_dir is not None and (text_dir / "text_encoder").is_dir():
        fp = f"pipeline {cls} {D.dir_fingerprint(text_dir)}, length {length}"
        return fp, lambda: load_text_encoder(text_dir, cls, None, length)
    c = reference.config
    if reference.family == "flux":
        encoder = D.HashedText(c["joint_attention_dim"], c["pooled_projection_dim"], length)
    else:
        encoder = D.HashedText(c["caption_channels"], None, length, mask=True)

    def warn():
        print(
            "warning: no text encoders (--text PIPELINE_DIR); prompts are embedded by the "
            "HashedText stand-in, which carries word identity, not meaning",
            file=sys.stderr,
        )
        return encoder

    return encoder.fingerprint, warn


def _columns(skipped: dict[str, str]) -> list[tuple[str, str, str | None]]:
    cols = [
        ("model", "model", None), ("prompt", "prompt", None), ("psnr", "PSNR dB", ".2f"),
        ("ssim", "SSIM", ".4f"), ("ms_ssim", "MS-SSIM", ".4f"), ("lpips", "LPIPS", ".4f"),
        ("clip", "CLIP", ".2f"), ("image_reward", "ImageReward", ".3f"), ("fid", "FID", ".2f"),
    ]  # fmt: skip
    return [c for c in cols if c[0] not in skipped]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..atomic import atomic_write_text
    from ..tables import emit
    from . import images as I
    from . import metrics as M
    from . import pictures as P
    from . import sources as S
    from .learned import METRICS, load_learned
    from .lpips import LPIPS

    prompts = I.read_prompts(args.prompts)
    if args.steps < 1:
        raise ValueError(f"--steps: got {args.steps}; expected >= 1")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution: got {args.resolution}; expected a positive size")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: got {args.threads}; expected >= 1")
    wanted = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if bad := [m for m in wanted if m not in METRICS]:
        raise ValueError(f"--metrics: unknown {bad[0]!r}; expected some of {', '.join(METRICS)}")
    if args.metric_weights is not None and not args.metric_weights.is_dir():
        raise NotADirectoryError(f"--metric-weights {args.metric_weights}: not a directory")
    _check_out(args.out)
    models = [S.describe_source(spec, "--model") for spec in args.model]
    reference = S.describe_source(args.reference or S.default_reference(models), "--reference")
    S.assign_labels([reference, *models])
    S.check_compatible(reference, models)
    tiny = reference.kind == "embedded"
    threads = args.threads or (1 if tiny else None)
    if threads is not None:
        torch.set_num_threads(threads)  # tiny models: one thread is fastest (see quantize)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolution = args.resolution or (64 if tiny else 1024)
    guidance = args.guidance if args.guidance is not None else (
        3.5 if reference.family == "flux" else 4.5)  # fmt: skip
    length = args.text_length or (32 if tiny and args.text is None else
                                  512 if reference.family == "flux" else 300)  # fmt: skip
    settings = I.Settings(resolution, args.steps, guidance, args.seed, length, str(device))

    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # tokenizer length chatter on every prompt
    aes = _autoencoders(models, reference, args, device)
    for s in [reference, *models]:
        S.check_resolution(s, aes[s.label][0], resolution)
    checkpoints = [m for m in models if m.kind == "checkpoint"]
    text_fp, text_loader = _text(reference, models, args, length)
    text = functools.cache(lambda: I.MemoText(text_loader()))
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / MARKER).is_file():
        atomic_write_text(args.out / MARKER, json.dumps({"status": "running"}) + "\n")

    generated, paths, pixels = 0, {}, {}
    for s in [reference, *models]:
        dtype = getattr(torch, _dtype_for(s, args, device, checkpoints))
        rt = I.Runtime(*aes[s.label], dtype, _loader(s, device, dtype))
        p, imgs, n = I.ensure_images(args.out, s, rt, text, text_fp, prompts, settings)
        paths[s.label], pixels[s.label], generated = p, imgs, generated + n
        s.extra["dtype"] = str(dtype).replace("torch.", "")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the model just used is gone; give its memory back

    learned = load_learned(args.metric_weights, device, len(prompts), wanted)
    if learned.lpips is not None and resolution < LPIPS.MIN_SIDE:
        learned.lpips = None
        learned.skipped["lpips"] = f"needs images of at least {LPIPS.MIN_SIDE} px (AlexNet)"
    skipped = {**M.pixel_skips(resolution), **learned.skipped}
    rows, totals = [], []
    ref_rows = M.reference_rows(reference.label, pixels[reference.label], prompts, learned)
    if ref_rows is not None:
        rows += ref_rows[0]
        totals.append(ref_rows[1])
    grid_models = []
    for m in models:
        r, t = M.compare(m.label, pixels[reference.label], pixels[m.label], prompts, learned,
                         skipped)  # fmt: skip
        rows += r
        totals.append(t)
        grid_models.append((m.label, pixels[m.label], r))
    grid = args.out / "grid.png"
    P.write_grid(grid, prompts, (reference.label, pixels[reference.label]), grid_models)
    layers_path = args.out / "layers.png"
    panels = [(m.label, m.calibration) for m in checkpoints if m.calibration]
    layers = layers_path if P.write_layers(layers_path, panels) else None
    if layers is None:
        layers_path.unlink(missing_ok=True)  # an earlier run's map is not this run's

    doc = {
        "reference": {**reference.describe(), "dtype": reference.extra.get("dtype")},
        "models": [{**m.describe(), "dtype": m.extra.get("dtype")} for m in models],
        "settings": {**settings.to_dict(), "prompts": prompts},
        "totals": totals,
        "skipped": skipped,
        "metric_weights": learned.sources,
        "grid": str(grid),
        "layers": str(layers) if layers else None,
        "images": {label: [str(p) for p in ps] for label, ps in paths.items()},
        "generated": generated,
        "reused": len(prompts) * (1 + len(models)) - generated,
    }
    atomic_write_text(args.out / MARKER, json.dumps({**doc, "rows": rows}, indent=2) + "\n")
    cols = _columns(skipped)
    if args.json:
        emit(rows, cols, True, extra=doc)
        return 0
    title = (
        f"reference {reference.label}: {len(prompts)} prompts, {args.steps} steps, "
        f"{resolution}x{resolution}, seed {args.seed} (+i), guidance {guidance:g}"
    )
    emit(rows + totals, cols, False, title=title)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print(f"images: {generated} generated, {doc['reused']} reused from {args.out / 'images'}")
    print(f"wrote {grid}" + (f", {layers}" if layers else " (no 4-bit checkpoint: no layers.png)"))
    return 0
