"""GPU check of the streaming quantizer: one full-size FLUX.1 double block and one single block.

``python -m dcgen_quant.bench.gpu_quantize --out DIR [--samples 4] [--device cuda]`` writes a
FLUX.1-width transformer with 1 double + 1 single block of random bf16 weights to a temporary
directory (bench/quantize_scale.py's writer) and quantizes it by streaming on the GPU twice:

1. ``default``: the default QuantConfig (INT4, rank 32, 39 smoothing candidates, 4096
   calibration tokens per layer) on ``--samples`` synthetic calibration inputs at 1024^2 (4096
   image + 512 text tokens): the wall seconds of each block, the peak GPU memory
   (``torch.cuda.max_memory_allocated``) and the projection for FLUX.1-dev (19 double + 38 single
   blocks of the same width);
2. ``cpu_config``: quantize_scale's reduced CPU configuration and calibration
   (:data:`~dcgen_quant.bench.quantize_scale.BENCH_CONFIG`), whose seconds per block divided
   into quantize_scale's CPU seconds give the measured CPU/GPU ratio
   (``python -m dcgen_quant.bench.quantize_scale --gpu-result DIR/gpu_quantize.json``).

The process's peak resident host memory is recorded too. Results are written after each pass
(a time-boxed run keeps the first); with ``--budget-s S`` the second pass is skipped (and
recorded as skipped) when the first pass's time says it would end past ``S`` seconds.
``--dry-run``: the same on a tiny width on the CPU with the smallest settings (what
bench/gpu_check.sh --dry-run runs). Writes ``DIR/gpu_quantize.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .quantize_scale import (
    BENCH_CONFIG,
    CALIB,
    FLUX1_WIDTH,
    QUICK_WIDTH,
    _config,
    write_random_flux,
)
from .quantizer_speed import environment

NAME = "gpu_quantize"
TINY = {"rank": 4, "smooth_grid": 1, "lowrank_iters": 0, "calib_tokens": 64, "search_tokens": 64}


def _quantize(source, config, calib, device: str, work: Path) -> dict[str, Any]:
    """One streaming run of ``source``: seconds per block, peak device memory, the plan."""
    from dcgen_quant.quantize.streaming import StreamOptions, quantize_streaming

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    options = StreamOptions(device=device, progress=False, log=print, resume=False)
    start = time.perf_counter()
    report = quantize_streaming(
        source, calib, config, work / "q.safetensors", work / "q.partial", options
    )
    seconds = time.perf_counter() - start
    (work / "q.safetensors").unlink(missing_ok=True)
    shutil.rmtree(work / "q.partial", ignore_errors=True)
    return {
        "config": config.to_dict(),
        "calibration": {
            "samples": len(calib),
            "image_tokens": calib[0]["hidden_states"].shape[1],
            "text_tokens": calib[0]["encoder_hidden_states"].shape[1],
        },  # fmt: skip
        "blocks": [{"name": n, "seconds": s} for n, s in options.stats["blocks"]],
        "seconds": seconds,
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "plan": {k: options.stats["plan"][k] for k in ("device_need", "host_fixed", "batch")},
        "mean_rel_err": report.summary()["mean_rel_err"],
    }


def run(out: Path, device: str, samples: int, dry_run: bool, budget_s: float | None = None) -> dict:
    from dcgen_quant.models.calibration import synthetic_calibration
    from dcgen_quant.quantize import QuantConfig
    from dcgen_quant.quantize.streaming import StreamSource

    width = QUICK_WIDTH if dry_run else FLUX1_WIDTH
    if dry_run:  # a plumbing check: the smallest settings, one thread
        torch.set_num_threads(1)
    result: dict[str, Any] = {"benchmark": NAME, "dry_run": dry_run, "device": device,
                              "environment": environment(torch.device(device))}  # fmt: skip
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_quantize-"))
    try:
        write_random_flux(work / "model", _config(width, 1, 1))
        source = StreamSource.from_directory(work / "model")
        model = source.meta_model()
        passes = [
            ("default", QuantConfig(**TINY) if dry_run else QuantConfig(),
             {"latent_size": 8 if dry_run else 64, "text_tokens": 32 if dry_run else 512,
              "samples": samples, "steps": 1}),
            ("cpu_config", QuantConfig(**(TINY if dry_run else BENCH_CONFIG)), CALIB),
        ]  # fmt: skip
        for name, config, cal in passes:
            spent = time.perf_counter() - start
            last = result["default"]["seconds"] if "default" in result else 0.0
            if budget_s is not None and "default" in result and spent + last > budget_s:
                # the CPU configuration is lighter than the default, but not by a known factor:
                # the default pass's time is the bound that keeps the stage inside its box
                result["skipped"] = f"{name}: {spent:.0f} s spent + ~{last:.0f} s > {budget_s} s"
                print(f"skipping pass {name}: {result['skipped']}", flush=True)
                _write(out, result)
                break
            calib = synthetic_calibration(
                model, cal["samples"], cal["steps"], 0, latent_size=cal["latent_size"],
                text_tokens=cal["text_tokens"], dtype=torch.bfloat16, device="cpu",
            )  # fmt: skip
            result[name] = _quantize(source, config, calib, device, work)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            result["peak_host_rss_bytes"] = rss
            # the projection needs FLUX.1-width blocks: none for the tiny dry run
            if name == "default" and not dry_run:
                result["projection"] = flux1_dev_projection(result[name]["blocks"])
            _write(out, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    return result


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{NAME}.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    device = result["device"]
    kind = "tiny (dry run)" if result["dry_run"] else "FLUX.1"
    lines = [f"# Streaming quantization of one {kind} double + single block on {device}", ""]
    for name in ("default", "cpu_config"):
        if name not in result:
            continue
        r = result[name]
        cfg, cal = r["config"], r["calibration"]
        lines += [
            f"## {name}: rank {cfg['rank']}, smooth_grid {cfg['smooth_grid']}, lowrank_iters "
            f"{cfg['lowrank_iters']}, calib_tokens {cfg['calib_tokens']}; {cal['samples']} "
            f"samples of {cal['image_tokens']} + {cal['text_tokens']} tokens",
            "",
            "| block | seconds |",
            "|---|---:|",
            *[f"| {b['name']} | {b['seconds']:.2f} |" for b in r["blocks"]],
            "",
            f"peak device memory {(r['peak_device_bytes'] or 0) / 2**30:.2f} GiB (plan "
            f"{r['plan']['device_need'] / 2**30:.2f} GiB); total {r['seconds']:.1f} s",
            "",
        ]
    if "skipped" in result:
        lines += [f"cpu_config pass skipped (--budget-s): {result['skipped']}", ""]
    if "peak_host_rss_bytes" in result:
        lines += [f"peak host RSS {result['peak_host_rss_bytes'] / 2**30:.2f} GiB", ""]
    proj = result.get("projection")
    if proj is not None:
        minutes = proj["flux1_dev_s"] / 60
        lines += [
            f"FLUX.1-dev (19 double + 38 single blocks like these), default configuration: "
            f"{minutes:.1f} min in one process; {minutes / 8:.1f} min on 8 if the ranks split the "
            "groups evenly (a bound: quantize_scale measures the split on the CPU)",
            "",
        ]
    env = result["environment"]
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def flux1_dev_projection(blocks: list[dict]) -> dict:
    """Seconds for FLUX.1-dev's 19 double + 38 single blocks at the measured seconds per block
    (the blocks of this run have FLUX.1-dev's width, so only their count differs)."""
    double = [b["seconds"] for b in blocks if b["name"].startswith("transformer_blocks.")]
    single = [b["seconds"] for b in blocks if b["name"].startswith("single_transformer_blocks.")]
    seconds = 19 * sum(double) / max(len(double), 1) + 38 * sum(single) / max(len(single), 1)
    return {"flux1_dev_s": seconds, "double_s": double, "single_s": single}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgen_quant.bench.gpu_quantize", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=4, help="calibration inputs at 1024^2")
    parser.add_argument("--dry-run", action="store_true", help="tiny width on the CPU")
    parser.add_argument(
        "--budget-s", type=float, default=None,
        help="skip the second pass when the first pass's time says it would end past this",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else args.device
    run(args.out, device, args.samples, args.dry_run, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
