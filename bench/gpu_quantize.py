"""GPU check of the streaming quantizer: one full-size FLUX.1 double block and one single block.

``python -m dcgen_quant.bench.gpu_quantize --out DIR [--samples 4] [--device cuda]`` writes a
FLUX.1-width transformer with 1 double + 1 single block of random bf16 weights to a temporary
directory (bench/quantize_scale.py's writer), quantizes it by streaming on the GPU with the
default QuantConfig (INT4, rank 32, 39 smoothing candidates, 4096 calibration tokens per layer)
on ``--samples`` synthetic calibration inputs at 1024^2 (4096 image + 512 text tokens), and
records the wall seconds of each block, the peak GPU memory (``torch.cuda.max_memory_allocated``)
and the process's peak resident host memory. Its seconds per block, with quantize_scale's CPU
seconds at the same depth, replace the assumed H200 throughput of the FLUX.1-dev projection.

``--dry-run``: the same on a tiny width on the CPU (what bench/gpu_check.sh --dry-run runs).
Writes ``DIR/gpu_quantize.json`` and ``.md``.
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

import torch

from .quantize_scale import FLUX1_WIDTH, QUICK_WIDTH, _config, write_random_flux
from .quantizer_speed import environment

NAME = "gpu_quantize"


def run(out: Path, device: str, samples: int, dry_run: bool) -> dict:
    from dcgen_quant.models.calibration import synthetic_calibration
    from dcgen_quant.quantize import QuantConfig
    from dcgen_quant.quantize.streaming import StreamOptions, StreamSource, quantize_streaming

    width = QUICK_WIDTH if dry_run else FLUX1_WIDTH
    config = QuantConfig()
    if dry_run:  # a plumbing check: the smallest settings, one thread
        torch.set_num_threads(1)
        config = QuantConfig(rank=4, smooth_grid=1, lowrank_iters=0, calib_tokens=64,
                             search_tokens=64)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="gpu_quantize-"))
    try:
        write_random_flux(work / "model", _config(width, 1, 1))
        source = StreamSource.from_directory(work / "model")
        calib = synthetic_calibration(
            source.meta_model(), samples, 1, 0, latent_size=8 if dry_run else 64,
            text_tokens=32 if dry_run else 512, dtype=torch.bfloat16, device="cpu",
        )  # fmt: skip
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        options = StreamOptions(device=device, progress=False, log=print)
        start = time.perf_counter()
        report = quantize_streaming(
            source, calib, config, work / "q.safetensors", work / "q.partial", options
        )
        seconds = time.perf_counter() - start
        result = {
            "benchmark": NAME,
            "dry_run": dry_run,
            "config": config.to_dict(),
            "calibration": {
                "samples": samples,
                "image_tokens": 64 if dry_run else 4096,
                "text_tokens": 32 if dry_run else 512,
            },  # fmt: skip
            "blocks": [{"name": n, "seconds": s} for n, s in options.stats["blocks"]],
            "seconds": seconds,
            "peak_device_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "plan": {k: options.stats["plan"][k] for k in ("device_need", "host_fixed", "batch")},
            "mean_rel_err": report.summary()["mean_rel_err"],
            "environment": environment(torch.device(device)),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Streaming quantization of one {'tiny' if dry_run else 'FLUX.1'} double + single "
        f"block on {device}",
        "",
        "| block | seconds |",
        "|---|---:|",
        *[f"| {b['name']} | {b['seconds']:.1f} |" for b in result["blocks"]],
        "",
        f"peak device memory: {(result['peak_device_bytes'] or 0) / 2**30:.2f} GiB; peak host "
        f"RSS: {result['peak_host_rss_bytes'] / 2**30:.2f} GiB; total {seconds:.1f} s",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()),
        "",
    ]
    (out / f"{NAME}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgen_quant.bench.gpu_quantize", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=4, help="calibration inputs at 1024^2")
    parser.add_argument("--dry-run", action="store_true", help="tiny width on the CPU")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else args.device
    run(args.out, device, args.samples, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
