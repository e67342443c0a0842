"""Kernel microbenchmarks: every op of dcgen_quant on every available backend against the best
torch baseline, at FLUX shapes.

    python -m dcgen_quant.bench.kernel_bench --out DIR [--quick] [--only gemm,attention,...]

On a CUDA GPU it times (medians of CUDA-event timings, ``triton.testing.do_bench`` with
``return_mode="median"``, or an own CUDA-event loop without triton), for each backend that
``dcgen_quant.set_backend`` accepts (cuda, triton):

* ``gemm_w4a4`` INT4 and NVFP4 with the fused rank-32 branch, M in 256, 1024, 4096, 16384 and
  (N, K) in the FLUX linears (3072x3072, 12288x3072, 3072x12288, 3072x15360), against torch
  bf16 matmul and ``torch._scaled_mm`` FP8 (per-tensor scales, fast accumulation);
* the fused low-rank overhead: the same INT4 GEMM with rank 0 and rank 32;
* ``quantize_act`` (rank 32), in GB/s against a measured device-to-device copy;
* ``gemm_w4a16`` at the AdaLayerNorm shape (M = 2, N = 18432, K = 3072) against bf16 matmul;
* ``attention`` (and the Triton 8-bit variant) at FLUX's 4096+512 and 16384+512 tokens, 24 heads
  of 128, against ``torch.nn.functional.scaled_dot_product_attention``;
* q/k/v fusion: three INT4 ``SVDQLinear`` of one input (M = 4096, 3072x3072) one by one vs
  fused into one layer (``dcgen_quant.fusion``).
* unsigned activations: quantize_act + INT4 GEMM of a FeedForward ``net.2`` (M = 4096,
  K = 12288, N = 3072) on GELU outputs with unsigned codes vs the same with signed codes.

Each row has the median time, TFLOP/s, GB/s, the speedup over the baseline, the fraction of the
datasheet ceiling (bench/hardware.py) for the unit the kernel uses, and the max relative
error against the pure-torch reference. One failing case is recorded with its error and the run
goes on. Results: ``DIR/kernel_bench.md`` and ``DIR/kernel_bench.json`` (written atomically) with
GPU, driver, CUDA, torch and triton versions.

The cases run most important first (those behind issue 3's targets lead) and the files are
rewritten after every case, so a run cut short keeps what it measured; ``--budget-s`` stops
starting new cases after that many seconds, ``--only lead`` runs just the leading cases. First
calls autotune and compile each kernel (about a minute per kernel family on an H200 is a guess,
not a measurement); ``DCGEN_QUANT_AUTOTUNE=0`` times the first pruned configuration instead.

Without a GPU it exits with a message (status 2); ``--quick`` under ``TRITON_INTERPRET=1`` runs
tiny shapes through the same code path with wall-clock timing (not a performance measurement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dcgen_quant import capabilities, ops
from dcgen_quant.atomic import atomic_write_text
from dcgen_quant.formats import dequantize_weight, quantize_weight
from dcgen_quant.formats.layouts import to_layout
from dcgen_quant.tables import format_table

HELP = "time the kernels of every backend against torch baselines at FLUX shapes"

GEMM_M = (256, 1024, 4096, 16384)
GEMM_NK = ((3072, 3072), (12288, 3072), (3072, 12288), (3072, 15360))
ATTN_TOKENS = (4096 + 512, 16384 + 512)
RANK = 32
OPS = ("gemm", "lowrank", "quantize", "w4a16", "attention", "fusion", "unsigned", "lead")

COLUMNS = [
    ("op", "op", None),
    ("backend", "backend", None),
    ("shape", "shape", None),
    ("ms", "ms", ".4f"),
    ("tflops", "TFLOP/s", ".1f"),
    ("gbps", "GB/s", ".0f"),
    ("baseline", "baseline", None),
    ("baseline_ms", "base ms", ".4f"),
    ("speedup", "x base", ".2f"),
    ("of_ceiling", "of peak", ".0%"),
    ("max_rel_err", "max rel err", ".1e"),
    ("note", "note", None),
    ("error", "error", None),
]


# --------------------------------------------------------------------------------------------
# environment


def environment() -> dict:
    """GPU, driver, CUDA, torch, triton, Python versions and the date."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "gpu": None,
        "capability": None,
        "driver": None,
        "interpreter": capabilities.triton_interpret(),
    }
    if capabilities.triton_unavailable() is None:
        import triton

        env["triton"] = triton.__version__
    if capabilities.cuda_unavailable() is None:
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
            env["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError) as exc:
            env["driver"] = f"unknown ({type(exc).__name__})"
    return env


def ceiling(gpu: str | None, unit: str) -> float | None:
    """Datasheet peak (bench/hardware.py) of ``unit``: "bf16", "fp8", "int8", "fp4" in TFLOP/s,
    "hbm" in GB/s; None for a GPU that is not modelled or lacks the unit."""
    from dcgen_quant.bench.hardware import GPUS, gpu_from_device_name

    key = gpu_from_device_name(gpu) if gpu else None
    if key is None:
        return None
    value = {"hbm": GPUS[key].bandwidth}.get(unit, getattr(GPUS[key], unit, None))
    return None if value is None else value / (1e9 if unit == "hbm" else 1e12)


# --------------------------------------------------------------------------------------------
# timing


def median_ms(fn: Callable[[], object], device: str, quick: bool) -> float:
    """Median time of ``fn()`` in milliseconds."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            warmup, rep = (10, 40) if quick else (25, 100)
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        except ImportError:
            start = [torch.cuda.Event(enable_timing=True) for _ in range(20)]
            end = [torch.cuda.Event(enable_timing=True) for _ in range(20)]
            fn()
            torch.cuda.synchronize()
            for s, e in zip(start, end):
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (float32)."""
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# cases: each returns a list of row dicts; exceptions are caught by the caller


def _backends(selected: list[str]) -> dict[str, object]:
    """{name: backend module or reason it is unavailable} for the selected backends."""
    out = {}
    for name in selected:
        reason = ops.backend_unavailable(name)
        out[name] = reason if reason else ops._load_backend(name)
    return out


def _row(op, backend, shape, ms, flops=None, nbytes=None, base=None, unit=None, env=None, **kw):
    row = {"op": op, "backend": backend, "shape": shape, "ms": ms}
    row["tflops"] = flops / ms / 1e9 if flops and ms else None
    row["gbps"] = nbytes / ms / 1e6 if nbytes and ms else None
    if base is not None:
        row["baseline"], row["baseline_ms"] = base
        row["speedup"] = base[1] / ms if ms else None
    peak = ceiling(env.get("gpu") if env else None, unit) if unit else None
    if peak:
        row["of_ceiling"] = (row["gbps"] if unit == "hbm" else row["tflops"]) / peak
    row.update(kw)
    return row


def _w4a4_inputs(m, n, k, fmt, layout, device, rank=RANK):
    g = torch.Generator(device="cpu").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(device, torch.bfloat16)
    down = (torch.randn(k, rank, generator=g) / k**0.5).to(device, torch.bfloat16)
    up = (torch.randn(n, rank, generator=g) / rank**0.5).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device)
    qw = quantize_weight(w, fmt, torch.bfloat16)
    q, s, la = ops.quantize_act_reference(x, smooth, down, fmt, layout)
    bias = torch.randn(n, generator=g).to(device, torch.bfloat16)
    qweight = to_layout(qw.qweight, layout, fmt)
    return x, w.to(torch.bfloat16), (q, s, qweight, qw.wscales, la, up, bias, qw.wtscale)


