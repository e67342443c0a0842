"""Latency model: traced ops of the real diffusers modules mapped onto a GPU's ceilings.

For one denoising step (and one VAE decode) the op list comes from :func:`opcount.trace` over the
full-size model on the meta device. Each op gets a GPU time from a roofline with the GPU's
efficiency parameters (:mod:`dcgen_quant.bench.hardware`)::

    matrix ops    max(FLOPs / (peak * mm_eff * wave), bytes / (BW * bw_eff))
    attention     max(FLOPs / (attention peak * attn_eff * wave), bytes / (BW * bw_eff))
    W4A4 GEMM     FLOPs / (4-bit peak * lowbit_eff * wave) + low-rank FLOPs / (bf16 * mm_eff),
                  or its bytes if larger
    other         bytes / (BW * bw_eff)

``wave`` is the wave-quantization efficiency ``tiles / (ceil(tiles / SMs) * SMs)`` of the op's
128x128 output tiles (attention: 128-row query blocks per batch and head). The ops then run
through a single-stream queue: the host issues one kernel every ``dispatch_s``; a kernel starts
when it has been issued and the previous one has finished. Time the GPU waits on the host is
reported as ``host``. A whole image is ``steps * step + VAE decode + text encoding`` (text
encoders are counted analytically, see :func:`text_encoder_seconds`).

Attention rate: 16-bit rows use the 16-bit tensor rate with fp32 accumulation (what PyTorch
SDPA uses); W4A4 rows use the fp16-accumulate rate (Nunchaku's attention design; equal on
datacenter GPUs, 2x on GeForce).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from . import configs, opcount
from .hardware import GPU

__all__ = [
    "Prediction",
    "predict_image",
    "step_ops",
    "decode_ops",
    "simulate",
    "text_encoder_seconds",
]

PRECISIONS = ("bf16", "int4", "nvfp4")


@functools.cache
def step_ops(
    model: str,
    resolution: int,
    precision: str = "bf16",
    autoencoder: str | None = None,
    fuse_qkv: bool = True,
):
    """Ops of one denoising forward of full-size ``model`` at ``resolution`` (cached).

    ``precision``: "bf16", or a 4-bit format ("int4" | "nvfp4") for the W4A4 model, whose FLUX
    q/k/v (and added q/k/v) projections run fused, one ``quantize_act`` and one GEMM per group,
    as a checkpoint loaded with ``fuse=True`` runs; ``fuse_qkv=False`` traces them as three
    separate layers. Returns a tuple of :class:`opcount.Op`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")
    spec = configs.transformer_spec(model)
    # Trace two blocks of each kind and replicate the second one (exact: blocks 1..N-1 run the
    # same kernels on the same shapes; block 0 may differ, e.g. a non-contiguous input).
    depth = _DEPTH_KEYS[spec.family]
    net = configs.build_transformer(model, **{key: 2 for key in depth})
    if precision != "bf16":
        from .w4a4 import convert_to_w4a4

        convert_to_w4a4(net, precision, fuse=fuse_qkv)
    inputs = configs.transformer_inputs(model, resolution, autoencoder=autoencoder)
    segments, repeats = {}, {}
    for key, attr in depth.items():
        for i, block in enumerate(getattr(net, attr)):
            segments[block] = f"{attr}.{i}"
        repeats[f"{attr}.1"] = spec.config.get(key, _DEFAULT_DEPTH[key]) - 1
    ops = opcount.trace(lambda: net(**inputs), segments)
    return tuple(opcount.expand(ops, repeats))


# config key of each block stack -> the ModuleList holding it
_DEPTH_KEYS = {
    "flux": {"num_layers": "transformer_blocks", "num_single_layers": "single_transformer_blocks"},
    "sana": {"num_layers": "transformer_blocks"},
}
_DEFAULT_DEPTH = {"num_layers": 20, "num_single_layers": 38}


@functools.cache
def decode_ops(autoencoder: str, resolution: int):
    """Ops of one full-size VAE decode of a ``resolution`` x ``resolution`` image (cached)."""
    import torch

    ae = configs.build_autoencoder(autoencoder)
    shape = configs.autoencoder_spec(autoencoder).latent_shape(resolution)
    latent = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    return tuple(opcount.trace(lambda: ae.decode(latent, return_dict=False)))


def _wave(tiles: int, sms: int) -> float:
    if tiles <= 0:
        return 1.0
    return tiles / (math.ceil(tiles / sms) * sms)


def _matrix_peak(gpu: GPU, dtype: str) -> float:
    # float32 operands run as TF32 on the tensor cores: half the 16-bit rate
    return gpu.bf16 / 2 if dtype == "float32" else gpu.bf16


def _lowbit_peak(gpu: GPU, fmt: str) -> float:
    if fmt == "nvfp4":
        # native FP4 where present; elsewhere E2M1 is exact in e4m3, so FP8 tensor cores
        return gpu.fp4 or gpu.fp8
    return gpu.int8  # INT4 runs on INT8 tensor cores (unpacked in registers)


def op_seconds(op: opcount.Op, gpu: GPU, attn_peak: float) -> float:
    """GPU time of one op (roofline with the GPU's efficiency parameters)."""
    memory = op.bytes / (gpu.bandwidth * gpu.bw_eff)
    wave = _wave(op.tiles, gpu.sms)
    if op.kind == "mm":
        compute = op.flops / (_matrix_peak(gpu, op.dtype) * gpu.mm_eff * wave)
    elif op.kind == "attn":
        compute = op.flops / (attn_peak * gpu.attn_eff * wave)
    elif op.kind == "w4a4":
        compute = op.flops / (_lowbit_peak(gpu, op.fmt) * gpu.lowbit_eff * wave)
        compute += op.flops_aux / (gpu.bf16 * gpu.mm_eff)
    elif op.kind == "w4a16":
        compute = op.flops / (gpu.bf16 * gpu.mm_eff * wave)
    elif op.kind == "quant":
        compute = op.flops_aux / (gpu.bf16 * gpu.mm_eff)
    else:
        compute = 0.0
    return max(compute, memory)


