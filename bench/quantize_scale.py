"""Streaming quantization at FLUX.1 width: peak host memory against depth, seconds per block,
two ranks against one, and the projection for FLUX.1-dev.

``python -m dcgen_quant.bench.quantize_scale --out DIR [--depths 1+2,2+4,4+8] [--no-ranks]
[--ranks-only] [--quick]``

For each depth ``D+S`` a FLUX.1-width ``FluxTransformer2DModel`` (hidden 3072 = 24 heads x 128,
text width 4096, MLP 12288, guidance embedding) with D double and S single blocks gets random
bf16 weights, written to disk one shard per block (the model is never whole in memory); then a
child process quantizes it by streaming on the CPU (``quantize_streaming``, one block at a time)
and reports its wall time per block; its peak resident memory comes from ``wait4``. Flat peak
memory across depths is the point of streaming.

``--ranks``: the shallowest depth again, once in one process and once under
``torchrun --nproc-per-node 2``, every process on one CPU thread; the ratio of the two wall times
(quantization only, start-up excluded) shows that the ranks split the work (a rank repeating the
whole job would give about 1; ``--repeats N`` alternates N such pairs and reports the
median ratio; the busiest rank's CPU seconds against the one process's are reported too: on
a shared machine the wall times depend on how the scheduler shares the cores, and gave ratios
near 0.3, below the 1/2 an even split allows). ``--ranks-only`` runs just that (the lead's
one command to re-measure it on a quiet machine); ``--ranks-heads H`` builds that model with H
attention heads of 128 (hidden 128 H) instead of FLUX.1's 24, for a shorter run on a busy machine
whose groups are still large enough for the quantization, not start-up and messages, to dominate.

The quantizer settings of the CPU runs are reduced (:data:`BENCH_CONFIG`: 3 smoothing candidates
instead of 39, one low-rank refinement instead of up to 8, 256 calibration tokens per layer
instead of 4096) so that a run takes minutes, not days; the seconds per block are those of this
configuration. The projection for FLUX.1-dev (19 + 38 blocks) scales them by the block counts;
the H200 figure divides by the ratio of an assumed H200 throughput to this CPU's measured
float32 GEMM throughput (:data:`H200_EFFECTIVE_FLOPS`; no GPU run exists yet: bench/gpu_quantize.py
measures it when a GPU session comes). The memory projection is the plan
(quantize/plan.py) of FLUX.1-dev with a realistic calibration set (64 prompts x 20 steps at
1024^2), computed from the model's shapes alone.

Writes ``DIR/quantize_scale.md`` and ``.json`` (with CPU model, load average, torch version,
date) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .quantizer_speed import environment

NAME = "quantize_scale"
FLUX1_WIDTH = {
    "patch_size": 1, "in_channels": 64, "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
FLUX1_DEV_BLOCKS = (19, 38)
BENCH_CONFIG = {"rank": 32, "smooth_grid": 2, "lowrank_iters": 1, "calib_tokens": 256,
                "search_tokens": 256}  # fmt: skip
CALIB = {"samples": 2, "steps": 1, "latent_size": 16, "text_tokens": 32}  # 256 + 32 tokens
QUICK_WIDTH = {**FLUX1_WIDTH, "num_attention_heads": 2, "joint_attention_dim": 256,
               "pooled_projection_dim": 128, "attention_head_dim": 64,
               "axes_dims_rope": (16, 24, 24)}  # fmt: skip
# Assumed sustained throughput of the quantizer's mix (float32 / bf16 GEMMs, randomized SVDs,
# elementwise fake quantization) on one H200: 30 TFLOP/s, under half its 67 TFLOP/s float32 (non
# tensor core) peak. An assumption until bench/gpu_quantize.py has run on a GPU.
H200_EFFECTIVE_FLOPS = 30e12


def _config(width: dict, double: int, single: int) -> dict:
    return {**width, "num_layers": double, "num_single_layers": single}


def write_random_flux(directory: Path, config: dict, seed: int = 0) -> int:
    """A diffusers FLUX directory with random bf16 weights, one safetensors shard per block (and
    one for the rest), written one block at a time. Returns the bytes of weights."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from dcgen_quant.models.base import family_for
    from dcgen_quant.quantize.weights import WEIGHTS_INDEX_NAME, meta_model

    model = meta_model(FluxTransformer2DModel, config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_config(directory)
    blocks = [name for name, _ in family_for(model).blocks(model)]
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    groups: dict[str, list[str]] = {"rest": []}
    for key in shapes:
        block = next((b for b in blocks if key.startswith(f"{b}.")), "rest")
        groups.setdefault(block, []).append(key)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups.values()):
        tensors = {}
        for key in keys:
            if key.endswith(".weight") and len(shapes[key]) == 1 and "norm" in key:
                t = torch.ones(shapes[key])  # RMSNorm / LayerNorm scales
            else:
                t = torch.randn(shapes[key], generator=gen) * 0.02
            tensors[key] = t.to(torch.bfloat16)
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(directory / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=1))
    return total


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a child process (or every torchrun rank): stream-quantize ``spec["model"]``."""

    from dcgen_quant.models.calibration import synthetic_calibration
    from dcgen_quant.quantize import QuantConfig
    from dcgen_quant.quantize.distributed import init_from_env, shutdown
    from dcgen_quant.quantize.streaming import StreamOptions, StreamSource, quantize_streaming

    torch.set_num_threads(spec["threads"])
    dist = init_from_env("cpu")
    # what the interpreter, torch and diffusers hold before any model work
    baseline = _current_rss()
    source = StreamSource.from_directory(spec["model"])
    calib = synthetic_calibration(source.meta_model(), spec["samples"], spec["steps"], 0,
                                  latent_size=spec["latent_size"], text_tokens=spec["text_tokens"],
                                  dtype=torch.bfloat16, device="cpu")  # fmt: skip
    options = StreamOptions(progress=False, log=lambda line: None, resume=False)
    out = Path(spec["out"])
    state = out.with_name(out.name + ".partial")
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    report = quantize_streaming(source, calib, QuantConfig(**spec["config"]), out, state, options,
                                dist)  # fmt: skip
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # this process's CPU time (all its threads)
    if dist.is_main:
        shutil.rmtree(state, ignore_errors=True)
    shutdown(dist)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "blocks": options.stats["blocks"],
        "plan": options.stats["plan"],
        "cache": options.stats["cache"],
        "mean_rel_err": report.summary()["mean_rel_err"],
        "rank": dist.rank,
        "baseline_rss_bytes": baseline,
    }


def _current_rss() -> int:
    """Resident bytes of this process now (not the high-water mark, which survives exec)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _write_in_child(model_dir: Path, config: dict) -> int:
    """:func:`write_random_flux` in a child process: this process stays small, so the
    quantizing children's peak RSS (which starts at the parent's RSS: the high-water mark
    survives fork and exec) is their own."""
    spec = json.dumps({"dir": str(model_dir), "config": config})
    cmd = [sys.executable, "-m", "dcgen_quant.bench.quantize_scale", "--write", spec]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def _spawn(spec: dict[str, Any], ranks: int = 1) -> tuple[dict[str, Any], int]:
    """Run :func:`child` in a fresh process (or ``ranks`` under torchrun): (result, peak RSS
    bytes of the largest process)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    module = ["-m", "dcgen_quant.bench.quantize_scale", "--child", json.dumps(spec)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(ranks), *module]  # fmt: skip
    else:
        cmd = [sys.executable, *module]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"quantize_scale child failed ({proc.returncode}): {cmd}")
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    main = next(r for r in results if r["rank"] == 0)
    main["max_cpu_seconds"] = max(r["cpu_seconds"] for r in results)
    # ru_maxrss (KiB) of the waited process: with torchrun, the largest of the launcher's
    # children (the ranks), which is what each rank holds
    return main, usage.ru_maxrss * 1024


def cpu_gemm_flops(threads: int) -> float:
    """Measured float32 GEMM throughput of this CPU on ``threads`` threads (FLOP/s)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 3072), torch.randn(3072, 3072)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 * 3072 * 3072 / best


