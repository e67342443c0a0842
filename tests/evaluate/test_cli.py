"""``python -m dcgen_quant evaluate`` end to end on tiny FLUX / SANA / adapted models: 4-bit
against 16-bit, identical models, several models in one table, the cache, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen_quant.evaluate import pictures as P

from ..adapt.helpers import json_report, run_cli

FAST = ("--steps", "4", "--resolution", "32", "--threads", "1")


def _run(capsys, *argv):
    return run_cli(["evaluate", *map(str, argv)], capsys)


def _json(capsys, *argv) -> dict:
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json_report(out)


def _totals(doc) -> dict:
    return {t["model"]: t for t in doc["totals"]}


def _size(path):
    with Image.open(path) as im:
        return im.size


@pytest.mark.slow
def test_sana_svdquant_beats_rtn_in_the_image(sana_built, prompts_file, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", sana_built["svdquant"], "--model", sana_built["rtn"],
            "--prompts", prompts_file, "--out", out, *FAST]  # fmt: skip
    doc = _json(capsys, *argv)
    # no --reference: the checkpoints come from the embedded tiny SANA, which is the reference
    assert doc["reference"]["label"] == "tiny-sana" and doc["reference"]["dtype"] == "bfloat16"
    assert [m["label"] for m in doc["models"]] == ["svdquant", "rtn"]
    t = _totals(doc)
    svdq, rtn = t["svdquant"]["psnr"], t["rtn"]["psnr"]
    print(f"tiny SANA, set PSNR: SVDQuant {svdq:.2f} dB, RTN {rtn:.2f} dB")
    assert math.isfinite(svdq) and math.isfinite(rtn) and svdq > rtn  # 1.7 dB at seed 0
    assert t["svdquant"]["ssim"] > t["rtn"]["ssim"] and t["svdquant"]["ssim"] < 1
    assert [(r["model"], r["prompt"]) for r in doc["rows"]] == [
        ("svdquant", 0), ("svdquant", 1), ("rtn", 0), ("rtn", 1)]  # fmt: skip
    assert doc["generated"] == 6 and doc["skipped"]["lpips"].startswith("no weights")
    assert _size(out / "grid.png") == P.grid_size(2, 2, 32) == (6 + 5 * 134, 6 + 16 + 2 * 176)
    # SANA: 2 blocks x 10 layer kinds (attn1 q/k/v/out, attn2 q/k/v/out, conv_inverted/point)
    assert _size(out / "layers.png") == P.layers_size([(2, 10), (2, 10)]) == (740, 436)
    assert json.loads((out / "evaluate.json").read_text())["totals"] == doc["totals"]
    # again: every image comes from the cache, the numbers are the same; the table says so
    again = _json(capsys, *argv)
    assert again["generated"] == 0 and again["reused"] == 6 and again["rows"] == doc["rows"]
    code, text, err = _run(capsys, *argv)
    assert code == 0, err
    assert "skipped lpips: no weights" in text and "0 generated, 6 reused" in text
    assert "svdquant" in text and "PSNR dB" in text and "MS-SSIM" not in text


@pytest.mark.slow
def test_flux_svdquant_beats_rtn_with_lpips_and_clip(
    flux_built, prompts_file, metric_weights, tmp_path, capsys
):
    doc = _json(capsys, "--model", flux_built["svdquant"], "--model", flux_built["rtn"],
                "--reference", flux_built["pipeline"], "--prompts", prompts_file,
                "--metric-weights", metric_weights, "--out", tmp_path / "eval", *FAST)  # fmt: skip
    t = _totals(doc)
    svdq, rtn = t["svdquant"]["psnr"], t["rtn"]["psnr"]
    print(f"tiny FLUX (embedder / 8), set PSNR: SVDQuant {svdq:.2f} dB, RTN {rtn:.2f} dB")
    assert math.isfinite(svdq) and svdq > rtn  # 1.35 dB at seed 0 (1.2-1.7 over seeds 0-4)
    assert doc["reference"]["kind"] == "pipeline" and doc["reference"]["dtype"] == "bfloat16"
    for row in doc["rows"]:  # random LPIPS / CLIP networks: the code paths, not the values
        if row["model"].endswith("(reference)"):
            assert math.isfinite(row["clip"]) and "psnr" not in row
        else:
            assert row["lpips"] > 0 and math.isfinite(row["clip"])
    assert "lpips" not in doc["skipped"] and "clip" not in doc["skipped"]
    assert set(doc["metric_weights"]) == {"lpips", "clip"}
    # FLUX: 4 blocks x 17 layer kinds (double: 14 incl. modulation, single: 3 more)
    assert _size(tmp_path / "eval" / "layers.png") == P.layers_size([(4, 17), (4, 17)])


@pytest.mark.slow
def test_identical_models_give_inf_psnr_ssim_1_lpips_0(
    sana_built, flux_built, prompts_file, metric_weights, tmp_path, capsys
):
    # the saved tiny SANA pipeline against the embedded one (generated separately), and a FLUX
    # pipeline against a copy of itself
    copy = shutil.copytree(flux_built["pipeline"], tmp_path / "flux_copy")
    for model, ref in ((sana_built["pipeline"], "tiny-sana"), (copy, flux_built["pipeline"])):
        doc = _json(capsys, "--model", model, "--reference", ref, "--prompts", prompts_file,
                    "--metric-weights", metric_weights, "--metrics", "lpips",
                    "--out", tmp_path / f"eval-{ref == 'tiny-sana'}", *FAST)  # fmt: skip
        assert doc["generated"] == 4  # both generated: not one set of images compared to itself
        for row in [r for r in doc["rows"]] + doc["totals"]:
            assert row["psnr"] == math.inf and row["ssim"] == 1.0 and row["lpips"] == 0.0
        assert doc["layers"] is None  # no 4-bit checkpoint among the models


def _tiny_flux_checkpoint(path, seed_model=0):
    """A plain RTN W4A4 checkpoint of the embedded tiny FLUX (what `quantize` makes from it)."""
    from dcgen_quant.checkpoint import save_quantized
    from dcgen_quant.models.calibration import synthetic_calibration
    from dcgen_quant.models.tiny import tiny_flux
    from dcgen_quant.quantize import QuantConfig, quantize_model

    from ..quantized_models import FAST_QUANT

    model = tiny_flux(seed=seed_model, dtype=torch.bfloat16)
    calib = synthetic_calibration(model, samples=1, steps=1, seed=0)
    config = QuantConfig(format="int4", rank=0, smooth=False, gptq=False, clip=False, **FAST_QUANT)
    report = quantize_model(model, calib, config, progress=False)
    return save_quantized(model, path, config, report)


@pytest.mark.slow
def test_a_checkpoint_of_the_embedded_model_needs_no_reference(prompts_file, tmp_path, capsys):
    ckpt = _tiny_flux_checkpoint(tmp_path / "tiny-flux-int4.safetensors")
    doc = _json(capsys, "--model", ckpt, "--prompts", prompts_file, "--out", tmp_path / "e",
                "--steps", "2", "--threads", "1")  # fmt: skip
    assert doc["reference"]["label"] == "tiny-flux" and doc["settings"]["resolution"] == 64
    t = _totals(doc)["tiny-flux-int4"]
    assert math.isfinite(t["psnr"]) and t["psnr"] > 30 and t["ssim"] < 1
    assert doc["layers"] and _size(doc["layers"]) == P.layers_size([(4, 17)])
    assert _size(doc["grid"]) == P.grid_size(2, 1, 64)


def _adapted(root):
    """A DC-Gen FLUX as adapt writes it (surgery onto a 32-channel f8 AutoencoderDC, saved with
    dcgen_adapt.json naming the autoencoder) and an INT4 checkpoint of it."""
    from dcgen_quant.adapt.demo import tiny_dc
    from dcgen_quant.adapt.surgery import save_adapted, surgery
    from dcgen_quant.checkpoint import save_quantized
    from dcgen_quant.models.calibration import synthetic_calibration
    from dcgen_quant.models.tiny import tiny_flux
    from dcgen_quant.quantize import QuantConfig, quantize_model

    from ..quantized_models import FAST_QUANT

    tiny_dc(0, 32, 4).save_pretrained(root / "ae")
    model = surgery(tiny_flux(seed=0), 32, 1, head_init="default", seed=0)
    save_adapted(
        model,
        root / "run" / "model",
        {"autoencoder": str(root / "ae"), "latent_channels": 32, "latent_patch_size": 1},
    )
    model = model.to(torch.bfloat16)
    calib = synthetic_calibration(model, samples=1, steps=2, seed=0)
    config = QuantConfig(format="int4", **FAST_QUANT)
    quantize_model(model, calib, config, progress=False)
    return root / "run" / "model", save_quantized(model, root / "adapted-int4.safetensors", config)


@pytest.mark.slow
def test_adapted_model_and_its_4bit_checkpoint(prompts_file, tmp_path, capsys):
    model_dir, ckpt = _adapted(tmp_path)
    # the checkpoint records no autoencoder: it reads the reference's (from dcgen_adapt.json)
    doc = _json(capsys, "--model", ckpt, "--reference", model_dir, "--prompts", prompts_file,
                "--out", tmp_path / "e", *FAST)  # fmt: skip
    t = _totals(doc)["adapted-int4"]
    assert math.isfinite(t["psnr"]) and t["ssim"] < 1
    assert doc["reference"]["label"] == "run" and doc["reference"]["kind"] == "transformer"
    copy = shutil.copytree(model_dir, tmp_path / "copy" / "model")
    doc = _json(capsys, "--model", copy, "--reference", model_dir, "--prompts", prompts_file,
                "--out", tmp_path / "e2", *FAST)  # fmt: skip
    assert all(r["psnr"] == math.inf and r["ssim"] == 1.0 for r in doc["rows"])


@pytest.mark.slow
def test_the_cache_is_reused_and_never_stale(sana_built, prompts_file, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    shutil.copy(sana_built["svdquant"], model)
    base = ["--prompts", prompts_file, "--out", tmp_path / "e", "--resolution", "32",
            "--threads", "1"]  # fmt: skip
    first = _json(capsys, "--model", model, *base, "--steps", "2")
    assert first["generated"] == 4
    # a second model: the reference's images (and the first model's) come from the cache
    both = _json(capsys, "--model", model, "--model", sana_built["rtn"], *base, "--steps", "2")
    assert both["generated"] == 2 and both["reused"] == 4
    assert _totals(both)["m"]["psnr"] == _totals(first)["m"]["psnr"]
    # other steps: new images for the reference and the model
    assert _json(capsys, "--model", model, *base, "--steps", "3")["generated"] == 4
    # the same file name now holds another model: its images are made again, not reused
    shutil.copy(sana_built["rtn"], model)
    swapped = _json(capsys, "--model", model, *base, "--steps", "2")
    assert swapped["generated"] == 2
    assert _totals(swapped)["m"]["psnr"] == _totals(both)["rtn"]["psnr"]
    # a damaged cached image is made again
    victim = swapped["images"]["m"][0]
    with open(victim, "r+b") as fh:
        fh.truncate(40)
    again = _json(capsys, "--model", model, *base, "--steps", "2")
    assert again["generated"] == 1 and again["rows"] == swapped["rows"]
    assert np.asarray(Image.open(victim)).shape == (32, 32, 3)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "ok.txt").write_text("a cat\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    from dcgen_quant.models.tiny import tiny_flux

    tiny_flux(seed=1).save_pretrained(tmp_path / "other_flux")
    return tmp_path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "tiny-flux", "--prompts", "{t}/missing.txt"], "--prompts"),
        (["--model", "tiny-flux", "--prompts", "{t}"], "is a directory"),
        (["--model", "tiny-flux", "--prompts", "{t}/binary.txt"], "not UTF-8"),
        (["--model", "tiny-flux", "--prompts", "{t}/blank.txt"], "holds no prompt"),
        (["--model", "tiny-sana", "--reference", "tiny-flux"], "mismatched model families"),
        (["--model", "tiny-flux", "--resolution", "30"], "needs a multiple of 4"),
        (["--model", "tiny-flux", "--steps", "0"], "--steps"),
        (["--model", "tiny-flux", "--metrics", "lpips,fidd"], "unknown 'fidd'"),
        (["--model", "{t}/other_flux"], "--reference: required"),
        (["--model", "{t}/nope.safetensors"], "no such file"),
        (["--model", "{t}/broken.safetensors"], "broken.safetensors"),
        (["--model", "tiny-flux", "--out", "{t}/foreign"], "did not write"),
        (["--model", "tiny-flux", "--metric-weights", "{t}/none"], "--metric-weights"),
    ],
)
def test_bad_input_is_a_one_line_error(bad_inputs, argv, message, capsys):
    argv = [a.replace("{t}", str(bad_inputs)) for a in argv]
    if "--prompts" not in argv:
        argv += ["--prompts", str(bad_inputs / "ok.txt")]
    if "--out" not in argv:
        argv += ["--out", str(bad_inputs / "out")]
    code, out, err = _run(capsys, *argv, "--steps" if "--steps" not in argv else "--seed", "1")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert not (bad_inputs / "out").exists()  # nothing written
    assert [p.name for p in (bad_inputs / "foreign").iterdir()] == ["notes.txt"]


def test_lpips_is_skipped_below_32_px(metric_weights, prompts_file, tmp_path, capsys):
    doc = _json(capsys, "--model", "tiny-sana", "--reference", "tiny-sana", "--prompts",
                prompts_file, "--metric-weights", metric_weights, "--metrics", "lpips",
                "--resolution", "16", "--steps", "1", "--out", tmp_path / "e",
                "--threads", "1")  # fmt: skip
    assert doc["skipped"]["lpips"] == "needs images of at least 32 px (AlexNet)"
    assert doc["generated"] == 4 and [m["label"] for m in doc["models"]] == ["tiny-sana-2"]
    assert all(r["lpips"] is None and r["psnr"] == math.inf for r in doc["rows"])
