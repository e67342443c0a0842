"""``python -m dcgen_quant quantize``: SVDQuant a diffusers transformer into a 4-bit checkpoint.

``--model`` is ``tiny-flux`` (default: a small FLUX-architecture transformer built in code from a
fixed seed, calibrated on inputs generated in code), ``tiny-sana``, or a local diffusers
directory: a transformer (``config.json``) calibrated on generated inputs, or a whole pipeline
(``model_index.json``) whose transformer is calibrated by running the real pipeline on prompts
(``--prompts FILE``, one per line). Progress bars while it runs, a summary table at the end;
``--resume`` continues an interrupted run from its last finished block.

The transformer is streamed (quantize/streaming.py): one block at a time on ``--device``, the
calibration inputs on the host up to ``--max-host-memory`` and on disk beyond it. Under
``torchrun --nproc-per-node N -m dcgen_quant quantize ...`` the ranks share the work
(quantize/distributed.py) and rank 0 writes the same checkpoint one process writes.
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
        "--clip-search", action=argparse.BooleanOptionalAction, default=True,
        help="also try clipped group scales for the 4-bit residual (per group, the one that "
        "minimizes its output-weighted rounding error), kept per layer where the held-out error "
        "falls (default; --no-clip-search: the scales of round-to-nearest only)",
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
    parser.add_argument(
        "--smooth-grid", type=int, default=20, metavar="N",
        help="grid points per smoothing exponent (default 20: 39 (alpha, beta) candidates)",
    )  # fmt: skip
    parser.add_argument(
        "--lowrank-iters", type=int, default=8, metavar="N",
        help="low-rank refinement steps at most (default 8)",
    )  # fmt: skip
    parser.add_argument(
        "--calib-tokens", type=int, default=4096, metavar="N",
        help="calibration tokens kept per layer (default 4096)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="device to quantize on (cpu, cuda)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default: 1 for the tiny built-in models, torch's default otherwise)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-host-memory", metavar="SIZE", default=None,
        help="host memory this process may use, e.g. 24GB or 20GiB (default: what is available); "
        "calibration inputs beyond it spill to disk",
    )  # fmt: skip
    parser.add_argument(
        "--calib-cache", choices=("auto", "memory", "disk"), default="auto",
        help="where calibration inputs live between blocks: memory, disk, or auto (memory up "
        "to --max-host-memory, the rest on disk; default)",
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=int, default=None, metavar="N",
        help="calibration samples moved to the device at a time (default: from the plan)",
    )  # fmt: skip
    parser.add_argument(
        "--pipeline-batch", type=int, default=None, metavar="N",
        help="prompts per pipeline call when calibrating from a pipeline (default 1: the same "
        "samples as one call per prompt; larger values read the streamed weights fewer times)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _source(spec: str, dtype) -> tuple[Any, Path | None, str]:
    """(StreamSource of the transformer, pipeline directory or None, short name) for ``--model``."""
    from .streaming import StreamSource

    if spec in ("tiny-flux", "tiny-sana"):
        from ..models import tiny

        build = tiny.tiny_flux if spec == "tiny-flux" else tiny.tiny_sana
        return StreamSource.from_module(build(seed=0, dtype=dtype)), None, spec
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"--model {spec!r}: no such directory (and not tiny-flux/tiny-sana)"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"--model {spec!r} is a file; expected a diffusers directory")
    if (path / "model_index.json").is_file():
        entry = _json_object(path / "model_index.json", spec).get("transformer")
        if not (path / "transformer" / "config.json").is_file():
            raise ValueError(
                f"--model {spec!r}: the pipeline has no transformer to quantize "
                f"(model_index.json names {entry!r}; no transformer/config.json)"
            )
        return _model_source(path / "transformer", spec), path, path.name
    if (path / "config.json").is_file():
        return _model_source(path, spec), None, path.name
    raise ValueError(
        f"--model {spec!r} is not a diffusers model or pipeline directory "
        "(no config.json or model_index.json)"
    )


def _model_source(directory: Path, spec: str):
    """StreamSource of a diffusers model directory; a bad config.json, missing, truncated or
    foreign weight files: one ValueError naming --model."""
    from .streaming import StreamSource
    from .weights import model_class_from_config

    try:
        cls, _ = model_class_from_config(directory)
    except ValueError as exc:
        raise ValueError(f"--model {spec!r}: {exc}") from None
    try:
        return StreamSource.from_directory(directory)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--model {spec!r}: cannot load {cls.__name__} from {directory}: {exc}"
        ) from None


def _json_object(path: Path, spec: str) -> dict:
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"--model {spec!r}: {path.name} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"--model {spec!r}: {path.name} holds a JSON {type(value).__name__}, not an object"
        )
    return value


def check_rank(model, config) -> None:
    """Refuse a rank that some W4A4 layer cannot hold (above min(N, K) of a layer or fused
    group), rather than silently clamping it there. ``model`` may live on the meta device."""
    from ..models.base import family_for

    if config.rank == 0:
        return
    family = family_for(model)
    limit, where = None, None
    for name, block in family.blocks(model):
        for group in family.plan_block(name, block, config).groups:
            if group.kind != "w4a4":
                continue
            members = [model.get_submodule(n) for n in group.names]
            n = sum(getattr(m, "out_features", getattr(m, "out_channels", 0)) for m in members)
            k = getattr(members[0], "in_features", getattr(members[0], "in_channels", 0))
            widths = [k] if group.split_at is None else [group.split_at, k - group.split_at]
            for width in widths:
                if limit is None or min(n, width) < limit:
                    limit, where = min(n, width), group.names[0]
    if limit is not None and config.rank > limit:
        raise ValueError(
            f"--rank {config.rank} is larger than layer {where} can hold (min(N, K) = {limit}); "
            f"use --rank {limit} or less"
        )


def _calibration(source, pipe_dir, args, dtype, device, dist, state_dir) -> list[dict]:
    from ..models.calibration import synthetic_calibration

    if pipe_dir is None:
        return synthetic_calibration(
            source.meta_model(), args.calib_samples, args.steps, args.seed, dtype=dtype,
            device="cpu",
        )  # fmt: skip
    from .pipeline_capture import capture_streamed

    if args.prompts is not None:
        prompts = [p.strip() for p in args.prompts.read_text().splitlines() if p.strip()]
        if not prompts:
            raise ValueError(f"--prompts {str(args.prompts)!r} holds no prompt")
    else:
        prompts = list(DEFAULT_PROMPTS)
    prompts = (prompts * args.calib_samples)[: args.calib_samples]
    return capture_streamed(
        pipe_dir, source, prompts, args.steps, seed=args.seed, dtype=dtype, device=device,
        dist=dist, state_dir=state_dir, batch=args.pipeline_batch,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from ..capabilities import check_device
    from ..checkpoint import check_output
    from ..inspect_cli import summarize
    from ..tables import emit
    from . import QuantConfig
    from .distributed import init_from_env, rank_device, shutdown
    from .plan import parse_size
    from .state import RunState
    from .streaming import StreamOptions, quantize_streaming

    if args.calib_samples < 1 or args.steps < 1:
        raise ValueError(
            f"--calib-samples and --steps must be >= 1, got {args.calib_samples} and {args.steps}"
        )
    check_device(args.device, "--device")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    for flag in ("batch", "pipeline_batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    max_host = parse_size(args.max_host_memory) if args.max_host_memory is not None else None
    threads = args.threads or (1 if args.model.startswith("tiny-") else None)
    if threads is not None:
        # The tiny models are thousands of small ops: one thread is faster than two, and far
        # faster when another process competes for the cores (MKL/OpenMP threads then wait on
        # each other: 21 s on one thread vs 209 s on two, measured on a loaded 2-core machine).
        # Under torchrun, give every rank the --threads of the one-process run it should match.
        torch.set_num_threads(threads)
    dtype = getattr(torch, _DTYPES[args.dtype])
    config = QuantConfig(
        format=args.format, rank=args.rank, smooth=not args.no_smooth, gptq=args.gptq,
        svd=args.svd, dtype=dtype, seed=args.seed, skip_incompatible=args.skip_incompatible,
        unsigned_gelu=not args.signed_gelu, nunchaku_compatible=args.nunchaku_compatible,
        smooth_grid=args.smooth_grid, lowrank_iters=args.lowrank_iters,
        calib_tokens=args.calib_tokens, search_tokens=min(1024, args.calib_tokens),
        lowrank=args.lowrank, holdout=args.holdout, rank_alloc=args.rank_alloc,
        clip=args.clip_search,
    )  # fmt: skip
    if args.prompts is not None and not args.prompts.is_file():
        raise FileNotFoundError(f"--prompts file not found: {args.prompts}")
    start = time.perf_counter()
    if args.out is not None:
        check_output(args.out)  # before any work: never destroy what the user has there
    dist = init_from_env(args.device)
    try:
        device = rank_device(args.device, dist)
        source, pipe_dir, name = _source(args.model, dtype)
        check_rank(source.meta_model(), config)
        out = check_output(args.out or Path(f"{name}-{config.format}-r{config.rank}.safetensors"))
        state_dir = out.with_name(out.name + ".partial")
        if dist.is_main and state_dir.exists() and not args.resume:
            RunState.check_owned(state_dir)  # only a state directory of ours is wiped
            shutil.rmtree(state_dir)  # a fresh run starts over
        dist.barrier()
        calib = _calibration(source, pipe_dir, args, dtype, device, dist, state_dir)
        options = StreamOptions(
            device=device, calib_cache=args.calib_cache, max_host_memory=max_host,
            batch=args.batch, progress=True, resume=args.resume,
        )  # fmt: skip
        report = quantize_streaming(source, calib, config, out, state_dir, options, dist)
    finally:
        shutdown(dist)
    if not dist.is_main:
        return 0
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
        "ranks": dist.world,
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