def _torch_baselines(x, w, device, quick, env):
    """(name, ms) of bf16 matmul, and of torch._scaled_mm FP8 when the GPU has it."""
    bf16 = ("torch bf16", median_ms(lambda: x @ w.t(), device, quick))
    fp8 = None
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        a8 = x.to(torch.float8_e4m3fn)
        b8 = w.to(torch.float8_e4m3fn).t()  # column-major [K, N]
        one = torch.ones((), device=device)

        def scaled_mm():
            return torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16, use_fast_accum=True)

        fp8 = ("torch fp8", median_ms(scaled_mm, device, quick))
    return bf16, fp8


def case_gemm(fmt, m, n, k, backends, device, quick, env) -> list[dict]:
    rows = []
    x, w, _ = _w4a4_inputs(m, n, k, fmt, "canonical", device)
    bf16, fp8 = _torch_baselines(x, w, device, quick, env)
    shape = f"M={m} N={n} K={k} r={RANK}"
    flops = 2.0 * m * n * k
    rows.append(_row("matmul", bf16[0], shape, bf16[1], flops, 2 * (m * k + n * k + m * n),
                     unit="bf16", env=env))  # fmt: skip
    if fp8:
        rows.append(_row("matmul", fp8[0], shape, fp8[1], flops, m * k + n * k + 2 * m * n,
                         unit="fp8", env=env))  # fmt: skip
    group = 64 if fmt == "int4" else 16
    nbytes = (m + n) * k // 2 + (m + n) * (k // group) * 2 + 2 * m * n + 4 * m * RANK
    for name, module in backends.items():
        if isinstance(module, str):
            row = {"op": f"gemm_w4a4 {fmt}", "backend": name, "shape": shape}
            rows.append({**row, "error": f"unavailable: {module}"})
            continue
        layout = module.preferred_layout(fmt)
        _, _, args = _w4a4_inputs(m, n, k, fmt, layout, device)
        ops.set_backend(name)
        y = ops.gemm_w4a4(*args, fmt, torch.bfloat16, layout)
        ref = ops.gemm_w4a4_reference(*args, fmt, torch.float32, layout)
        ms = median_ms(lambda a=args, lay=layout: ops.gemm_w4a4(*a, fmt, torch.bfloat16, lay),
                       device, quick)  # fmt: skip
        unit = "int8" if fmt == "int4" else ("fp4" if ceiling(env.get("gpu"), "fp4") else "bf16")
        rows.append(_row(f"gemm_w4a4 {fmt}", name, shape, ms, flops + 2.0 * m * n * RANK, nbytes,
                         bf16, unit, env, max_rel_err=max_rel_err(y, ref),
                         vs_fp8=fp8[1] / ms if fp8 else None,
                         note=f"{fp8[1] / ms:.2f}x torch fp8" if fp8 else None))  # fmt: skip
    return rows