def flux1_dev_plan() -> dict[str, Any]:
    """The streaming plan of FLUX.1-dev INT4 r32, default QuantConfig, 64 prompts x 20 steps
    at 1024^2 (4096 image + 512 text tokens), on one GPU with 32 GB of host memory."""
    from diffusers import FluxTransformer2DModel

    from dcgen_quant.models.base import family_for
    from dcgen_quant.quantize import QuantConfig
    from dcgen_quant.quantize.plan import make_plan, plan_dict
    from dcgen_quant.quantize.weights import meta_model

    model = meta_model(FluxTransformer2DModel, _config(FLUX1_WIDTH, *FLUX1_DEV_BLOCKS))
    family = family_for(model)
    config = QuantConfig()
    plans = [family.plan_block(n, b, config) for n, b in family.blocks(model)]
    hidden, tokens = 3072, 4096 + 512
    # block inputs of one sample: hidden states (bf16), temb, rotary cos + sin (float32)
    sample = tokens * hidden * 2 + hidden * 2 + 2 * tokens * 128 * 4
    outside = sum(
        t.numel() * 2 for k, t in model.state_dict().items() if "transformer_blocks." not in k
    )
    plan = make_plan(
        model, family, plans, config, dtype=torch.bfloat16, device="cuda", world=1,
        samples=64 * 20, rank_samples=64 * 20, sample_bytes=sample, outside_bytes=outside,
        cache_mode="auto", max_host=32 * 10**9, batch=None,
    )  # fmt: skip
    return plan_dict(plan)


