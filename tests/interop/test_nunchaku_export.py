"""``convert --to nunchaku`` (dcgen_quant/interop/nunchaku/exporter.py) on tiny FLUX models
quantized by our quantizer: the whole-model golden against DeepCompressor's converter, the
tensor-level inverse, the metadata, and the full FLUX.1-dev geometry planned on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dcgen_quant.formats import dequantize_weight
from dcgen_quant.formats.int4 import unpack_int4
from dcgen_quant.interop.nunchaku import packing as P
from dcgen_quant.interop.nunchaku.exporter import convert_to_nunchaku, plan_export
from dcgen_quant.interop.source import CheckpointSource, StateDictSource

from .conftest import HEADS
from .deepcompressor_dicts import deepcompressor_dicts
from .oracle import deepcompressor, quiet

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def exported(request, tmp_path_factory, quantized_flux):
    """(fmt, our checkpoint, the Nunchaku file exported from it, the export's result)."""
    fmt = request.param
    d = tmp_path_factory.mktemp(f"export-{fmt}")
    ours = quantized_flux(fmt)
    result = convert_to_nunchaku(ours, d / "nunchaku.safetensors")
    return fmt, ours, d / "nunchaku.safetensors", result


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bytes(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.slow
def test_golden_against_deepcompressor(exported):
    """Every tensor DeepCompressor's converter writes from the same quantized tensors is in our
    file with equal bytes, except these (each checked exactly):

    * ``out_proj_context.{smooth, smooth_orig, lora_down}``: the converter takes the smoothing
      of ``attn.to_out.0`` for both output projections (its quantizer smooths them together);
      ours smooths ``to_add_out`` on its own. Checked against the converter's per-layer function
      given that layer's own smoothing.
    * NVFP4 ``qweight``: our E2M1 code 8 (negative zero, from negatives that round to 0) where
      the converter, dividing bf16 values, can only produce code 0. Same value.
    * NVFP4 ``wtscale``: ours is the FP32 tensor scale itself (the C++ loader reads FP32, V2
      pops it into a Python float); the converter rounds it to bf16. Checked: theirs ==
      bf16(ours).
    * NVFP4 fused ``qkv_proj(_context)``: the converter turns the members' tensor scales into a
      per-channel bf16 ``wcscales``; our members share one tensor scale, written as an FP32
      ``wtscale``. Checked: their wcscales == bf16(our wtscale) on every channel.
    """
    utils, convert, _ = deepcompressor()
    fmt, ours_path, nk_path, _ = exported
    ours = load_file(str(nk_path))
    model, scale, smooth, branch = deepcompressor_dicts(ours_path)
    converted, other = quiet(
        convert.convert_to_nunchaku_flux_state_dicts, model, scale, smooth, branch,
        float_point=fmt == "nvfp4",
    )  # fmt: skip
    theirs = {**converted, **other}
    wc = {k for k in theirs if k.endswith(".wcscales")}
    wt_only = {k.replace(".wcscales", ".wtscale") for k in wc}
    assert set(theirs) - wc == set(ours) - wt_only
    if fmt == "int4":
        assert not wc and len(ours) == 224  # 2 x 68 + 2 x 34 + 20 (section 1.4's counts)
    else:
        assert len(wc) == 6 and len(ours) == 224 + 24
    explained = []
    for key, t in theirs.items():
        if key in wc:
            n = 3 * 64 * HEADS[fmt]  # q|k|v rows
            w = ours[key.replace(".wcscales", ".wtscale")]
            assert torch.equal(P.pack_vector(w.to(torch.bfloat16).expand(n).contiguous()), t)
            explained.append(key)
            continue
        o = ours[key]
        if ".out_proj_context." in key and key.rsplit(".", 1)[1] in ("smooth", "smooth_orig",
                                                                      "lora_down"):  # fmt: skip
            explained.append(key)
            continue
        if fmt == "nvfp4" and key.endswith(".wtscale"):
            assert o.dtype == torch.float32 and torch.equal(o.to(torch.bfloat16), t), key
            explained.append(key)
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, key
        if torch.equal(_bytes(o), _bytes(t)):
            continue
        assert fmt == "nvfp4" and key.endswith(".qweight"), key
        nib = torch.stack((_bytes(o) & 15, _bytes(o) >> 4))
        zeroed = torch.where(nib == 8, 0, nib)
        assert torch.equal(zeroed[0] | (zeroed[1] << 4), _bytes(t)), key
        explained.append(key)
    # the out_proj_context layers agree with the converter given their own smoothing
    block_names = {k.split(".out_proj_context.")[0] for k in ours if ".out_proj_context." in k}
    src = load_file(str(ours_path))
    for b in sorted(block_names):
        layer = f"{b}.attn.to_add_out"
        smooth_own = src[f"{layer}.smooth_factor"]
        a = src[f"{layer}.proj_down"].t().double() * smooth_own.double()
        ref = convert.convert_to_nunchaku_w4x4y16_linear_state_dict(
            weight=model[f"{layer}.weight"], scale=scale[f"{layer}.weight.scale.0"],
            bias=model[f"{layer}.bias"], smooth=smooth_own,
            lora=(a, src[f"{layer}.proj_up"]), float_point=fmt == "nvfp4",
            subscale=scale.get(f"{layer}.weight.scale.1"),
        )  # fmt: skip
        for suffix in ("smooth", "smooth_orig", "lora_down"):
            assert torch.equal(ours[f"{b}.out_proj_context.{suffix}"], ref[suffix]), (b, suffix)
    if fmt == "int4":
        assert len(explained) == 6, explained


@pytest.mark.slow
def test_export_inverts_to_our_tensors(exported):
    """Unpacking the file gives back every tensor of our checkpoint bit for bit (the adaLN bias
    up to the 16-bit rounding of the folded +1, counted in the export's result)."""
    fmt, ours_path, nk_path, result = exported
    src, nk = load_file(str(ours_path)), load_file(str(nk_path))
    source = CheckpointSource(ours_path)
    plan = plan_export(source)
    rank = plan.rank
    for block in plan.blocks:
        for item in block.items:
            if hasattr(item, "members"):
                k = item.k
                packed = P.unpack_qweight_nibbles(nk[f"{item.out}.qweight"], item.n, k)
                v = P.unpack_lowrank_down(nk[f"{item.out}.lora_down"], rank, k)
                u = P.unpack_lowrank_up(nk[f"{item.out}.lora_up"], item.n, rank)
                smooth = P.unpack_vector(nk[f"{item.out}.smooth"], k)
                row = 0
                for m in item.members:
                    name, cols = m.layer, m.cols or (0, source.layers[m.layer]["in_features"])
                    n = source.layers[name]["out_features"]
                    want = src[f"{name}.qweight"][:, cols[0] // 2 : cols[1] // 2]
                    assert torch.equal(packed[row : row + n], want), name
                    r = src[f"{name}.proj_up"].shape[1]
                    assert torch.equal(u[row : row + n, :r], src[f"{name}.proj_up"]), name
                    assert not u[row : row + n, r:].any()
                    down = src[f"{name}.proj_down"][cols[0] : cols[1]]
                    assert torch.equal(v[:r].t(), down) and not v[r:].any(), name
                    assert torch.equal(smooth, src[f"{name}.smooth_factor"][cols[0] : cols[1]])
                    row += n
            elif hasattr(item, "chunks"):
                groups = item.i // 64
                q = P.deinterleave_adanorm(P.unpack_awq_qweight(nk[f"{item.out}.qweight"]),
                                           item.chunks)  # fmt: skip
                codes = unpack_int4(src[f"{item.src}.qweight"])
                assert torch.equal(q.to(torch.int8) - 7, codes), item.out
                s = P.unpack_awq_scales(nk[f"{item.out}.wscales"], groups)
                assert torch.equal(P.deinterleave_adanorm(s, item.chunks),
                                   src[f"{item.src}.wscales"].t())  # fmt: skip
                bias = P.unfold_adanorm_bias(nk[f"{item.out}.bias"], item.chunks)
                same = bias == src[f"{item.src}.bias"]
                assert same.float().mean() > 0.5, item.out  # most b + 1 are exact
    kinds = {c["kind"] for c in result["changes"]}
    assert kinds <= {"adaln-bias-fold", "awq-zero"}  # nothing lossy in a compatible checkpoint
    assert all(not c["lossy"] for c in result["changes"])
    if fmt == "nvfp4":
        w = src["transformer_blocks.0.attn.to_q.wtscale"]
        assert torch.equal(nk["transformer_blocks.0.qkv_proj.wtscale"], w.reshape(1))


def test_metadata_and_loader_contract(exported):
    """The four metadata entries Nunchaku's loaders and ComfyUI-nunchaku read."""
    fmt, ours_path, nk_path, _ = exported
    meta = safe_open(str(nk_path), framework="pt").metadata()
    config = json.loads(meta["config"])
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert config["num_attention_heads"] == HEADS[fmt] and config["num_layers"] == 2
    q = json.loads(meta["quantization_config"])
    assert q["method"] == "svdquant" and q["rank"] == 32
    assert q["weight"]["dtype"] == ("int4" if fmt == "int4" else "fp4_e2m1_all")
    assert q["weight"]["group_size"] == (64 if fmt == "int4" else 16)
    comfy = json.loads(meta["comfy_config"])
    assert comfy["model_class"] == "Flux"  # guidance embedding: FLUX.1-dev style
    mc = comfy["model_config"]
    assert (
        mc["in_channels"] == 16 and mc["patch_size"] == 2 and mc["hidden_size"] == 64 * HEADS[fmt]
    )
    assert meta["model_class"] == "NunchakuFluxTransformer2dModel"
    # every 16-bit tensor is bf16 (V2 asserts equal dtypes), rank read by the C++ loader
    nk = safe_open(str(nk_path), framework="pt")
    dtypes = {nk.get_slice(k).get_dtype() for k in nk.keys()}  # noqa: SIM118
    assert dtypes <= {"BF16", "I8", "I32", "F8_E4M3", "F32"}
    assert nk.get_slice("transformer_blocks.0.qkv_proj.lora_down").get_shape()[1] == q["rank"]


def _flux_dev_source(fmt, **overrides):
    from dcgen_quant.bench.configs import build_transformer
    from dcgen_quant.bench.w4a4 import convert_to_w4a4

    model = build_transformer("flux", device="meta", **overrides)
    convert_to_w4a4(model, fmt, rank=32, fuse=False)
    assert all(t.is_meta for t in model.state_dict().values())
    return StateDictSource.from_model(model)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_full_flux_dev_geometry_on_meta(fmt):
    """Section 1.4: 2604 tensors for FLUX.1-dev INT4 r32 (+ one wtscale per W4A4 layer in
    NVFP4), names and shapes of the table, planned without materializing a weight."""
    plan = plan_export(_flux_dev_source(fmt))
    specs = plan.specs
    w4a4_layers = 19 * 8 + 38 * 4
    assert len(specs) == 2604 + (w4a4_layers if fmt == "nvfp4" else 0)
    bf16, i8 = torch.bfloat16, torch.int8
    b = "transformer_blocks.7"
    table = {  # layer: (qweight, wscales (INT4), bias, smooth, lora_down, lora_up)
        "qkv_proj": ((9216, 1536), (48, 9216), (9216,), (3072,), (3072, 32), (9216, 32)),
        "qkv_proj_context": ((9216, 1536), (48, 9216), (9216,), (3072,), (3072, 32), (9216, 32)),
        "out_proj": ((3072, 1536), (48, 3072), (3072,), (3072,), (3072, 32), (3072, 32)),
        "out_proj_context": ((3072, 1536), (48, 3072), (3072,), (3072,), (3072, 32), (3072, 32)),
        "mlp_fc1": ((12288, 1536), (48, 12288), (12288,), (3072,), (3072, 32), (12288, 32)),
        "mlp_context_fc2": ((3072, 6144), (192, 3072), (3072,), (12288,), (12288, 32), (3072, 32)),
    }
    for layer, (qw, ws, bias, sm, down, up) in table.items():
        p = f"{b}.{layer}"
        assert specs[f"{p}.qweight"] == (i8, qw)
        if fmt == "int4":
            assert specs[f"{p}.wscales"] == (bf16, ws)
            assert f"{p}.wtscale" not in specs
        else:  # e4m3 (K/16, N) and an FP32 tensor scale
            assert specs[f"{p}.wscales"] == (torch.float8_e4m3fn, (ws[0] * 4, ws[1]))
            assert specs[f"{p}.wtscale"] == (torch.float32, (1,))
        for suffix, shape in (("bias", bias), ("smooth", sm), ("smooth_orig", sm),
                              ("lora_down", down), ("lora_up", up)):  # fmt: skip
            assert specs[f"{p}.{suffix}"] == (bf16, shape), (p, suffix)
    s = "single_transformer_blocks.37"
    assert specs[f"{s}.out_proj.qweight"] == (i8, (3072, 1536))
    assert specs[f"{s}.mlp_fc2.qweight"] == (i8, (3072, 6144))
    assert specs[f"{s}.mlp_fc1.lora_up"] == (bf16, (12288, 32))
    assert specs[f"{b}.norm1.linear.qweight"] == (torch.int32, (4608, 1536))
    assert specs[f"{b}.norm1_context.linear.wscales"] == (bf16, (48, 18432))
    assert specs[f"{b}.norm1.linear.wzeros"] == (bf16, (48, 18432))
    assert specs[f"{b}.norm1.linear.bias"] == (bf16, (18432,))
    assert specs[f"{s}.norm.linear.qweight"] == (torch.int32, (2304, 1536))
    assert specs[f"{s}.norm.linear.wscales"] == (bf16, (48, 9216))
    assert specs[f"{b}.norm_added_k.weight"] == (bf16, (128,))
    assert specs["x_embedder.weight"] == (bf16, (3072, 64))
    assert specs["proj_out.weight"] == (bf16, (64, 3072))
    top = [k for k in specs if not k.startswith(("transformer_blocks", "single_transformer"))]
    assert len(top) == 20


def test_dcgen_flux_exports_with_its_own_config():
    """A DC-Gen-adapted FLUX (DC-AE f64c128: 128 channels, patch 1) keeps its embedder, head
    and config; ComfyUI's patch size defaults to 1 there."""
    plan = plan_export(_flux_dev_source("int4", in_channels=128, out_channels=128))
    assert plan.specs["x_embedder.weight"] == (torch.bfloat16, (3072, 128))
    assert plan.specs["proj_out.weight"] == (torch.bfloat16, (128, 3072))
    assert plan.patch_size == 1
    from dcgen_quant.interop.nunchaku import metadata as M

    comfy = M.comfy_config({"in_channels": 128, "out_channels": 128, "num_attention_heads": 24,
                            "attention_head_dim": 128, "joint_attention_dim": 4096,
                            "num_layers": 19, "num_single_layers": 38,
                            "pooled_projection_dim": 768, "guidance_embeds": True},
                           plan.patch_size)  # fmt: skip
    assert comfy["model_config"]["in_channels"] == 128 and comfy["model_config"]["patch_size"] == 1


def test_unfolded_dense_matches_source_layer(exported):
    """Section 2.9's dense reconstruction from the exported file (float64) equals our layer's:
    ``W = Q*S/smooth + U V`` for one fused qkv and the GELU-input fc2 (whose bias carries the
    shift: b_dense = bias + 0.171875 * rowsum(Q*S/smooth) for INT4)."""
    fmt, ours_path, nk_path, _ = exported
    src, nk = load_file(str(ours_path)), load_file(str(nk_path))
    source = CheckpointSource(ours_path)
    b = "transformer_blocks.1"
    for out, name in (("qkv_proj", "attn.to_k"), ("mlp_fc2", "ff.net.2")):
        layer = f"{b}.{name}"
        info = source.layers[layer]
        n, k = info["out_features"], info["in_features"]
        n_all = n * (3 if out == "qkv_proj" else 1)
        rows = slice(n, 2 * n) if out == "qkv_proj" else slice(0, n)
        rank = plan_export(source).rank
        q = P.unpack_qweight(nk[f"{b}.{out}.qweight"], n_all, k, signed=fmt == "int4")[rows]
        if fmt == "int4":
            s = P.unpack_wscales(nk[f"{b}.{out}.wscales"], n_all, k // 64)[rows].double()
            wdq = q.double().reshape(n, -1, 64) * s[..., None]
        else:
            from dcgen_quant.formats.nvfp4 import e2m1_decode

            s = P.unpack_fp8_wscales(nk[f"{b}.{out}.wscales"], n_all, k // 16)[rows].double()
            wt = nk[f"{b}.{out}.wtscale"].double()
            wdq = e2m1_decode(q).double().reshape(n, -1, 16) * s[..., None] * wt
        wdq = wdq.reshape(n, k)
        sm = P.unpack_vector(nk[f"{b}.{out}.smooth"], k).double()
        u = P.unpack_lowrank_up(nk[f"{b}.{out}.lora_up"], n_all, rank)[rows].double()
        v = P.unpack_lowrank_down(nk[f"{b}.{out}.lora_down"], rank, k).double()
        dense = wdq / sm + u @ v
        from dcgen_quant.formats import QuantizedWeight

        qw = QuantizedWeight(src[f"{layer}.qweight"], src[f"{layer}.wscales"],
                             src.get(f"{layer}.wtscale"), fmt)  # fmt: skip
        ref = dequantize_weight(qw, apply_tensor_scale=False).double()
        if fmt == "nvfp4":
            ref = ref * src[f"{layer}.wtscale"].double()
        ref = ref / src[f"{layer}.smooth_factor"].double()
        ref = ref + src[f"{layer}.proj_up"].double() @ src[f"{layer}.proj_down"].double().t()
        assert torch.equal(dense, ref), layer
        bias = P.unpack_vector(nk[f"{b}.{out}.bias"], n_all)[rows]
        assert torch.equal(bias, src[f"{layer}.bias"])
