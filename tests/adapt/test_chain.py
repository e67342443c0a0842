"""The chain the project exists for: adapt -> quantize -> load -> forward, on tiny models."""

import torch
from diffusers import FluxTransformer2DModel

from dcgen_quant.checkpoint import load_quantized
from dcgen_quant.models import synthetic_calibration
from dcgen_quant.nn import SVDQLinear

from .helpers import chain_args, run_cli


def test_adapt_then_quantize_then_load_then_forward(flux_inputs, tmp_path, capsys):
    out = tmp_path / "adapted"
    code, _, err = run_cli(chain_args(flux_inputs, out, "--stage", "all", "--steps", "2"), capsys)
    assert code == 0, err
    ckpt = tmp_path / "adapted-int4.safetensors"
    argv = ["quantize", "--model", str(out / "model"), "--out", str(ckpt), "--rank", "8",
            "--calib-samples", "2", "--steps", "2", "--threads", "1"]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err

    adapted = FluxTransformer2DModel.from_pretrained(out / "model", local_files_only=True)
    quantized = load_quantized(ckpt).float()  # checkpoint in bf16; compare in fp32
    assert quantized.config.in_channels == adapted.config.in_channels == 32  # the new latent
    assert isinstance(quantized.transformer_blocks[0].attn.to_q, SVDQLinear)
    inputs = synthetic_calibration(adapted, samples=1, steps=1, seed=5)[0]
    with torch.no_grad():
        ref = adapted(**inputs)[0].float()
        got = quantized(**inputs)[0].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    # measured 0.008 (INT4, rank 8, 2x2 calibration samples, bf16 layers); a broken chain is O(1)
    print(f"adapt->quantize chain: relative output error {rel:.4f}")
    assert rel < 0.2, rel
