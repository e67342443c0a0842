"""The quantize and inspect commands: the main job end to end, and every way bad input fails."""

import contextlib
import io
import json
import math

import pytest
import torch

import dcgen_quant.quantize.streaming as streaming_module
from dcgen_quant.checkpoint import load_quantized
from dcgen_quant.cli import main
from dcgen_quant.models import synthetic_calibration
from dcgen_quant.models.tiny import tiny_flux, tiny_sana
from dcgen_quant.models.tiny_pipeline import tiny_flux_pipeline
from dcgen_quant.nn import SVDQLinear

from .quantized_models import CHEAP_CLI as CHEAP
from .quantized_models import tiny_flux_inputs


def run_json(capsys, *argv):
    rc = main([*map(str, argv), "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's main job: `python -m dcgen_quant quantize` on the embedded tiny FLUX."""
    out = tmp_path_factory.mktemp("default") / "tiny-flux-int4.safetensors"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["quantize", "--out", str(out), "--json"])
    assert rc == 0
    return out, json.loads(buf.getvalue())["rows"][0]


@pytest.mark.slow
def test_default_quantize_run_writes_a_loadable_checkpoint(default_run):
    out, row = default_run
    assert row["model"] == "tiny-flux" and row["format"] == "int4" and row["rank"] == 32
    # tiny FLUX: 2 double blocks x 16 linears + 2 single blocks x 4 linears (W4A4 + W4A16)
    assert row["layers_quantized"] == 40
    assert 0 < row["mean_rel_err"] <= row["max_rel_err"] < 0.5
    assert 0 < row["mean_rel_err_heldout"] < 0.5  # on the last sample's tokens, held out
    assert 0.2 < row["size_vs_16bit"] < 0.6
    assert not out.with_name(out.name + ".partial").exists()
    print(f"default quantize run: {row['seconds']:.1f} s")  # measured, not asserted
    model = load_quantized(out)
    assert isinstance(model.transformer_blocks[0].attn.to_q, SVDQLinear)
    with torch.no_grad():
        y = model(**tiny_flux_inputs(model)).sample
    assert torch.isfinite(y).all()


@pytest.mark.slow
def test_inspect_reads_the_default_checkpoint(default_run, capsys):
    out, row = default_run
    doc = run_json(capsys, "inspect", out)
    assert doc["model_class"] == "FluxTransformer2DModel"
    assert doc["quantization_config"]["format"] == "int4" and doc["verified"]
    # the 2 single blocks' proj_out are split (signed attention + unsigned GELU columns)
    assert doc["layers_by_kind"] == {"svdq": 32, "svdq_split": 2, "w4a16": 6}
    acts = {r["name"]: r["acts"] for r in doc["layers"]}
    assert acts["transformer_blocks.1.ff.net.2"] == "unsigned"
    assert acts["transformer_blocks.0.attn.to_q"] == "signed"
    assert acts["single_transformer_blocks.0.proj_out"] == "split"
    assert math.isclose(doc["size_vs_bf16"], row["size_vs_16bit"])
    errs = [r["err_svdq"] for r in doc["layers"] if r["err_svdq"] is not None]
    assert len(errs) == 40 and max(errs) == pytest.approx(row["max_rel_err"])
    assert main(["inspect", str(out), "--layers"]) == 0
    text = capsys.readouterr().out
    assert "transformer_blocks.0.attn.to_q" in text and "err SVDQ" in text
    assert "held-out" in text
    held = [r["err_heldout"] for r in doc["layers"] if r["err_heldout"] is not None]
    assert len(held) == 40


def test_real_quantizer_round_trip_is_bit_exact(tmp_path):
    from dcgen_quant.checkpoint import save_quantized
    from dcgen_quant.quantize import QuantConfig, quantize_model

    model = tiny_sana(dtype=torch.bfloat16)
    calib = synthetic_calibration(model, samples=1, steps=1, seed=0)
    config = QuantConfig(format="nvfp4", rank=4, smooth_grid=2, lowrank_iters=1)
    quantize_model(model, calib, config, progress=False)
    loaded = load_quantized(save_quantized(model, tmp_path / "s.safetensors"))
    with torch.no_grad():
        a = model(**calib[0])[0]
        b = loaded(**calib[0])[0]
    assert torch.equal(a, b)


def test_model_directory_and_nvfp4(tmp_path, capsys):
    tiny_sana().save_pretrained(tmp_path / "sana")
    out = tmp_path / "sana.safetensors"
    rows = run_json(capsys, "quantize", "--model", tmp_path / "sana", "--format", "nvfp4",
                    "--out", out, *CHEAP)["rows"]  # fmt: skip
    assert rows[0]["format"] == "nvfp4" and rows[0]["model"] == "sana"
    assert load_quantized(out).transformer_blocks[0].ff.conv_inverted.fmt == "nvfp4"


@pytest.mark.slow
def test_pipeline_directory_calibrates_with_prompts(tmp_path, capsys):
    tiny_flux_pipeline().save_pretrained(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n\na lighthouse at dusk\n")
    out = tmp_path / "pipe.safetensors"
    rows = run_json(capsys, "quantize", "--model", tmp_path / "pipe", "--prompts", prompts,
                    "--out", out, *CHEAP)["rows"]  # fmt: skip
    assert rows[0]["layers_quantized"] == 40 and out.is_file()


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ["quantize", "--model", "tiny-flux", *CHEAP]  # 4 blocks
    assert main([*args, "--out", str(tmp_path / "full.safetensors")]) == 0

    calls = {"n": 0}
    original = streaming_module.quantize_block

    def interrupt_in_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # block 0 is saved, block 1 is being quantized
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(streaming_module, "quantize_block", interrupt_in_second_block)
    out = tmp_path / "resumed.safetensors"
    assert main([*args, "--out", str(out)]) == 130
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and sorted(p.name for p in partial.glob("block-*")) == [
        "block-0000.safetensors"
    ]
    monkeypatch.setattr(streaming_module, "quantize_block", original)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert not out.with_name(out.name + ".partial").exists()
    full = load_quantized(tmp_path / "full.safetensors").state_dict()
    resumed = load_quantized(out).state_dict()
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key].float(), resumed[key].float()), key