def case_lowrank(m, n, k, backends, device, quick, env) -> list[dict]:
    rows = []
    for name, module in backends.items():
        if isinstance(module, str):
            continue
        layout = module.preferred_layout("int4")
        _, _, args = _w4a4_inputs(m, n, k, "int4", layout, device)
        ops.set_backend(name)
        plain = list(args)
        plain[4] = plain[5] = None
        t0, t1 = (median_ms(lambda a=a, lay=layout: ops.gemm_w4a4(*a, "int4", torch.bfloat16, lay),
                            device, quick) for a in (plain, args))  # fmt: skip
        rows.append(_row("low-rank overhead int4", name, f"M={m} N={n} K={k} r=0 vs {RANK}", t1,
                         base=("same GEMM r=0", t0), env=env, overhead=t1 / t0 - 1.0,
                         note=f"low-rank adds {t1 / t0 - 1.0:+.1%}"))  # fmt: skip
    return rows


def case_fusion(m, n, k, backends, device, quick, env) -> list[dict]:
    """SVDQLinear q/k/v (three [n, k] INT4 layers, one input) run one by one vs fused
    (:mod:`dcgen_quant.fusion`: one quantize_act and one [3n, k] GEMM)."""
    from dcgen_quant.nn import SVDQLinear

    from .w4a4 import _set_random_, share_group_inputs_

    rows = []
    g = torch.Generator(device=device).manual_seed(m + n + k)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    layers = [SVDQLinear(k, n, RANK, "int4", True, torch.bfloat16, device) for _ in range(3)]
    for layer in layers:
        _set_random_(layer, (n, k), g)
    share_group_inputs_(layers)
    shape = f"M={m} 3x(N={n}) K={k} r={RANK}"
    for name, module in backends.items():
        if isinstance(module, str):
            continue
        ops.set_backend(name)
        for layer in layers:
            layer.set_layout(module.preferred_layout("int4"))
        fused = SVDQLinear.concat(layers)
        with torch.no_grad():
            ref = torch.cat([layer(x) for layer in layers], dim=-1)
            err = max_rel_err(fused(x), ref)
            t_sep = median_ms(lambda: [layer(x) for layer in layers], device, quick)
            t_fused = median_ms(lambda f=fused: f(x), device, quick)
        rows.append(_row("q/k/v fusion int4", name, shape, t_fused,
                         base=("3 separate layers", t_sep), env=env, max_rel_err=err,
                         note=f"fused {t_sep / t_fused:.2f}x faster than 3 layers"))  # fmt: skip
    return rows


