"""4-bit checkpoints: round trips, sharding, size, atomicity, and every way loading must fail."""

import json
import struct

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors import safe_open
from safetensors.torch import save_file

from dcgen_quant.checkpoint import CheckpointError, load_quantized, read_metadata, save_quantized
from dcgen_quant.models.tiny import tiny_flux
from dcgen_quant.nn import SVDQLinear, W4A16Linear
from dcgen_quant.quantize.config import QuantConfig

from .quantized_models import randomly_quantized_tiny_flux, tiny_flux_inputs


def forward(model):
    with torch.no_grad():
        return model(**tiny_flux_inputs(model)).sample


@pytest.fixture(scope="module")
def int4_model():
    return randomly_quantized_tiny_flux("int4", dtype=torch.bfloat16)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_round_trip_is_bit_exact_from_metadata_alone(tmp_path, fmt):
    model = randomly_quantized_tiny_flux(fmt, dtype=torch.bfloat16)
    path = save_quantized(model, tmp_path / "m.safetensors")
    loaded = load_quantized(path)
    assert type(loaded).__name__ == "FluxTransformer2DModel"
    assert isinstance(loaded.transformer_blocks[0].attn.to_q, SVDQLinear)
    assert isinstance(loaded.transformer_blocks[0].norm1.linear, W4A16Linear)
    assert (
        loaded.transformer_blocks[0].attn.to_q.wscales.dtype
        == model.transformer_blocks[0].attn.to_q.wscales.dtype
    )
    assert torch.equal(forward(loaded), forward(model))
    assert loaded.dcgen_quant_config.format == fmt


def test_load_into_a_given_float_model(tmp_path, int4_model):
    path = save_quantized(int4_model, tmp_path / "m.safetensors")
    target = tiny_flux(seed=123, dtype=torch.bfloat16)  # other weights: all are overwritten
    loaded = load_quantized(path, model=target)
    assert loaded is target
    assert torch.equal(forward(loaded), forward(int4_model))


def test_sharded_directory_round_trip(tmp_path, int4_model):
    path = save_quantized(int4_model, tmp_path / "ckpt", max_shard_bytes=200_000)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and (path / "dcgen_quant.index.json").is_file()
    assert torch.equal(forward(load_quantized(path)), forward(int4_model))
    with pytest.raises(CheckpointError, match="give a directory path"):
        save_quantized(int4_model, tmp_path / "one.safetensors", max_shard_bytes=200_000)


def test_metadata_contents(tmp_path, int4_model):
    meta = read_metadata(save_quantized(int4_model, tmp_path / "m.safetensors"))
    assert meta["format_version"] == 1
    assert meta["quantization_config"]["format"] == "int4"
    assert meta["quantization_config"]["group_size"] == 64
    assert meta["model"]["class"] == "FluxTransformer2DModel"
    assert meta["model"]["config"]["num_layers"] == 2
    to_q = meta["layers"]["transformer_blocks.0.attn.to_q"]
    assert to_q == {
        "kind": "svdq", "in_features": 256, "out_features": 256, "rank": 4, "fmt": "int4",
        "bias": True, "dtype": "bfloat16",
    }  # fmt: skip
    assert set(meta["checksums"]) >= {"transformer_blocks.0.attn.to_q.qweight", "x_embedder.weight"}


class OneLinear(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, k: int = 3072, n: int = 3072, rank: int = 32):
        super().__init__()
        self.proj = SVDQLinear(k, n, rank=rank, fmt="int4", bias=True, dtype=torch.bfloat16)


def test_3072_layer_is_at_most_0_30x_its_bf16_size(tmp_path):
    model = OneLinear()
    path = save_quantized(model, tmp_path / "l.safetensors", config=QuantConfig())
    bf16_bytes = (3072 * 3072 + 3072) * 2
    ratio = path.stat().st_size / bf16_bytes
    assert ratio <= 0.30, ratio  # 4-bit codes 0.25, scales 1/32 of that, r=32 factors ~0.02


def test_save_is_atomic(tmp_path, int4_model, monkeypatch):
    import dcgen_quant.checkpoint_files as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(int4_model, tmp_path / "m.safetensors")
    with pytest.raises(OSError, match="disk full"):
        save_quantized(int4_model, tmp_path / "dir", max_shard_bytes=100_000)
    assert list(tmp_path.iterdir()) == []


