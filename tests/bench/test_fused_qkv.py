"""The W4A4 latency model counts FLUX q/k/v as runtime fusion runs them.

:func:`dcgen_quant.fusion.fuse_projections` makes each q/k/v group (and the added q/k/v of the
double-stream blocks) one SVDQLinear: one ``quantize_act`` over the shared input and one GEMM of
three times the width. The traced step must launch exactly that, checked here against counts
written by hand from FLUX's architecture and the op shapes of dcgen_quant/ops.py.
"""

from __future__ import annotations

import pytest
import torch

from dcgen_quant.bench import configs, hardware, latency, measured, opcount
from dcgen_quant.bench.w4a4 import convert_to_w4a4

H, RANK, TEXT = 3072, 32, 512  # FLUX hidden width, SVDQuant rank, T5 tokens
IMAGE = 4096  # FLUX at 1K: (1024 / 16)^2 image tokens


def quantize_act_bytes(m: int, k: int, fmt: str) -> int:
    """Bytes one ``quantize_act`` moves over x [m, k] bf16 (shapes in dcgen_quant/ops.py).

    Reads x [m, k], smooth [k] and proj_down [k, r] (bf16); writes the packed codes
    [m, k/2] uint8, the scales [m, k/G] (bf16 for INT4, G = 64; FP8 for NVFP4, G = 16) and
    lora_act [m, r] float32.
    """
    group, scale_bytes = {"int4": (64, 2), "nvfp4": (16, 1)}[fmt]
    reads = 2 * m * k + 2 * k + 2 * k * RANK
    writes = m * k // 2 + scale_bytes * m * k // group + 4 * m * RANK
    return reads + writes


def block_layers(kind: str, fused: bool, fmt: str) -> list[tuple[int, int, int]]:
    """(M, K, N) of every W4A4 layer of one FLUX block at 1K (modulation linears are W4A16).

    Double-stream: per stream (image M = 4096, text M = 512) q, k, v, the output projection and
    the MLP (H -> 4H -> H). Single-stream over the joint sequence (4608 tokens): q, k, v,
    proj_mlp (H -> 4H) and proj_out over concat(attention, MLP) (5H -> H); in INT4 proj_out is
    split into its attention part (H -> H) and its GELU part (4H -> H). Fused, each q/k/v
    triple is one layer of N = 3H.
    """
    qkv = [(H, 3 * H)] if fused else [(H, H)] * 3
    if kind == "double":
        per_stream = [*qkv, (H, H), (H, 4 * H), (4 * H, H)]
        return [(m, k, n) for m in (IMAGE, TEXT) for k, n in per_stream]
    joint = IMAGE + TEXT
    proj_out = [(H, H), (4 * H, H)] if fmt == "int4" else [(5 * H, H)]
    return [(joint, k, n) for k, n in [*qkv, (H, 4 * H), *proj_out]]


def _block_ops(ops, segment: str, kind: str) -> list[opcount.Op]:
    return sorted(
        (o for o in ops if o.segment == segment and o.kind == kind), key=lambda o: o.bytes
    )


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def traces(request):
    fmt = request.param
    return fmt, {f: latency.step_ops("flux", 1024, fmt, fuse_qkv=f) for f in (True, False)}


@pytest.mark.parametrize(("kind", "segment"), [
    ("double", "transformer_blocks.0"), ("single", "single_transformer_blocks.0"),
])  # fmt: skip
def test_one_quantize_act_and_one_gemm_per_qkv_group(traces, kind, segment):
    fmt, ops = traces
    for fused in (True, False):
        layers = block_layers(kind, fused, fmt)
        quant = _block_ops(ops[fused], segment, "quant")
        expected = sorted(quantize_act_bytes(m, k, fmt) for m, k, _ in layers)
        assert [o.bytes for o in quant] == expected, (fused, fmt)
        # the down projection x @ proj_down runs once per quantize_act
        assert sorted(o.flops_aux for o in quant) == sorted(
            2.0 * m * k * RANK for m, k, _ in layers
        )
        gemms = _block_ops(ops[fused], segment, "w4a4")
        assert sorted(o.flops for o in gemms) == sorted(2.0 * m * k * n for m, k, n in layers)
    # per double block: 12 -> 8 quantize_act (two groups); per single block 5 -> 3 (one group;
    # 6 -> 4 in INT4, where proj_out is two parts)
    groups = 2 if kind == "double" else 1
    quant = {f: _block_ops(ops[f], segment, "quant") for f in (True, False)}
    assert len(quant[False]) - len(quant[True]) == 2 * groups
    ms = (IMAGE, TEXT) if kind == "double" else (IMAGE + TEXT,)
    saved = sum(2 * quantize_act_bytes(m, H, fmt) for m in ms)
    assert sum(o.bytes for o in quant[False]) - sum(o.bytes for o in quant[True]) == saved