def case_unsigned(m, n, k, backends, device, quick, env) -> list[dict]:
    """One SVDQLinear forward (quantize_act + INT4 GEMM) on GELU outputs, unsigned activation
    codes vs signed: the time (should be equal) and the output error against the float layer
    (unsigned should be lower)."""
    from dcgen_quant.formats import UNSIGNED_ACT_SHIFT
    from dcgen_quant.nn import SVDQLinear

    rows = []
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.nn.functional.gelu(torch.randn(m, k, generator=g), approximate="tanh")
    x = x.to(device, torch.bfloat16)
    w = torch.randn(n, k, generator=g) / k**0.5
    y_float = (x.float().cpu() @ w.t()).to(device)
    shape = f"M={m} N={n} K={k} (GELU inputs)"
    for name, module in backends.items():
        if isinstance(module, str):
            continue
        ops.set_backend(name)
        layout = module.preferred_layout("int4")
        times, errs = {}, {}
        for unsigned in (False, True):
            layer = SVDQLinear(k, n, rank=0, fmt="int4", bias=True, dtype=torch.bfloat16,
                               act_unsigned=unsigned)  # fmt: skip
            qw = quantize_weight(w, "int4", torch.bfloat16)
            layer.qweight.copy_(qw.qweight)
            layer.wscales.copy_(qw.wscales)
            # the bias cancels the shift, as the quantizer sets it (quantize/layer.unsigned_bias)
            shift = UNSIGNED_ACT_SHIFT * dequantize_weight(qw).sum(1)
            layer.bias.copy_(-shift if unsigned else torch.zeros(n))
            layer = layer.to(device)
            layer.set_layout(layout)
            errs[unsigned] = max_rel_err(layer(x).float(), y_float)
            times[unsigned] = median_ms(lambda lay=layer: lay(x), device, quick)
        rows.append(_row("svdq_linear int4 unsigned", name, shape, times[True],
                         base=("signed codes", times[False]), env=env, max_rel_err=errs[True],
                         signed_max_rel_err=errs[False],
                         note=f"error {errs[True]:.4f} vs {errs[False]:.4f} signed"))  # fmt: skip
    return rows


