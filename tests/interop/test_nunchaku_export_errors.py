"""``python -m dcgen_quant convert ... --to nunchaku`` on bad or non-representable input: a
one-line ``error:`` (exit 2) naming the problem and no output file; with ``--requantize`` the
forced changes are made and counted."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dcgen_quant.checkpoint import _crc32
from dcgen_quant.cli import main
from dcgen_quant.formats import quantize_weight
from dcgen_quant.formats.int4 import pack_int4, unpack_int4
from dcgen_quant.interop.safetensors_stream import StreamingWriter


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base(quantized_flux):
    return quantized_flux("int4")


def rewrite(src, dst, update=None, drop=(), layers=None, model=None):
    """A copy of checkpoint ``src`` with tensors replaced / dropped and metadata edited (the
    checksums of replaced tensors updated, as a consistent but different checkpoint)."""
    tensors = load_file(str(src))
    meta = safe_open(str(src), framework="pt").metadata()
    checks = json.loads(meta["checksums"])
    for key, t in (update or {}).items():
        tensors[key] = t.contiguous()
        checks[key] = _crc32(t)
    for key in drop:
        tensors.pop(key)
        checks.pop(key, None)
    meta["checksums"] = json.dumps(checks)
    if layers is not None:
        meta["layers"] = json.dumps(layers(json.loads(meta["layers"])))
    if model is not None:
        meta["model"] = json.dumps(model(json.loads(meta["model"])))
    save_file(tensors, str(dst), metadata=meta)
    return dst


def convert(capsys, src, out, *extra):
    rc = main(["convert", str(src), str(out), "--to", "nunchaku", "--json", *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_refused(capsys, src, out, *needles, extra=()):
    rc, _, err = convert(capsys, src, out, *extra)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return lines[0]


def test_cli_exports_and_reports_json(base, tmp_path, capsys):
    out = tmp_path / "nk.safetensors"
    rc, stdout, _ = convert(capsys, base, out)
    assert rc == 0 and out.is_file()
    row = json.loads(stdout)
    assert row["format"] == "int4" and row["rank"] == 32 and row["tensors"] == 224
    assert {c["kind"] for c in row["changes"]} <= {"adaln-bias-fold", "awq-zero"}
    # converting again overwrites our own export; a foreign file is never overwritten
    assert convert(capsys, base, out)[0] == 0
    foreign = tmp_path / "weights.safetensors"
    save_file({"x": torch.ones(2)}, str(foreign))
    rc, _, err = convert(capsys, base, foreign)
    assert rc == 2 and "refusing to overwrite" in err
    assert load_file(str(foreign))["x"].tolist() == [1.0, 1.0]


def test_missing_key(base, tmp_path, capsys):
    key = "transformer_blocks.1.attn.to_k.proj_up"
    src = rewrite(base, tmp_path / "in.safetensors", drop=[key])
    assert_refused(capsys, src, tmp_path / "nk.safetensors", key, "missing")


def test_altered_shape(base, tmp_path, capsys):
    key = "single_transformer_blocks.0.proj_mlp.smooth_factor"
    t = load_file(str(base))[key]
    src = rewrite(base, tmp_path / "in.safetensors", update={key: t[:-1]})
    assert_refused(capsys, src, tmp_path / "nk.safetensors", key, "expected")


def test_altered_values(base, tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    data = bytearray(base.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's bytes
    src.write_bytes(bytes(data))
    assert_refused(capsys, src, tmp_path / "nk.safetensors", "checksum")


def test_truncated_input(base, tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    src.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    assert_refused(capsys, src, tmp_path / "nk.safetensors", "truncated")


def test_not_a_checkpoint(tmp_path, capsys):
    src = tmp_path / "weights.safetensors"
    save_file({"x": torch.ones(2)}, str(src))
    assert_refused(capsys, src, tmp_path / "nk.safetensors", "format")


def test_w4a16_code_minus_8(base, tmp_path, capsys):
    name = "transformer_blocks.0.norm1.linear"
    codes = unpack_int4(load_file(str(base))[f"{name}.qweight"])
    codes[3, :5] = -8
    src = rewrite(base, tmp_path / "in.safetensors", update={f"{name}.qweight": pack_int4(codes)})
    out = tmp_path / "nk.safetensors"
    assert_refused(capsys, src, out, name, "-8", "--requantize")
    rc, stdout, _ = convert(capsys, src, out, "--requantize")
    assert rc == 0
    clamp = [c for c in json.loads(stdout)["changes"] if c["kind"] == "awq-clamp"]
    assert clamp and clamp[0]["values_changed"] == 5 and clamp[0]["first"] == name


def test_nvfp4_adaln_is_requantized_only_when_allowed(base, tmp_path, capsys):
    name = "single_transformer_blocks.1.norm.linear"
    w = torch.randn(3 * 192, 192, generator=torch.Generator().manual_seed(0)) * 0.02
    qw = quantize_weight(w, "nvfp4")

    def as_nvfp4(layers):
        layers[name]["fmt"] = "nvfp4"
        return layers

    update = {f"{name}.qweight": qw.qweight, f"{name}.wscales": qw.wscales,
              f"{name}.wtscale": qw.wtscale}  # fmt: skip
    src = rewrite(base, tmp_path / "in.safetensors", update=update, layers=as_nvfp4)
    out = tmp_path / "nk.safetensors"
    assert_refused(capsys, src, out, name, "nvfp4 W4A16", "--nunchaku-compatible")
    rc, stdout, _ = convert(capsys, src, out, "--requantize")
    assert rc == 0
    kinds = {c["kind"]: c for c in json.loads(stdout)["changes"]}
    assert kinds["awq-requantize"]["layers"] == 1 and kinds["awq-requantize"]["lossy"]


def test_signed_gelu_layer(base, tmp_path, capsys):
    """A --signed-gelu INT4 layer: Nunchaku runs fc2 unsigned; only --requantize folds the shift
    into the bias (weights unchanged)."""
    name = "transformer_blocks.0.ff_context.net.2"

    def signed(layers):
        del layers[name]["act_unsigned"]
        return layers

    src = rewrite(base, tmp_path / "in.safetensors", layers=signed)
    out = tmp_path / "nk.safetensors"
    assert_refused(capsys, src, out, name, "--signed-gelu")
    rc, stdout, _ = convert(capsys, src, out, "--requantize")
    assert rc == 0
    kinds = {c["kind"]: c for c in json.loads(stdout)["changes"]}
    assert kinds["unsigned-gelu"]["layers"] == 1 and kinds["unsigned-gelu"]["values_changed"] > 0


def test_layer_kept_16bit_where_nunchaku_is_4bit(base, tmp_path, capsys):
    name = "transformer_blocks.1.attn.to_out.0"
    keys = [k for k in load_file(str(base)) if k.startswith(name + ".")]

    def unquantized(layers):
        del layers[name]
        return layers

    update = {f"{name}.weight": torch.zeros(192, 192, dtype=torch.bfloat16),
              f"{name}.bias": torch.zeros(192, dtype=torch.bfloat16)}  # fmt: skip
    src = rewrite(base, tmp_path / "in.safetensors", update=update, drop=keys, layers=unquantized)
    assert_refused(capsys, src, tmp_path / "nk.safetensors", name, "16 bits")


def test_sana_is_not_supported_yet(base, tmp_path, capsys):
    def sana(model):
        model["class"] = "SanaTransformer2DModel"
        return model

    src = rewrite(base, tmp_path / "in.safetensors", model=sana)
    assert_refused(capsys, src, tmp_path / "nk.safetensors", "SANA", "not supported yet")


def test_to_dcgen_quant_dispatches(base, tmp_path, capsys):
    """``--to dcgen_quant`` goes to the importer (its own tests check what it writes); in a
    build without it, a one-line error."""
    import importlib.util

    nk, back = tmp_path / "nk.safetensors", tmp_path / "back.safetensors"
    assert convert(capsys, base, nk)[0] == 0
    rc = main(["convert", str(nk), str(back), "--to", "dcgen_quant", "--json"])
    err = capsys.readouterr().err
    if importlib.util.find_spec("dcgen_quant.interop.nunchaku.importer") is None:
        assert rc == 2 and err.startswith("error:") and "importer" in err and not back.exists()
    else:
        assert rc == 0 and back.is_file(), err


def test_streaming_writer_refuses_incomplete(tmp_path):
    w = StreamingWriter(tmp_path / "x.safetensors", [("a", torch.int32, (2,)),
                                                     ("b", torch.bfloat16, (3,))])  # fmt: skip
    w.write("a", torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="planned"):
        w.write("b", torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="never written"):
        w.close({})
