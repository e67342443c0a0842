"""``python -m dcgen_quant quantize``: SVDQuant a diffusers transformer into a 4-bit checkpoint.

``--model`` is ``tiny-flux`` (default: a small FLUX-architecture transformer built in code from a
fixed seed, calibrated on inputs generated in code), ``tiny-sana``, or a local diffusers
directory: a transformer (``config.json``) calibrated on generated inputs, or a whole pipeline
(``model_index.json``) whose transformer is calibrated by running the real pipeline on prompts
(``--prompts FILE``, one per line). Progress bars while it runs, a summary table at the end;
``--resume`` continues an interrupted run from its last finished block.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

HELP = "SVDQuant a FLUX/SANA transformer (tiny built-in, or a local diffusers dir) to 4 bits"

DEFAULT_PROMPTS = (
    "a photo of a red fox in fresh snow, morning light",
    "an isometric illustration of a tiny city on a floating island",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "a bowl of ramen on a wooden table, steam rising, 35mm photo",
    "a watercolor painting of a lighthouse during a storm",
    "a futuristic sports car in a neon-lit tunnel",
    "a cat wearing a knitted scarf, studio photo",
    "the interior of a cozy library with tall bookshelves",
)
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="tiny-flux",
        help="tiny-flux (default), tiny-sana, or a local diffusers transformer/pipeline directory",
    )  # fmt: skip
    parser.add_argument("--format", default="int4", help="int4 (group 64) or nvfp4 (group 16)")
    parser.add_argument("--rank", type=int, default=32, help="low-rank branch rank (0: none)")
    parser.add_argument("--calib-samples", type=int, default=4, help="calibration samples")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per sample")
    parser.add_argument("--out", type=Path, default=None, help="output .safetensors (or dir)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--prompts", type=Path, help="prompt file for pipeline calibration")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="16-bit dtype")
    parser.add_argument("--no-smooth", action="store_true", help="disable smoothing")
    parser.add_argument(
        "--skip-incompatible", action="store_true",
        help="keep layers whose in_features is not a multiple of the group size in 16 bits "
        "(default: error)",
    )  # fmt: skip
    parser.add_argument(
        "--gptq", action=argparse.BooleanOptionalAction, default=True,
        help="GPTQ on the 4-bit residual, kept per layer where it lowers the held-out error "
        "(default; --no-gptq: round-to-nearest everywhere)",
    )  # fmt: skip
    parser.add_argument(
        "--lowrank", choices=("auto", "svd", "output"), default="auto",
        help="low-rank branch: svd (of the smoothed weight), output (output-aware), auto "
        "(svd, then output-aware steps while they lower the held-out error; default)",
    )  # fmt: skip
    parser.add_argument(
        "--holdout", type=float, default=0.25,
        help="fraction of each layer's calibration tokens held out to judge every choice "
        "(default 0.25; 0: judge on the calibration tokens themselves)",
    )  # fmt: skip
    parser.add_argument(
        "--rank-alloc", action="store_true",
        help="per-layer ranks (multiples of 16) by held-out error per byte, within the bytes of "
        "the uniform --rank",
    )  # fmt: skip
    parser.add_argument(
        "--signed-gelu", action="store_true",
        help="INT4: quantize the inputs of GELU-output layers (FLUX ff.net.2) with signed codes "
        "like every other layer (default: unsigned codes of x + 0.171875, about half the error)",
    )  # fmt: skip
    parser.add_argument(
        "--nunchaku-compatible", action="store_true",
        help="write a checkpoint that `convert --to nunchaku` exports exactly (AdaLayerNorm "
        "layers in INT4 group 64 with codes -7..7, also for --format nvfp4)",
    )  # fmt: skip
    parser.add_argument("--svd", choices=("randomized", "full"), default="randomized")
    parser.add_argument("--device", default="cpu", help="device to quantize on (cpu, cuda)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default: 1 for the tiny built-in models, torch's default otherwise)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _load_model(spec: str, dtype, device: str) -> tuple[Any, Any, str]:
    """(transformer, pipeline or None, short name) for ``--model``."""
    from ..models import tiny

    if spec in ("tiny-flux", "tiny-sana"):
        build = tiny.tiny_flux if spec == "tiny-flux" else tiny.tiny_sana
        return build(seed=0, dtype=dtype).to(device), None, spec
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"--model {spec!r}: no such directory (and not tiny-flux/tiny-sana)"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"--model {spec!r} is a file; expected a diffusers directory")
    import diffusers

    if (path / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            path, local_files_only=True, torch_dtype=dtype
        ).to(device)
        if getattr(pipe, "transformer", None) is None:
            raise ValueError(f"--model {spec!r}: the pipeline has no transformer to quantize")
        return pipe.transformer, pipe, path.name
    if (path / "config.json").is_file():
        import json

        name = json.loads((path / "config.json").read_text()).get("_class_name")
        cls = getattr(diffusers, str(name), None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(f"--model {spec!r}: config.json names {name!r}, not a diffusers model")
        model = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        return model.to(device).eval(), None, path.name
    raise ValueError(
        f"--model {spec!r} is not a diffusers model or pipeline directory "
        "(no config.json or model_index.json)"
    )


def _calibration(model, pipe, args) -> list[dict]:
    from ..models.calibration import capture_pipeline_calibration, synthetic_calibration

    if pipe is None:
        return synthetic_calibration(model, args.calib_samples, args.steps, args.seed)
    if args.prompts is not None:
        prompts = [p.strip() for p in args.prompts.read_text().splitlines() if p.strip()]
        if not prompts:
            raise ValueError(f"--prompts {str(args.prompts)!r} holds no prompt")
    else:
        prompts = list(DEFAULT_PROMPTS)
    prompts = (prompts * args.calib_samples)[: args.calib_samples]
    return capture_pipeline_calibration(pipe, prompts, args.steps, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from ..checkpoint import check_output, save_quantized
    from ..inspect_cli import summarize
    from ..tables import emit
    from . import QuantConfig, quantize_model
    from .state import RunState

    if args.calib_samples < 1 or args.steps < 1:
        raise ValueError("--calib-samples and --steps must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads or (1 if args.model.startswith("tiny-") else None)
    if threads is not None:
        # The tiny models are thousands of small ops: one thread is faster than two, and far
        # faster when another process competes for the cores (MKL/OpenMP threads then wait on
        # each other: 21 s on one thread vs 209 s on two, measured on a loaded 2-core machine).
        torch.set_num_threads(threads)
    dtype = getattr(torch, _DTYPES[args.dtype])
    config = QuantConfig(
        format=args.format, rank=args.rank, smooth=not args.no_smooth, gptq=args.gptq,
        svd=args.svd, dtype=dtype, seed=args.seed, skip_incompatible=args.skip_incompatible,
        unsigned_gelu=not args.signed_gelu, nunchaku_compatible=args.nunchaku_compatible,
        lowrank=args.lowrank, holdout=args.holdout, rank_alloc=args.rank_alloc,
    )  # fmt: skip
    if args.prompts is not None and not args.prompts.is_file():
        raise FileNotFoundError(f"--prompts file not found: {args.prompts}")
    start = time.perf_counter()
    if args.out is not None:
        check_output(args.out)  # before any work: never destroy what the user has there
    model, pipe, name = _load_model(args.model, dtype, args.device)
    out = check_output(args.out or Path(f"{name}-{config.format}-r{config.rank}.safetensors"))
    state_dir = out.with_name(out.name + ".partial")
    if state_dir.exists() and not args.resume:
        RunState.check_owned(state_dir)  # only a state directory of ours is wiped
        shutil.rmtree(state_dir)  # a fresh run starts over
    calib = _calibration(model, pipe, args)
    report = quantize_model(model, calib, config, progress=True, state_dir=state_dir)
    save_quantized(model, out, config=config, report=report)
    shutil.rmtree(state_dir, ignore_errors=True)
    seconds = time.perf_counter() - start

    summary = summarize(out, verify=False)
    stats = report.summary()
    row = {
        "model": name,
        "format": config.format,
        "rank": config.rank,
        "layers_quantized": stats["layers_quantized"],
        "layers_skipped": stats["layers_skipped"],
        "size_mib": summary["bytes"]["total"] / 1024**2,
        "size_vs_16bit": summary["size_vs_bf16"],
        "mean_rel_err": stats["mean_rel_err"],
        "max_rel_err": stats["max_rel_err"],
        "mean_rel_err_heldout": stats["mean_rel_err_heldout"],
        "seconds": seconds,
        "checkpoint": str(out),
    }
    columns = [
        ("model", "model", None), ("format", "format", None), ("rank", "rank", None),
        ("layers_quantized", "layers 4-bit", None), ("layers_skipped", "16-bit", None),
        ("size_mib", "MiB", ".2f"), ("size_vs_16bit", "vs 16-bit", ".3f"),
        ("mean_rel_err", "mean rel err", ".4f"), ("max_rel_err", "max rel err", ".4f"),
        ("mean_rel_err_heldout", "held-out err", ".4f"), ("seconds", "seconds", ".1f"),
    ]  # fmt: skip
    emit([row], columns, args.json, title=f"wrote {out}")
    return 0
