"""Shared fixtures of the interop tests: tiny FLUX checkpoints quantized by our quantizer."""

from __future__ import annotations

import pytest
import torch

from dcgen_quant.checkpoint import save_quantized
from dcgen_quant.models.calibration import synthetic_calibration
from dcgen_quant.models.tiny import tiny_flux
from dcgen_quant.quantize import quantize_model
from dcgen_quant.quantize.config import QuantConfig

CHEAP = {"smooth_grid": 2, "lowrank_iters": 1, "calib_tokens": 256, "search_tokens": 128}
# INT4 at hidden 192 (3 heads): N and K need padding to 128 (192 -> 256, 960 -> 1024). NVFP4 at
# hidden 128: DeepCompressor pads fp8 scales differently from the kernel when K % 128 == 64
# (test_nunchaku_packing.py), which would hide every other comparison of those layers.
HEADS = {"int4": 3, "nvfp4": 2}


def quantized_checkpoint(path, fmt, config=None, **overrides):
    """Quantize a tiny bf16 FLUX with our quantizer (one thread: many small LAPACK calls, which
    multi-threading slows down badly on a loaded machine) and save it to ``path``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        heads = HEADS[fmt]
        model = tiny_flux(seed=1, dtype=torch.bfloat16, num_attention_heads=heads, **overrides)
        calib = synthetic_calibration(model, samples=1, steps=1, seed=1)
        config = config or QuantConfig(format=fmt, nunchaku_compatible=True, **CHEAP)
        quantize_model(model.eval(), calib, config, progress=False)
        save_quantized(model, path)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="session")
def quantized_flux(tmp_path_factory):
    """``quantized_flux(fmt)``: path of a tiny FLUX checkpoint (``--nunchaku-compatible``),
    quantized once per session and format."""
    cache = {}

    def get(fmt):
        if fmt not in cache:
            d = tmp_path_factory.mktemp(f"quantized-{fmt}")
            cache[fmt] = quantized_checkpoint(d / "ours.safetensors", fmt)
        return cache[fmt]

    return get