def test_model_without_quantized_layers_or_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no quantization config"):
        save_quantized(tiny_flux(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="no quantized layers"):
        save_quantized(tiny_flux(), tmp_path / "m.safetensors", config=QuantConfig())


# --- corrupted / mismatched checkpoints -------------------------------------------------------


def _header(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return n, json.loads(fh.read(n))


def test_altered_tensor_fails_its_checksum(tmp_path, int4_model):
    path = save_quantized(int4_model, tmp_path / "m.safetensors")
    n, header = _header(path)
    key = "transformer_blocks.1.ff.net.2.qweight"
    start, _ = header[key]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[8 + n + start] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"'{key}' does not match its checksum"):
        load_quantized(path)


def test_truncated_file_fails_clearly(tmp_path, int4_model):
    path = save_quantized(int4_model, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(path)


def test_checkpoint_of_another_model_is_refused(tmp_path, int4_model):
    path = save_quantized(int4_model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="config 'num_layers' is 2 in the checkpoint but 3"):
        load_quantized(path, model=tiny_flux(num_layers=3))
    with pytest.raises(CheckpointError, match="checkpoint is for FluxTransformer2DModel"):
        load_quantized(path, model=OneLinear(k=64, n=64, rank=1))


def _rewrite(path, edit_tensors=None, edit_meta=None, reseal=True):
    """Rewrite a checkpoint with edited tensors/metadata: checksums recomputed for the tensors,
    and (``reseal``) the header checksum recomputed, as a writer with a bug would produce the
    file; so that the checks behind the checksums are what the test reaches."""
    from dcgen_quant.checkpoint import _crc32

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
        checks = json.loads(meta["checksums"])
        checks.update({k: _crc32(t) for k, t in tensors.items()})
        meta["checksums"] = json.dumps(checks)
    if edit_meta:
        edit_meta(meta)
    if reseal and "integrity" in meta:
        from dcgen_quant.checkpoint_files import SAFETENSORS_NAMES
        from dcgen_quant.checkpoint_schema import integrity_record

        decoded = {}
        for k, v in meta.items():
            try:
                decoded[k] = v if k == "format" else json.loads(v)
            except ValueError:
                decoded[k] = v
        table = {k: [SAFETENSORS_NAMES[t.dtype], list(t.shape)] for k, t in tensors.items()}
        meta["integrity"] = json.dumps(integrity_record(decoded, table))
    save_file(tensors, str(path), metadata=meta)


ATTN = "transformer_blocks.0.attn"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop(f"{ATTN}.to_k.proj_up"), f"missing tensor '{ATTN}.to_k.proj_up'"),
        (lambda t: t.update(extra=torch.zeros(2)), "has tensor 'extra' that the model does not"),
        (
            lambda t: t.update({f"{ATTN}.to_q.wscales": torch.zeros(4, 256)}),
            rf"'{ATTN}.to_q.wscales' is torch.float32 \(4, 256\), expected torch.bfloat16",
        ),
        (
            lambda t: t.update({"x_embedder.weight": torch.zeros(256, 32).bfloat16()}),
            r"'x_embedder.weight' has shape \[256, 32\] \(expected \[256, 64\]\)",
        ),
    ],
)  # fmt: skip
def test_bad_tensors_are_named(tmp_path, int4_model, edit, message):
    path = save_quantized(int4_model, tmp_path / "m.safetensors")
    _rewrite(path, edit_tensors=edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("layers"), "metadata key 'layers' is missing"),
        (lambda m: m.update(format_version="99"), "format_version 99 is not supported"),
        (lambda m: m.update(format="nunchaku"), "metadata 'format' is 'nunchaku'"),
        (lambda m: m.update(layers="{not json"), "metadata 'layers' is not valid JSON"),
        (lambda m: m.update(model='{"class": "os.system"}'), "is not a diffusers model class"),
    ],
)  # fmt: skip
def test_bad_metadata_is_named(tmp_path, int4_model, edit, message):
    path = save_quantized(int4_model, tmp_path / "m.safetensors")
    _rewrite(path, edit_meta=edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(path)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_quantized(tmp_path / "nope.safetensors")


def test_layout_on_load(tmp_path, int4_model):
    path = save_quantized(int4_model, tmp_path / "m.safetensors")
    loaded = load_quantized(path, layout="split_halves")
    assert loaded.transformer_blocks[0].attn.to_q.layout == "split_halves"
    assert torch.equal(forward(loaded), forward(int4_model))
    # and saving it again writes the canonical layout
    again = load_quantized(save_quantized(loaded, tmp_path / "again.safetensors"))
    assert torch.equal(forward(again), forward(int4_model))