def copy_bandwidth(device, quick, numel=1 << 28) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write)."""
    src = torch.empty(numel // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * 2 / ms / 1e6


def case_quantize(fmt, m, k, backends, device, quick, env, copy_gbps) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(device, torch.bfloat16)
    down = (torch.randn(k, RANK, generator=g) / k**0.5).to(device, torch.bfloat16)
    group = 64 if fmt == "int4" else 16
    nbytes = 2 * m * k + m * k // 2 + m * (k // group) * 2 + 4 * m * RANK + 2 * k * RANK
    for name, module in backends.items():
        if isinstance(module, str):
            continue
        layout = module.preferred_layout(fmt)
        ops.set_backend(name)
        q, s, _ = ops.quantize_act(x, smooth, down, fmt, layout)
        q_ref, s_ref, _ = ops.quantize_act_reference(x, smooth, down, fmt, layout)
        exact = torch.equal(q, q_ref) and torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8))
        ms = median_ms(lambda lay=layout: ops.quantize_act(x, smooth, down, fmt, lay), device,
                       quick)  # fmt: skip
        row = _row(f"quantize_act {fmt}", name, f"M={m} K={k} r={RANK}", ms, None, nbytes,
                   env=env, unit="hbm", bit_exact=bool(exact))  # fmt: skip
        row["baseline"], row["of_copy"] = "copy", row["gbps"] / copy_gbps
        row["note"] = f"{row['of_copy']:.0%} of copy; {'bit-exact' if exact else 'NOT BIT-EXACT'}"
        rows.append(row)
    return rows


def case_w4a16(fmt, m, n, k, backends, device, quick, env) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device)
    qw = quantize_weight(w, fmt, torch.bfloat16)
    wb = w.to(torch.bfloat16)
    base = ("torch bf16", median_ms(lambda: x @ wb.t(), device, quick))
    nbytes = n * k // 2 + 2 * (m * k + m * n)
    for name, module in backends.items():
        if isinstance(module, str):
            continue
        layout = module.preferred_layout(fmt)
        qweight = to_layout(qw.qweight, layout, fmt)
        ops.set_backend(name)
        args = (x, qweight, qw.wscales, None, qw.wtscale, fmt, layout)
        y = ops.gemm_w4a16(*args)
        ref = ops.gemm_w4a16_reference(x.float(), *args[1:])
        ms = median_ms(lambda a=args: ops.gemm_w4a16(*a), device, quick)
        rows.append(_row(f"gemm_w4a16 {fmt}", name, f"M={m} N={n} K={k}", ms, 2.0 * m * n * k,
                         nbytes, base, "hbm", env, max_rel_err=max_rel_err(y, ref)))  # fmt: skip
    return rows


def case_attention(tokens, heads, d, backends, device, quick, env) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(tokens)
    q, k, v = (
        torch.randn(1, heads, tokens, d, generator=g).to(device, torch.bfloat16) for _ in range(3)
    )
    flops = 4.0 * heads * tokens * tokens * d
    shape = f"B=1 H={heads} S={tokens} D={d}"
    sdpa = torch.nn.functional.scaled_dot_product_attention
    base = ("torch SDPA", median_ms(lambda: sdpa(q, k, v), device, quick))
    rows.append(_row("attention", base[0], shape, base[1], flops, unit="bf16", env=env))
    ref = sdpa(q.float(), k.float(), v.float()) if tokens <= 8192 or device == "cpu" else None
    for name, module in backends.items():
        if isinstance(module, str):
            continue
        ops.set_backend(name)
        o = ops.attention(q, k, v, None)
        err = max_rel_err(o, ref) if ref is not None else None
        ms = median_ms(lambda: ops.attention(q, k, v, None), device, quick)
        rows.append(_row("attention", name, shape, ms, flops, base=base, unit="bf16", env=env,
                         max_rel_err=err))  # fmt: skip
        if name == "triton":
            o8 = module.attention_8bit(q, k, v)
            err8 = max_rel_err(o8, ref) if ref is not None else None
            ms8 = median_ms(lambda m=module: m.attention_8bit(q, k, v), device, quick)
            rows.append(_row("attention 8-bit", name, shape, ms8, flops, base=base, unit="fp8",
                             env=env, max_rel_err=err8))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# driver


def plan(quick: bool, device: str, only: set[str]) -> list[tuple[str, Callable, tuple]]:
    """(label, case function, arguments) of every case, most important first: the cases behind
    issue 3's targets (INT4 GEMM + low-rank at M = 4096, low-rank overhead, quantize_act,
    attention at 4096+512) lead, so a time-boxed run measures them before the sweep."""
    if device == "cpu":  # interpreter smoke run: tiny shapes, same code path
        ms, nks, toks, heads, d = (5,), ((64, 128),), (77,), 2, 64
        quant, lowrank, w4a16 = ((5, 128),), (5, 64, 128), (2, 64, 128)
    elif quick:
        ms, nks, toks, heads, d = (4096,), ((3072, 3072), (12288, 3072)), ATTN_TOKENS[:1], 24, 128
        quant, lowrank, w4a16 = ((4096, 3072),), (4096, 3072, 3072), (2, 18432, 3072)
    else:
        ms, nks, toks, heads, d = GEMM_M, GEMM_NK, ATTN_TOKENS, 24, 128
        quant = [(m, k) for m in GEMM_M for k in (3072, 12288)]
        lowrank, w4a16 = (4096, 3072, 3072), (2, 18432, 3072)
    fusion = lowrank  # FLUX q/k/v: three 3072x3072 projections of one input
    lead_m = 4096 if 4096 in ms else ms[0]
    lead_only = "lead" in only
    only = set(OPS) if lead_only else only
    first, rest = [], []
    if "gemm" in only:
        for f in ("int4", "nvfp4"):
            for m in ms:
                for n, k in nks:
                    case = (f"gemm {f} {m}x{n}x{k}", case_gemm, (f, m, n, k))
                    lead = f == "int4" and m == lead_m and (n, k) in nks[:2]
                    (first if lead else rest).append(case)
    if "lowrank" in only:
        first.append(("low-rank overhead", case_lowrank, lowrank))
    if "quantize" in only:
        for f in ("int4", "nvfp4"):
            for m, k in quant:
                case = (f"quantize {f} {m}x{k}", case_quantize, (f, m, k))
                lead = f == "int4" and m == lead_m and k == quant[0][1]
                (first if lead else rest).append(case)
    if "attention" in only:
        for i, t in enumerate(toks):
            (first if i == 0 else rest).append((f"attention S={t}", case_attention, (t, heads, d)))
    if "fusion" in only:
        rest.insert(0, ("q/k/v fusion", case_fusion, fusion))
    if "unsigned" in only:  # FLUX ff.net.2: 12288 -> 3072 on GELU outputs
        unsigned = (5, 64, 128) if device == "cpu" else (4096, 3072, 12288)
        rest.insert(1, ("unsigned activations", case_unsigned, unsigned))
    if "w4a16" in only:
        rest += [(f"w4a16 {f}", case_w4a16, (f, *w4a16)) for f in ("int4", "nvfp4")]
    return first if lead_only else first + rest


def run(out: Path, quick: bool, backends: list[str], only: set[str], budget_s=None) -> dict:
    """Run the cases in :func:`plan` order and return the JSON document.

    ``out/kernel_bench.{md,json}`` are rewritten (atomically) after every case, so a run cut
    short by an outer time box keeps what it measured. With ``budget_s``, no case starts after
    that many seconds; the cases left are listed as skipped.
    """
    from tqdm import tqdm

    t_start = time.monotonic()
    device = "cuda" if capabilities.cuda_unavailable() is None else "cpu"
    env = environment()
    mods = _backends(backends)
    doc = {
        "environment": env,
        "quick": quick,
        "copy_gbps": None,
        "backends": {k: (v if isinstance(v, str) else "available") for k, v in mods.items()},
        "note": "interpreter timings: not a performance measurement" if device == "cpu" else "",
        "autotune": os.environ.get("DCGEN_QUANT_AUTOTUNE", "1"),
        "rows": [],
        "skipped": [],
    }
    out.mkdir(parents=True, exist_ok=True)

    def save():
        doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
        atomic_write_text(out / "kernel_bench.json", json.dumps(doc, indent=2, default=str) + "\n")
        atomic_write_text(out / "kernel_bench.md", to_markdown(doc))

    before = ops.get_backend()
    try:
        if "quantize" in only or "lead" in only:
            numel = 1 << 14 if device == "cpu" else 1 << 28
            doc["copy_gbps"] = copy_bandwidth(device, quick, numel=numel)
        cases = plan(quick, device, only)
        for i, (label, fn, args) in enumerate(tqdm(cases, desc="kernel_bench", unit="case")):
            if budget_s is not None and time.monotonic() - t_start > budget_s:
                doc["skipped"] = [c[0] for c in cases[i:]]
                break
            extra = (doc["copy_gbps"],) if fn is case_quantize else ()
            try:
                doc["rows"] += fn(*args, mods, device, quick, env, *extra)
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # one failing case must not end the run: record it
                doc["rows"].append({"op": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
                if device == "cuda":
                    torch.cuda.empty_cache()
            save()
    finally:
        ops.set_backend(before)
        save()
    return doc


def to_markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = ["# Kernel benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- copy bandwidth: {doc['copy_gbps']:.0f} GB/s" if doc["copy_gbps"] else ""]
    lines += [f"- backends: {doc['backends']}", f"- autotune: {doc['autotune']}"]
    lines += [f"- {doc['note']}" if doc["note"] else "", f"- elapsed: {doc.get('elapsed_s')} s"]
    if doc["skipped"]:
        lines += [f"- skipped (time budget): {', '.join(doc['skipped'])}"]
    lines += [""]
    header = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines += [header, "|" + "---|" * len(COLUMNS)]
    for row in doc["rows"]:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("")
            else:
                cells.append(format(value, fmt) if fmt and isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgen_quant.bench.kernel_bench", description=HELP
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for kernel_bench.md/json")
    parser.add_argument("--quick", action="store_true", help="a few shapes (CPU: interpreter)")
    parser.add_argument("--backends", default="cuda,triton", help="comma list (default: both)")
    parser.add_argument(
        "--only",
        default=",".join(OPS[:-1]),
        help=f"comma list of {', '.join(OPS)} ('lead': only the cases behind issue 3's targets)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="start no case after this many seconds"
    )
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if bad := only - set(OPS):
        parser.error(f"--only: unknown {sorted(bad)}; expected some of {', '.join(OPS)}")
    interpreter_smoke = args.quick and capabilities.triton_interpret()
    if (reason := capabilities.cuda_unavailable()) and not interpreter_smoke:
        print(
            f"kernel_bench needs a CUDA GPU to measure anything: {reason}.\n"
            "Run it on a GPU machine (bench/gpu_check.sh does), or exercise the code path "
            "on CPU with tiny shapes: TRITON_INTERPRET=1 python -m "
            "dcgen_quant.bench.kernel_bench --out DIR --quick",
            file=sys.stderr,
        )
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    doc = run(args.out, args.quick, backends, only, args.budget_s)
    print(format_table(doc["rows"], COLUMNS, title=f"kernel_bench ({doc['environment']['gpu']})"))
    print(f"wrote {args.out / 'kernel_bench.md'} and {args.out / 'kernel_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