def test_whole_step_counts(traces):
    fmt, ops = traces
    count = {f: sum(o.kind == "quant" for o in ops[f]) for f in (True, False)}
    split = fmt == "int4"  # each single block's proj_out: two parts, two quantize_act
    assert count == {True: 19 * 8 + 38 * (3 + split), False: 19 * 12 + 38 * (5 + split)}
    # nothing but the 4-bit linears changes: the same memory-bound ops, the same attention
    for kind in ("mem", "attn", "w4a16"):
        a, b = ([(o.name, o.bytes) for o in ops[f] if o.kind == kind] for f in (True, False))
        assert a == b, kind
    w4a4 = {f: sum(o.flops for o in ops[f] if o.kind == "w4a4") for f in (True, False)}
    assert w4a4[True] == w4a4[False]


def test_meta_trace_is_the_trace_of_a_real_fused_model():
    """The meta-device model fuses exactly as a materialized one: identical traces op by op."""
    over = measured.TINY_TRANSFORMER["flux"]

    def trace(device: str, fuse: bool):
        model = configs.build_transformer("flux", "meta", torch.float32, **over)
        if device != "meta":
            model = measured.init_random_(model.to_empty(device=device))
        counts = convert_to_w4a4(model, "int4", fuse=fuse)
        inputs = configs.transformer_inputs("flux", 256, device, torch.float32, config=over,
                                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        ops = opcount.trace(lambda: model(**inputs))
        return counts["fused_attentions"], [
            (o.name, o.kind, o.flops, o.flops_aux, o.bytes, o.tiles) for o in ops
        ]

    fused_meta, fused_cpu = trace("meta", True), trace("cpu", True)
    assert fused_meta[0] == fused_cpu[0] == 2  # one double-stream and one single-stream block
    assert fused_meta[1] == fused_cpu[1]
    unfused = trace("meta", False)
    assert unfused[0] == 0
    assert (
        sum(k[1] == "quant" for k in unfused[1]) == sum(k[1] == "quant" for k in fused_meta[1]) + 6
    )


def test_fusion_makes_the_w4a4_prediction_faster_and_leaves_bf16_alone():
    gpu = hardware.get_gpu("h100")
    args = ("dcgen-flux-f64c128", 4096, 20)
    fused = latency.predict_image(gpu, *args, "w4a4")
    unfused = latency.predict_image(gpu, *args, "w4a4", fuse_qkv=False)
    assert fused.step["linear"] < unfused.step["linear"]
    assert fused.step["attention"] == unfused.step["attention"]
    assert fused.total_s < unfused.total_s
    bf16 = [latency.predict_image(gpu, *args, fuse_qkv=f).total_s for f in (True, False)]
    assert bf16[0] == bf16[1]


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_convert_follows_the_quantizer_plan_for_gelu_inputs(fmt):
    """INT4: the FeedForward net.2 layers read unsigned codes and the single block's proj_out is
    split, as dcgen_quant.quantize plans them; NVFP4 has neither."""
    from dcgen_quant.nn import SVDQLinear, SVDQSplitLinear

    over = measured.TINY_TRANSFORMER["flux"]
    model = configs.build_transformer("flux", "meta", torch.float32, **over)
    counts = convert_to_w4a4(model, fmt)
    int4 = fmt == "int4"
    assert (counts["unsigned"], counts["split"]) == ((2, 1) if int4 else (0, 0))
    ff = model.transformer_blocks[0].ff.net[2]
    assert type(ff) is SVDQLinear and ff.act_unsigned == int4
    proj_out = model.single_transformer_blocks[0].proj_out
    assert type(proj_out) is (SVDQSplitLinear if int4 else SVDQLinear)
