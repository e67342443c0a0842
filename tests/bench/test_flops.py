"""The traced FLOP count of one full-size FLUX step against an independent analytic count."""

from __future__ import annotations

import pytest
import torch

from dcgen_quant.bench import configs, latency, opcount


def analytic_flux_step_flops(image_tokens: int, text_tokens: int = 512) -> dict[str, float]:
    """FLOPs of one FLUX.1 forward, counted by hand from the architecture (batch 1).

    Hidden H = 3072 (24 heads x 128), MLP 4H, 19 double-stream blocks (separate image and text
    weights, joint attention over N = image + text tokens), 38 single-stream blocks (fused qkv +
    MLP-in, then proj_out over concat(attn, mlp) = 5H), AdaLayerNorm modulation linears on the
    one conditioning vector, embedders and output head. A linear of K -> N over M tokens costs
    2 M K N; attention costs 2 N^2 H for Q K^T and 2 N^2 H for P V.
    """
    h, t, l = 3072, image_tokens, text_tokens
    n = t + l
    per_token_block = 2 * (3 * h * h + h * h + 2 * h * 4 * h)  # qkv, out, MLP (one stream)
    double = per_token_block * (t + l) + 2 * (2 * h * 6 * h)  # + norm1 / norm1_context
    single = 2 * (3 * h * h + h * 4 * h + 5 * h * h) * n + 2 * h * 3 * h
    attention = 4 * n * n * h
    embed = 2 * 64 * h * t + 2 * 4096 * h * l  # x_embedder, context_embedder
    embed += 2 * 2 * (256 * h + h * h)  # timestep and guidance embedders
    embed += 2 * (768 * h + h * h)  # pooled text embedder
    head = 2 * h * 2 * h + 2 * h * 64 * t  # norm_out modulation, proj_out
    linear = 19 * double + 38 * single + embed + head
    return {"linear": float(linear), "attention": float(57 * attention)}


def test_flux_1k_step_flops_match_analytic():
    traced = opcount.summarize(latency.step_ops("flux", 1024))
    expected = analytic_flux_step_flops(4096)
    total = expected["linear"] + expected["attention"]
    assert traced["total"]["flops"] == pytest.approx(total, rel=0.05)
    assert traced["attention"]["flops"] == pytest.approx(expected["attention"], rel=0.05)
    assert traced["linear"]["flops"] == pytest.approx(expected["linear"], rel=0.05)
    # REFERENCE.md's back-of-envelope: ~74 TFLOP at 1K, ~3.9 PFLOP at 4K
    assert 7.0e13 < total < 8.0e13


def test_trace_agrees_with_torch_flop_counter():
    """Our recorder (fused SDPA) and FlopCounterMode (SDPA decomposed on meta) agree."""
    from torch.utils.flop_counter import FlopCounterMode

    model = configs.build_transformer("dcgen-flux-f64c128")
    inputs = configs.transformer_inputs("dcgen-flux-f64c128", 2048)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    ours = opcount.summarize(latency.step_ops("dcgen-flux-f64c128", 2048))["total"]["flops"]
    assert ours == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert ours == pytest.approx(sum(analytic_flux_step_flops(1024).values()), rel=0.05)


def test_block_replication_is_exact():
    """step_ops traces 2 blocks per kind and replicates; the full-depth trace is identical."""
    from dcgen_quant.bench.w4a4 import convert_to_w4a4

    full = configs.build_transformer("flux")
    convert_to_w4a4(full, "int4")
    inputs = configs.transformer_inputs("flux", 1024)
    reference = opcount.trace(lambda: full(**inputs))

    def key(op):
        return (op.name, op.kind, op.component, op.flops, op.flops_aux, op.bytes, op.tiles)

    assert [key(o) for o in latency.step_ops("flux", 1024, "int4")] == [key(o) for o in reference]