def simulate(ops, gpu: GPU, attn_peak: float | None = None) -> dict[str, float]:
    """Run ``ops`` through the single-stream queue; seconds per component and ``"total"``.

    Components: ``attention``, ``linear``, ``other`` (GPU busy) and ``host`` (GPU idle,
    waiting for the host to issue the next kernel).
    """
    attn_peak = attn_peak or gpu.bf16
    out = {"attention": 0.0, "linear": 0.0, "other": 0.0, "host": 0.0}
    host = busy_until = 0.0
    for op in ops:
        host += gpu.dispatch_s
        if host > busy_until:
            out["host"] += host - busy_until
            busy_until = host
        t = op_seconds(op, gpu, attn_peak)
        out[op.component] += t
        busy_until += t
    out["total"] = busy_until
    return out


# Text encoders, counted analytically (the same for a base model and its DC-Gen version):
# (parameters in the matrix products, layers, hidden width, heads x head dim).
# T5-XXL encoder v1.1: 24 layers, d_model 4096, 64 heads x 64, gated-GELU FFN 10240
#   -> 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240) = 4.63e9 parameters (FLUX, 512 tokens).
# Gemma-2-2B: 26 layers, hidden 2304, 8 heads x 256 (4 KV heads), gated FFN 9216
#   -> 26 * (2304 * 256 * (8 + 4 + 4) + 8 * 256 * 2304 + 3 * 2304 * 9216) = 2.0e9 (SANA, 300).
# CLIP-L (FLUX's pooled embedding, 0.12e9 parameters on 77 tokens) is < 0.3% of T5's work and
# is left out. Kernels per layer: ~25 (eager attention + FFN + norms).
TEXT_ENCODERS = {
    "flux": {"params": 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240), "layers": 24, "width": 4096},
    "sana": {
        "params": 26 * (2304 * 256 * 16 + 8 * 256 * 2304 + 3 * 2304 * 9216),
        "layers": 26,
        "width": 2048,
    },
}
_TEXT_OPS_PER_LAYER = 25


def text_encoder_seconds(family: str, tokens: int, gpu: GPU) -> float:
    """Time of the prompt's text encoding: max(compute, weight reads, kernel issue)."""
    enc = TEXT_ENCODERS[family]
    flops = 2.0 * enc["params"] * tokens + 4.0 * enc["layers"] * tokens**2 * enc["width"]
    compute = flops / (gpu.bf16 * gpu.mm_eff)
    weights = 2.0 * enc["params"] / (gpu.bandwidth * gpu.bw_eff)
    issue = enc["layers"] * _TEXT_OPS_PER_LAYER * gpu.dispatch_s
    return max(compute, weights, issue)


@dataclass
class Prediction:
    """Predicted whole-image latency of one configuration, with its breakdown (seconds)."""

    model: str
    autoencoder: str
    resolution: int
    precision: str
    steps: int
    tokens: int
    step_s: float
    decode_s: float
    text_s: float
    total_s: float
    step: dict[str, float] = field(default_factory=dict)
    step_flops: float = 0.0
    decode_flops: float = 0.0

    def breakdown(self) -> dict[str, float]:
        """Whole-image seconds per component: attention / linear / other / vae.

        ``other`` = memory-bound ops + host-bound idle time of every step + text encoding.
        """
        s = self.steps
        return {
            "attention": s * self.step["attention"],
            "linear": s * self.step["linear"],
            "other": s * (self.step["other"] + self.step["host"]) + self.text_s,
            "vae": self.decode_s,
        }

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "step"}
        d["step_breakdown"] = dict(self.step)
        d["breakdown"] = self.breakdown()
        return d


def predict_image(
    gpu: GPU,
    model: str,
    resolution: int,
    steps: int,
    precision: str = "bf16",
    autoencoder: str | None = None,
    fuse_qkv: bool = True,
) -> Prediction:
    """Predict whole-image latency of ``model`` at ``resolution`` on ``gpu``.

    ``precision`` "bf16" or "w4a4" (the GPU's native 4-bit format: INT4 on Hopper, NVFP4 on
    Blackwell) or an explicit "int4" / "nvfp4". ``fuse_qkv``: see :func:`step_ops` (4-bit only).
    """
    spec = configs.transformer_spec(model)
    ae = autoencoder or spec.autoencoder
    fmt = gpu.lowbit_format if precision == "w4a4" else precision
    if fmt not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected bf16, w4a4, int4 or nvfp4")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    ops = step_ops(model, resolution, fmt, ae, fuse_qkv)
    attn_peak = gpu.bf16 if fmt == "bf16" else gpu.fp16_acc16
    step = simulate(ops, gpu, attn_peak)
    dec_ops = decode_ops(ae, resolution)
    decode = simulate(dec_ops, gpu)["total"]
    text = text_encoder_seconds(spec.family, spec.text_tokens, gpu)
    return Prediction(
        model=model,
        autoencoder=ae,
        resolution=resolution,
        precision=fmt,
        steps=steps,
        tokens=spec.tokens(resolution, ae),
        step_s=step["total"],
        decode_s=decode,
        text_s=text,
        total_s=steps * step["total"] + decode + text,
        step=step,
        step_flops=sum(o.flops + o.flops_aux for o in ops),
        decode_flops=sum(o.flops for o in dec_ops),
    )
