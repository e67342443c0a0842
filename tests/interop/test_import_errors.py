"""Bad Nunchaku / DeepCompressor input: each is one CheckpointError line naming the key, from
``load_quantized`` and from the conversion, which leaves nothing at (or next to) its output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dcgen_quant import load_quantized
from dcgen_quant.checkpoint import CheckpointError
from dcgen_quant.interop.nunchaku import packing
from dcgen_quant.interop.nunchaku.importer import convert_to_dcgen_quant, load_foreign

from .helpers import small_known

pytest.importorskip("deepcompressor.backend.nunchaku.convert")
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")


@pytest.fixture(scope="module")
def oracle():
    """(block tensors, top-level tensors, metadata) of an oracle-made INT4 and NVFP4 file."""
    out = {}
    for fmt in ("int4", "nvfp4"):
        kn = small_known(fmt)
        blocks, other = kn.oracle()
        meta = {"config": json.dumps(kn.config), "model_class": "NunchakuFluxTransformer2dModel"}
        out[fmt] = ({k: v.contiguous() for k, v in blocks.items()}, other, meta)
    return out


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def _expect_error(path, tmp_path, *needles):
    """load_quantized and convert both fail with one line containing ``needles``; no output."""
    with pytest.raises(CheckpointError) as info:
        load_quantized(path)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    out = tmp_path / "out" / "model.safetensors"
    with pytest.raises(CheckpointError) as info2:
        convert_to_dcgen_quant(path, out, progress=False)
    assert str(info2.value) == message
    assert (
        not out.exists() and not any((tmp_path / "out").glob("*")) if out.parent.exists() else True
    )
    return message


def test_the_unaltered_file_loads(oracle, tmp_path):
    blocks, other, meta = oracle["int4"]
    model = load_quantized(_write(tmp_path / "ok.safetensors", {**blocks, **other}, meta))
    assert type(model).__name__ == "FluxTransformer2DModel"


@pytest.mark.parametrize(
    "key",
    [
        "transformer_blocks.0.qkv_proj.wscales",
        "transformer_blocks.0.mlp_fc2.bias",
        "single_transformer_blocks.0.out_proj.smooth_orig",
        "single_transformer_blocks.0.norm.linear.wzeros",
        "transformer_blocks.0.norm_added_k.weight",
        "x_embedder.weight",
    ],
)
def test_missing_key(oracle, tmp_path, key):
    blocks, other, meta = oracle["int4"]
    tensors = {k: v for k, v in {**blocks, **other}.items() if k != key}
    _expect_error(
        _write(tmp_path / "missing.safetensors", tensors, meta), tmp_path, repr(key), "missing"
    )


@pytest.mark.parametrize(
    "key, shape",
    [
        ("transformer_blocks.0.mlp_fc1.bias", (1152,)),
        ("transformer_blocks.0.qkv_proj.qweight", (768, 64)),
        ("single_transformer_blocks.0.qkv_proj.lora_up", (768, 32)),
        ("context_embedder.weight", (256, 128)),
    ],
)
def test_altered_shape(oracle, tmp_path, key, shape):
    blocks, other, meta = oracle["int4"]
    tensors = {**blocks, **other}
    tensors[key] = torch.zeros(shape, dtype=tensors[key].dtype)
    _expect_error(_write(tmp_path / "shape.safetensors", tensors, meta), tmp_path, repr(key))


def test_mxfp4_file(oracle, tmp_path):
    """auto-round's MXFP4 export: E2M1 codes with UE8M0 uint8 scales per 32 (upstream Nunchaku
    has no MXFP4 kernels); refused by name, not misread as INT4 or NVFP4."""
    blocks, other, meta = oracle["nvfp4"]
    tensors = {**blocks, **other}
    for key in [k for k in tensors if k.endswith(".wscales") and ".norm" not in k]:
        n = tensors[key].shape[1]
        k = tensors[key.replace(".wscales", ".qweight")].shape[1] * 2
        tensors[key] = torch.full((k // 32, n), 127, dtype=torch.uint8)
    q = {
        "method": "svdquant",
        "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": "ue8m0", "group_size": 32},
    }
    meta = {**meta, "quantization_config": json.dumps(q)}
    _expect_error(_write(tmp_path / "mx.safetensors", tensors, meta), tmp_path, "MXFP4")


def test_truncated_file(oracle, tmp_path):
    blocks, other, meta = oracle["int4"]
    path = _write(tmp_path / "full.safetensors", {**blocks, **other}, meta)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as info:
        load_quantized(cut)
    assert "\n" not in str(info.value) and ("truncated" in str(info.value))
    out = tmp_path / "o.safetensors"
    with pytest.raises(CheckpointError, match="truncated: tensor '"):
        convert_to_dcgen_quant(cut, out, progress=False)
    assert not out.exists()


def test_extra_and_sana_and_bad_values(oracle, tmp_path):
    blocks, other, meta = oracle["int4"]
    base = {**blocks, **other}
    extra = {**base, "transformer_blocks.0.qkv_proj.wtscale": torch.ones(1, dtype=torch.bfloat16)}
    _expect_error(_write(tmp_path / "x.safetensors", extra, meta), tmp_path,
                  "'transformer_blocks.0.qkv_proj.wtscale'", "unexpected")  # fmt: skip
    sana = {
        **base,
        "transformer_blocks.0.ff.inverted_conv.qweight": torch.zeros(8, 8, dtype=torch.int8),
    }
    _expect_error(_write(tmp_path / "s.safetensors", sana, meta), tmp_path, "SANA", "not supported")
    nan = dict(base)
    nan["transformer_blocks.0.out_proj.bias"] = nan["transformer_blocks.0.out_proj.bias"].clone()
    nan["transformer_blocks.0.out_proj.bias"][3] = float("nan")
    _expect_error(_write(tmp_path / "n.safetensors", nan, meta), tmp_path,
                  "'transformer_blocks.0.out_proj.bias'", "NaN")  # fmt: skip
    f32 = {
        **base,
        "transformer_blocks.0.mlp_fc1.smooth": base["transformer_blocks.0.mlp_fc1.smooth"].float(),
    }
    _expect_error(
        _write(tmp_path / "d.safetensors", f32, meta),
        tmp_path,
        "'transformer_blocks.0.mlp_fc1.smooth'",
    )


def test_awq_code_outside_our_range(oracle, tmp_path):
    """Zero point 7 with stored code 15 is w = 8 s: signed INT4 (-8..7) cannot hold it."""
    blocks, other, meta = oracle["int4"]
    tensors = {**blocks, **other}
    key = "single_transformer_blocks.0.norm.linear.qweight"
    codes = packing.unpack_awq_qweight(tensors[key])
    codes[5, 17] = 15
    tensors[key] = packing.pack_awq_qweight(codes)
    _expect_error(
        _write(tmp_path / "awq.safetensors", tensors, meta), tmp_path, repr(key), "code 8"
    )


def test_awq_asymmetric_zeros(oracle, tmp_path):
    blocks, other, meta = oracle["int4"]
    tensors = {**blocks, **other}
    key = "transformer_blocks.0.norm1.linear.wzeros"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 3] = tensors[key][0, 3] * 0.5
    _expect_error(
        _write(tmp_path / "z.safetensors", tensors, meta), tmp_path, repr(key), "asymmetric"
    )


def test_nvfp4_wcscales_not_constant_per_member(oracle, tmp_path):
    blocks, other, meta = oracle["nvfp4"]
    tensors = {**blocks, **other}
    key = "transformer_blocks.0.qkv_proj.wcscales"
    assert key in tensors  # DeepCompressor's per-member tensor scales of the fused q/k/v
    tensors[key] = tensors[key].clone()
    tensors[key][1] = tensors[key][1] * 2
    _expect_error(
        _write(tmp_path / "wc.safetensors", tensors, meta), tmp_path, repr(key), "not supported"
    )


def test_deepcompressor_folder_errors(tmp_path):
    import shutil

    kn = small_known("int4")
    folder = kn.save_deepcompressor(tmp_path / "dc")
    assert load_foreign(folder, config=kn.config) is not None
    bad = Path(shutil.copytree(folder, tmp_path / "dc2"))
    scales = torch.load(bad / "scale.pt", weights_only=True)
    del scales["transformer_blocks.0.attn.to_k.weight.scale.0"]
    torch.save(scales, bad / "scale.pt")
    with pytest.raises(CheckpointError, match="'transformer_blocks.0.attn.to_k.weight.scale.0'"):
        load_foreign(bad, config=kn.config)
    (bad / "model.pt").write_bytes((folder / "model.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.pt cannot be read"):
        load_foreign(bad, config=kn.config)
    with pytest.raises(CheckpointError, match="rotary axes"):  # tiny head dim, no config given
        load_foreign(folder)