def run(args) -> dict[str, Any]:
    width = QUICK_WIDTH if args.quick else FLUX1_WIDTH
    depths = [tuple(int(x) for x in d.split("+")) for d in args.depths.split(",")]
    spec_base = {"config": BENCH_CONFIG, "threads": args.threads, **CALIB}
    result: dict[str, Any] = {"benchmark": NAME, "width": width, "config": BENCH_CONFIG,
                              "calibration": CALIB, "depths": [], "environment": {}}  # fmt: skip
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="quantize_scale-", dir=args.work_dir))
    try:
        if not args.ranks_only:
            for double, single in depths:
                model_dir = work / f"flux-{double}+{single}"
                weights = _write_in_child(model_dir, _config(width, double, single))
                spec = {**spec_base, "model": str(model_dir), "out": str(work / "q.safetensors")}
                res, rss = _spawn(spec)
                by_kind: dict[str, list[float]] = {}
                for name, seconds in res["blocks"]:
                    by_kind.setdefault(name.split(".")[0], []).append(seconds)
                row = {"double": double, "single": single, "weights_bytes": weights,
                       "peak_rss_bytes": rss, "baseline_rss_bytes": res["baseline_rss_bytes"],
                       "seconds": res["seconds"],
                       "seconds_per_double": _median(by_kind.get("transformer_blocks")),
                       "seconds_per_single": _median(by_kind.get("single_transformer_blocks")),
                       "plan_host_bytes": res["plan"]["host_fixed"] + res["plan"]["cache_memory"],
                       "mean_rel_err": res["mean_rel_err"]}  # fmt: skip
                result["depths"].append(row)
                print(json.dumps(row), flush=True)
                if args.out is not None:  # what is measured so far survives an interruption
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / f"{NAME}.partial.json").write_text(json.dumps(result, indent=2))
                shutil.rmtree(model_dir)
                (work / "q.safetensors").unlink(missing_ok=True)
        if args.ranks:
            double, single = depths[0]
            model_dir = work / "flux-ranks"
            rwidth = width
            if args.ranks_heads is not None:
                rwidth = {**width, "num_attention_heads": args.ranks_heads}
            _write_in_child(model_dir, _config(rwidth, double, single))
            spec = {**spec_base, "model": str(model_dir), "threads": 1}
            from dcgen_quant.checkpoint import load_quantized

            # one and two processes alternate (--repeats pairs): on a shared machine the load
            # changes during a run, and the median of the pairs' ratios is what load spares
            pairs, cpu, same = [], [], True
            for _ in range(args.repeats):
                one, _ = _spawn({**spec, "out": str(work / "one.safetensors")})
                two, _ = _spawn({**spec, "out": str(work / "two.safetensors")}, ranks=2)
                a = load_quantized(work / "one.safetensors").state_dict()
                b = load_quantized(work / "two.safetensors").state_dict()
                same &= a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                pairs.append((one["seconds"], two["seconds"]))
                cpu.append((one["max_cpu_seconds"], two["max_cpu_seconds"]))
                print(json.dumps({"one_process_s": one["seconds"], "two_ranks_s": two["seconds"]}),
                      flush=True)  # fmt: skip
            ratios = [t / o for o, t in pairs]
            result["ranks"] = {
                "depth": f"{double}+{single}",
                "hidden": rwidth["num_attention_heads"] * rwidth["attention_head_dim"],
                "one_process_s": _median([o for o, _ in pairs]),
                "two_ranks_s": _median([t for _, t in pairs]),
                "pairs": pairs, "ratio": _median(ratios), "bit_identical": same,
                # CPU seconds of the busiest rank vs the one process: what a shared machine's
                # scheduler does not distort (a rank repeating the whole job would give ~1)
                "cpu_pairs": cpu, "cpu_ratio": _median([t / o for o, t in cpu]),
            }  # fmt: skip
            print(json.dumps(result["ranks"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["cpu_gemm_flops"] = cpu_gemm_flops(args.threads)
    result["projection"] = projection(result, args.quick)
    result["environment"] = environment(torch.device("cpu"))
    result["environment"]["threads"] = args.threads
    return result


def _median(values):
    if not values:
        return None
    values = sorted(values)
    return values[len(values) // 2]


def projection(result: dict[str, Any], quick: bool) -> dict[str, Any]:
    """FLUX.1-dev's seconds on this CPU (the deepest row's seconds per block x 19 + 38 blocks),
    on an H200 (the assumed throughput, or the measured ratio of a gpu_quantize result in
    ``result["gpu"]``), and the plan's memory for FLUX.1-dev."""
    proj: dict[str, Any] = {}
    rows = [r for r in result["depths"] if r["seconds_per_double"] and r["seconds_per_single"]]
    if rows and not quick:
        deepest = rows[-1]
        cpu = (FLUX1_DEV_BLOCKS[0] * deepest["seconds_per_double"]
               + FLUX1_DEV_BLOCKS[1] * deepest["seconds_per_single"])  # fmt: skip
        speedup = H200_EFFECTIVE_FLOPS / result["cpu_gemm_flops"]
        proj.update(flux1_dev_cpu_s=cpu, h200_over_cpu=speedup, flux1_dev_h200_s=cpu / speedup)
        gpu = result.get("gpu")
        if gpu and gpu.get("cpu_config") and not gpu.get("dry_run"):
            # the same configuration and calibration on both: one double + one single block
            times = {b["name"].split(".")[0]: b["seconds"] for b in gpu["cpu_config"]["blocks"]}
            gpu_s = times["transformer_blocks"] + times["single_transformer_blocks"]
            cpu_s = deepest["seconds_per_double"] + deepest["seconds_per_single"]
            proj.update(gpu_over_cpu_measured=cpu_s / gpu_s,
                        flux1_dev_gpu_s=cpu * gpu_s / cpu_s, gpu_device=gpu["device"])  # fmt: skip
            if gpu.get("projection"):
                proj["flux1_dev_gpu_default_s"] = gpu["projection"]["flux1_dev_s"]
    if not quick:
        plan = flux1_dev_plan()
        proj["flux1_dev_plan"] = {
            k: plan[k] for k in ("device_need", "host_fixed", "cache_memory", "cache_disk",
                                 "block_bytes", "work_bytes", "reservoir_bytes", "batch")
        }  # fmt: skip
    return proj


def markdown(result: dict[str, Any]) -> str:
    gib = 2**30
    cfg = result["config"]
    width = result["width"]
    hidden = width["num_attention_heads"] * width["attention_head_dim"]
    kind = "FLUX.1" if hidden >= 3072 else "a tiny (--quick)"
    lines = [
        f"# Streaming quantization at {kind} width (CPU)",
        "",
        f"Random bf16 weights, hidden {hidden}; "
        f"QuantConfig rank {cfg['rank']}, smooth_grid {cfg['smooth_grid']}, lowrank_iters "
        f"{cfg['lowrank_iters']}, calib_tokens {cfg['calib_tokens']} (reduced for the CPU, see "
        f"the module docstring); calibration {result['calibration']['samples']} samples x "
        f"{result['calibration']['steps']} step, {result['calibration']['latent_size'] ** 2} image "
        f"+ {result['calibration']['text_tokens']} text tokens.",
        "",
        "Peak RSS: the quantizing process's peak resident memory (``wait4``), of which the "
        "interpreter with torch and diffusers imported holds the baseline; plan: the run's own "
        "estimate of its host memory (quantize/plan.py).",
        "",
        "| blocks | weights GiB | peak RSS GiB | baseline GiB | plan GiB | s / double | s / single "
        "| total s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["depths"]:
        lines.append(
            f"| {r['double']}+{r['single']} | {r['weights_bytes'] / gib:.2f} | "
            f"{r['peak_rss_bytes'] / gib:.2f} | {r['baseline_rss_bytes'] / gib:.2f} | "
            f"{r['plan_host_bytes'] / gib:.2f} | "
            f"{r['seconds_per_double']:.1f} | {r['seconds_per_single']:.1f} | {r['seconds']:.1f} |"
        )
    if "ranks" in result:
        rk = result["ranks"]
        of_hidden = f" of hidden {rk['hidden']}" if "hidden" in rk else ""
        pairs = ""
        if len(rk.get("pairs", [])) > 1:  # medians; each pair's seconds (one, two) alongside
            each = ", ".join(f"{o:.1f}/{t:.1f}" for o, t in rk["pairs"])
            pairs = f" (medians of {len(rk['pairs'])} alternating pairs, one/two s: {each})"
        lines += [
            "",
            f"Two ranks (torchrun, gloo, 1 thread each) vs one process (1 thread), {rk['depth']} "
            f"blocks{of_hidden}: {rk['two_ranks_s']:.1f} s vs {rk['one_process_s']:.1f} s, ratio "
            f"{rk['ratio']:.2f}{pairs}; checkpoints bit-identical: {rk['bit_identical']}.",
        ]
        if "cpu_ratio" in rk:
            each = ", ".join(f"{o:.1f}/{t:.1f}" for o, t in rk["cpu_pairs"])
            lines += [
                "",
                f"CPU seconds of the busiest rank vs the one process (quantization only; on a "
                f"shared machine the wall times also hold how the scheduler shares the cores): "
                f"ratio {rk['cpu_ratio']:.2f} (one/two: {each}).",
            ]
    proj = result.get("projection", {})
    if "flux1_dev_cpu_s" in proj:
        lines += [
            "",
            f"FLUX.1-dev (19 + 38 blocks) at this configuration: "
            f"{proj['flux1_dev_cpu_s'] / 3600:.1f} h on this CPU; on one H200 about "
            f"{proj['flux1_dev_h200_s'] / 60:.1f} min, assuming {H200_EFFECTIVE_FLOPS / 1e12:.0f} "
            f"TFLOP/s sustained against this CPU's measured {result['cpu_gemm_flops'] / 1e9:.0f} "
            f"GFLOP/s float32 GEMM ({proj['h200_over_cpu']:.0f}x"
            f"{'; no GPU run yet' if 'gpu_over_cpu_measured' not in proj else ''}).",
        ]
    if "gpu_over_cpu_measured" in proj:
        lines += [
            "",
            f"Measured on {proj['gpu_device']} (bench/gpu_quantize.py, the same configuration and "
            f"calibration): {proj['gpu_over_cpu_measured']:.0f}x this CPU, so FLUX.1-dev at this "
            f"configuration takes about {proj['flux1_dev_gpu_s'] / 60:.1f} min there"
            + (
                f"; with the default QuantConfig at 1024^2, "
                f"{proj['flux1_dev_gpu_default_s'] / 60:.1f} min."
                if "flux1_dev_gpu_default_s" in proj
                else "."
            ),
        ]
    if "flux1_dev_plan" in proj:
        p = proj["flux1_dev_plan"]
        lines += [
            "",
            "Plan for FLUX.1-dev INT4 r32 (default QuantConfig), 64 prompts x 20 steps at 1024^2, "
            "one GPU, --max-host-memory 32GB: device "
            f"{p['device_need'] / gib:.1f} GiB (block {p['block_bytes'] / gib:.2f}, group working "
            f"set {p['work_bytes'] / gib:.2f}, reservoirs {p['reservoir_bytes'] / gib:.2f}, batch "
            f"{p['batch']}); host {(p['host_fixed'] + p['cache_memory']) / gib:.1f} GiB with "
            f"{p['cache_memory'] / gib:.1f} GiB of calibration in memory and "
            f"{p['cache_disk'] / gib:.1f} GiB spilled to disk.",
        ]
    # notes: what a --from-json file assembled from several runs says about where each part
    # comes from
    lines += [line for note in result.get("notes", []) for line in ("", note)]
    env = result["environment"]
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgen_quant.bench.quantize_scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--depths", default="1+2,2+4,4+8", help="double+single blocks, comma list")
    parser.add_argument("--no-ranks", dest="ranks", action="store_false",
                        help="skip the two-rank comparison")  # fmt: skip
    parser.add_argument("--ranks-only", action="store_true", help="only the two-rank comparison")
    parser.add_argument("--quick", action="store_true", help="tiny width (the CPU test suite)")
    parser.add_argument(
        "--ranks-heads", type=int, default=None,
        help="attention heads (of 128) of the two-rank model (default 24)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternating one-process / two-rank pairs (median ratio)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--work-dir", default=None, help="where the random models are written")
    parser.add_argument(
        "--gpu-result", type=Path, default=None,
        help="gpu_quantize.json of a GPU session: project FLUX.1-dev from the measured ratio",
    )  # fmt: skip
    parser.add_argument(
        "--from-json", type=Path, default=None,
        help="re-render a previous quantize_scale.json (with --gpu-result) instead of measuring",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        spec = json.loads(args.write)
        print(write_random_flux(Path(spec["dir"]), spec["config"]), flush=True)
        return 0
    if args.child:
        res = child(json.loads(args.child))
        print(json.dumps(res), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        result = run(args)
    if args.gpu_result is not None:
        result["gpu"] = json.loads(args.gpu_result.read_text())
    if args.from_json is not None or args.gpu_result is not None:
        width = result["width"]
        quick = width["num_attention_heads"] * width["attention_head_dim"] < 3072
        result["projection"] = projection(result, quick)
    from dcgen_quant.atomic import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{NAME}.json", json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    atomic_write_text(args.out / f"{NAME}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
