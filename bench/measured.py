"""Measured mode: time the same models with random weights on this machine's GPU.

One warmed-up denoising step per (model, precision, resolution), timed with CUDA events (median
of several; 4K base FLUX gets a single timed step to fit the GPU script's 10-minute call), and
each VAE decode timed separately. Whole-image latency = steps x step + decode (text encoders
are not measured). Before the models, three ceilings are measured so that the latency model's
efficiency parameters can be checked against this GPU: a bf16 8192^3 matmul (``mm_eff``), the
FLUX-4K-shaped SDPA call (``attn_eff``) and a device-to-device copy (``bw_eff``).

W4A4 rows run when a kernel backend (cuda or triton) serves ``gemm_w4a4`` here: every block
linear becomes an SVDQLinear with a valid random quantized weight (:mod:`.w4a4`), and attention
goes through ``dcgen_quant.attention_processor.use_dcgen_attention`` when that module exists.

``tiny=True`` runs the whole path with tiny configs on the CPU (how the tests exercise it);
its timings mean nothing.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch

from . import configs

__all__ = ["measure", "init_random_", "time_fn", "TINY_TRANSFORMER", "TINY_AUTOENCODER"]

# Tiny overrides: same classes and code paths, sizes that run in milliseconds on a CPU.
TINY_TRANSFORMER = {
    "flux": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 64,
             "num_attention_heads": 2, "joint_attention_dim": 128, "pooled_projection_dim": 64,
             "axes_dims_rope": (16, 24, 24)},
}  # fmt: skip
TINY_AUTOENCODER = {
    "flux-vae": {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1},
    "dc-ae-f32c32": {"encoder_block_out_channels": (32,) * 6,
                     "decoder_block_out_channels": (32,) * 6,
                     "encoder_layers_per_block": (1,) * 6, "decoder_layers_per_block": (1,) * 6},
    "dc-ae-1.5-f64c128": {"encoder_block_out_channels": (32,) * 7,
                          "decoder_block_out_channels": (32,) * 7,
                          "encoder_layers_per_block": (0,) + (1,) * 6,
                          "decoder_layers_per_block": (0,) + (1,) * 6},
}  # fmt: skip
TINY_RESOLUTIONS = (64, 128)


@torch.no_grad()
def init_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and floating buffer of ``module`` finite random values, in place.

    Matrices / kernels: normal with std 1/sqrt(fan_in) (activations keep their scale through
    the depth); 1-D ``*bias``: 0; other 1-D tensors (norm weights): 1. Runs on the module's
    device (after ``to_empty``), so a 12B-parameter model initializes in seconds on a GPU.
    """
    dev = next(module.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    tensors = list(module.named_parameters()) + [
        (n, b) for n, b in module.named_buffers() if b.is_floating_point() and b.numel()
    ]
    for name, t in tensors:
        if t.dim() >= 2:
            fan_in = math.prod(t.shape[1:])
            t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.fill_(1.0)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``fn``: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _w4a4_backend(device: torch.device, tiny: bool) -> tuple[str | None, str | None]:
    """(backend that times the 4-bit layers, None) or (None, why W4A4 cannot be timed here).

    On a GPU only a kernel backend (cuda, else triton) counts: the W4A4 rows pin it with
    ``ops.set_backend`` so that a call it cannot serve fails the row instead of silently timing
    the pure-torch reference. Tiny CPU mode uses the reference (the code path, not a speed).
    """
    from dcgen_quant import ops

    if device.type != "cuda":
        return ("reference", None) if tiny else (None, "W4A4 timing needs a GPU kernel backend")
    reasons = []
    for name in ("cuda", "triton"):
        reason = ops.backend_unavailable(name)
        if reason is None:
            return name, None
        reasons.append(f"{name}: {reason}")
    return None, "no 4-bit kernel backend: " + "; ".join(reasons)


def _use_our_attention(model) -> str:
    try:
        from dcgen_quant.attention_processor import use_dcgen_attention
    except ImportError as exc:
        return f"stock SDPA (dcgen_quant.attention_processor unavailable: {exc})"
    n = use_dcgen_attention(model)
    return f"dcgen_quant attention on {n} modules"


def _matmul_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / statistics.median(time_fn(lambda: a @ b, device, 3, 10)) / 1e12


def _sdpa_tflops(device: torch.device, s: int = 66048, heads: int = 24) -> float:
    # FLUX at 4K: 65536 image + 512 text tokens, 24 heads x 128, one image
    q, k, v = (torch.randn(1, heads, s, 128, device=device, dtype=torch.bfloat16) for _ in "qkv")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t = statistics.median(time_fn(lambda: sdpa(q, k, v), device, 1, 3))
    return 4 * heads * s * s * 128 / t / 1e12


def _copy_tbs(device: torch.device, nbytes: int = 2**30) -> float:
    x = torch.randint(0, 256, (nbytes,), device=device, dtype=torch.uint8)  # never zeros
    y = torch.empty_like(x)
    return 2 * nbytes / statistics.median(time_fn(lambda: y.copy_(x), device, 3, 10)) / 1e12


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Measured bf16 matmul rate (8192^3), SDPA rate at FLUX-4K shape and copy bandwidth
    (bytes read + written); the temporaries are freed between measurements."""
    out = {"matmul_bf16_tflops": _matmul_tflops(device)}
    out["sdpa_bf16_tflops"] = _sdpa_tflops(device)
    out["copy_tbs"] = _copy_tbs(device)
    return out


def _plan(resolutions, with_w4a4: bool, fmt: str) -> list[tuple]:
    """(kind, name, precision, resolution, autoencoder) in the order they are measured."""
    r = tuple(sorted(resolutions))
    lo = r[0]
    f64, f32 = "dc-ae-1.5-f64c128", "dc-ae-f32c32"
    plan = [("step", "dcgen-flux-f64c128", "bf16", res, f64) for res in r]
    plan += [("step", "dcgen-flux-f32c32", "bf16", res, f32) for res in r if res <= 2 * lo]
    plan += [("step", "flux", "bf16", res, "flux-vae") for res in r]
    plan += [("decode", ae, "bf16", res, ae) for ae in ("flux-vae", f64) for res in r]
    plan += [("decode", f32, "bf16", res, f32) for res in r if res <= 2 * lo]
    if with_w4a4:  # last: the bf16 rows are complete before the newest code runs
        plan += [("step", "dcgen-flux-f64c128", fmt, res, f64) for res in r]
        plan += [("step", "dcgen-flux-f32c32", fmt, lo, f32)]
        plan += [("step", "flux", fmt, res, "flux-vae") for res in r]
    return plan


def _reps(kind: str, name: str, res: int, tiny: bool) -> tuple[int, int]:
    """(warmup, timed) calls: fewer for the long ones so the run fits its budget."""
    if tiny:
        return 1, 2
    heavy = name == "flux" and res >= 4096
    return (1, 1) if heavy else ((1, 3) if res >= 4096 or kind == "decode" else (2, 5))


def measure(
    device: str | torch.device = "cuda",
    resolutions=None,
    tiny: bool = False,
    budget_s: float = 300.0,
    w4a4: bool | None = None,
    fmt: str | None = None,
    progress: bool = True,
    checkpoint=None,
) -> dict:
    """Measure step and decode times; returns ``{"env", "ceilings", "runs", "skipped"}``.

    ``runs``: one dict per measurement (kind, model, precision, resolution, autoencoder,
    times_s, median_s, warmup, note). Rows that would exceed ``budget_s`` (seconds since the
    start) are skipped and listed in ``skipped`` with the reason. With ``checkpoint`` (a path)
    the result so far is written there after every row, so that a run killed by an outer time
    limit still leaves its numbers.
    """
    from tqdm import tqdm

    device = torch.device(device)
    start = time.perf_counter()
    gpu_key = None
    if device.type == "cuda":
        from .hardware import get_gpu, gpu_from_device_name

        gpu_key = gpu_from_device_name(torch.cuda.get_device_name(device))
        fmt = fmt or (get_gpu(gpu_key).lowbit_format if gpu_key else "int4")
    fmt = fmt or "int4"
    backend, reason = _w4a4_backend(device, tiny)
    if w4a4 is None:
        w4a4 = reason is None
    elif w4a4 and reason:
        raise RuntimeError(f"--w4a4 measurement impossible here: {reason}")
    result = {"env": environment(device), "gpu": gpu_key, "tiny": tiny, "format": fmt,
              "w4a4_backend": backend if w4a4 else None, "w4a4_unavailable": reason,
              "ceilings": {}, "runs": [], "skipped": []}  # fmt: skip
    if device.type == "cuda" and not tiny:
        try:
            result["ceilings"] = measure_ceilings(device)
        except RuntimeError as exc:  # e.g. out of memory: the models can still be timed
            result["ceilings_error"] = _first_line(exc)
            torch.cuda.empty_cache()
    if resolutions is None:
        resolutions = TINY_RESOLUTIONS if tiny else (1024, 2048, 4096)
    plan = _plan(resolutions, w4a4, fmt)
    cache: dict = {}
    failed: dict[tuple, str] = {}  # models that could not be built: their rows are skipped
    for kind, name, prec, res, ae in tqdm(plan, desc="measure", disable=not progress):
        row = {"kind": kind, "model": name, "precision": prec, "resolution": res}
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            reason = f"time budget {budget_s:.0f}s spent ({elapsed:.0f}s)"
            result["skipped"].append({**row, "reason": reason})
            continue
        if (kind, name, prec) in failed:
            result["skipped"].append({**row, "reason": failed[(kind, name, prec)]})
            continue
        try:
            with _pinned_backend(backend if prec != "bf16" else None):
                model = _get_model(cache, device, tiny, kind, name, prec)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            failed[(kind, name, prec)] = f"model set-up failed: {_first_line(exc)}"
            result["skipped"].append({**row, "reason": failed[(kind, name, prec)]})
            _free(device)
            continue
        try:
            with _pinned_backend(backend if prec != "bf16" else None):
                run = _measure_one(model, device, tiny, kind, name, prec, res, ae)
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # OOM, unsupported kernels
            result["skipped"].append({**row, "reason": _first_line(exc)})
            _free(device)
            continue
        result["runs"].append(run)
        if checkpoint is not None:
            _write_checkpoint(checkpoint, result)
    cache.clear()
    result["wall_s"] = time.perf_counter() - start
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _pinned_backend(name: str | None):
    from dcgen_quant import ops

    if name is None:
        yield
        return
    previous = ops.get_backend()
    ops.set_backend(name)
    try:
        yield
    finally:
        ops.set_backend(previous)


def _write_checkpoint(path, result: dict) -> None:
    import json

    from dcgen_quant.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1, default=str) + "\n")


def _dtype(device: torch.device) -> torch.dtype:
    # bf16 on the GPU (what is benchmarked); float32 on the CPU, where bf16 convolutions crawl
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _get_model(cache: dict, device, tiny: bool, kind: str, name: str, prec: str):
    key = (kind, name, prec)
    if key in cache:
        return cache[key]
    cache.clear()  # one model on the device at a time
    if device.type == "cuda":
        torch.cuda.empty_cache()
    note = ""
    if kind == "step":
        spec = configs.transformer_spec(name)
        over = TINY_TRANSFORMER[spec.family] if tiny else {}
        model = configs.build_transformer(name, "meta", _dtype(device), **over)
        model = init_random_(model.to_empty(device=device))
        note = "stock SDPA"
        if prec != "bf16":
            from .w4a4 import convert_to_w4a4

            counts = convert_to_w4a4(model, prec)
            note = f"{counts['w4a4']} W4A4 + {counts['w4a16']} W4A16 layers"
            if counts["fused_attentions"]:
                note += f", q/k/v fused in {counts['fused_attentions']} attentions"
            note += "; "
            note += _use_our_attention(model)
    else:
        over = TINY_AUTOENCODER[name] if tiny else {}
        model = configs.build_autoencoder(name, "meta", _dtype(device), **over)
        model = init_random_(model.to_empty(device=device))
    cache[key] = (model, over, note)
    return cache[key]


@torch.no_grad()
def _measure_one(entry, device, tiny, kind, name, prec, res, ae) -> dict:
    model, over, note = entry
    gen = torch.Generator().manual_seed(res)
    if kind == "step":
        inputs = configs.transformer_inputs(
            name, res, device, _dtype(device), ae, config=over, generator=gen
        )

        def fn():
            return model(**inputs)
    else:
        shape = configs.autoencoder_spec(name).latent_shape(res)
        latent = torch.randn(shape, generator=gen).to(device, _dtype(device))

        def fn():
            return model.decode(latent, return_dict=False)

    warmup, reps = _reps(kind, name, res, tiny)
    try:
        times = time_fn(fn, device, warmup, reps)
    except torch.OutOfMemoryError:
        if kind != "decode":
            raise
        # a full 4K decode can exceed memory (FLUX VAE mid-block attention over 262144 tokens
        # at head dim 512); time the tiled decode that pipelines use then, and say so
        torch.cuda.empty_cache()
        model.enable_tiling()
        try:
            times = time_fn(fn, device, warmup, reps)
        finally:
            model.disable_tiling()
        note = (note + "; " if note else "") + "tiled decode (the full decode ran out of memory)"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "kind": kind, "model": name, "precision": prec, "resolution": res, "autoencoder": ae,
        "times_s": times, "median_s": statistics.median(times), "warmup": warmup, "reps": reps,
        "note": note + ("; single timed step (time budget)" if reps == 1 else ""),
    }  # fmt: skip


def environment(device: torch.device) -> dict:
    """GPU, driver, torch, triton, CUDA versions and the date (for results files)."""
    import datetime
    import platform

    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["driver"] = _driver_version()
    else:
        env["gpu_name"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _driver_version() -> str | None:
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