def _save_flux_with_nan(path):
    model = tiny_flux()
    with torch.no_grad():
        model.transformer_blocks[1].ff.net[2].weight[3, 5] = float("nan")
    model.save_pretrained(path)


def _save_flux_hidden_96(path):
    tiny_flux(
        num_attention_heads=3, attention_head_dim=32, axes_dims_rope=(8, 12, 12)
    ).save_pretrained(path)


@pytest.mark.parametrize(
    "setup,argv,message",
    [
        (None, ["--format", "int8"], "unsupported format 'int8'; expected one of int4, nvfp4"),
        (None, ["--model", "{tmp}/nowhere"], "no such directory"),
        (lambda p: p.mkdir(), ["--model", "{tmp}/m"], "is not a diffusers model or pipeline"),
        (_save_flux_with_nan, ["--model", "{tmp}/m"], "transformer_blocks.1.ff.net.2: weight: "
                                                       "found 1 NaN/Inf"),
        (_save_flux_hidden_96, ["--model", "{tmp}/m"], "in_features=96 is not a multiple of the "
                                                        "int4 group size 64"),
        (None, ["--prompts", "{tmp}/missing.txt"], "--prompts file not found"),
        (None, ["--threads", "-1"], "--threads must be >= 1"),
        (None, ["--max-host-memory", "12XB"], "size '12XB' not understood"),
        (None, ["--max-host-memory", "1MB"], "--max-host-memory (976.6 KiB) cannot hold one block"),
        (None, ["--batch", "0"], "--batch must be >= 1"),
        (None, ["--holdout", "1.5"], "holdout must be in [0, 1), got 1.5"),
        (None, ["--rank-alloc"], "rank_alloc needs a rank that is a multiple of 16, got 4"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, setup, argv, message):
    if setup is not None:
        setup(tmp_path / "m")
    out = tmp_path / "out" / "q.safetensors"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["quantize", *CHEAP, *argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_inspect_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint not found") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_nunchaku_compatible_on_the_streaming_path(tmp_path, capsys):
    """``quantize --format nvfp4 --nunchaku-compatible`` (the CLI streams): the AdaLayerNorm
    (W4A16) layers come out INT4 with codes -7..7, so ``convert --to nunchaku`` exports the
    checkpoint (an NVFP4 W4A16 layer is refused there without ``--requantize``)."""
    from dcgen_quant.formats.int4 import unpack_int4
    from dcgen_quant.nn import W4A16Linear

    out = tmp_path / "nvfp4.safetensors"
    run_json(capsys, "quantize", "--model", "tiny-flux", "--format", "nvfp4",
             "--nunchaku-compatible", "--out", out, *CHEAP, "--smooth-grid", "2",
             "--lowrank-iters", "1", "--calib-tokens", "256")  # fmt: skip
    adaln = [m for m in load_quantized(out).modules() if isinstance(m, W4A16Linear)]
    assert adaln and all(m.fmt == "int4" for m in adaln)
    assert min(int(unpack_int4(m.qweight).min()) for m in adaln) >= -7
    rows = run_json(capsys, "convert", out, tmp_path / "nk.safetensors", "--to", "nunchaku")
    assert (tmp_path / "nk.safetensors").is_file(), rows
