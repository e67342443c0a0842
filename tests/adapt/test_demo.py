"""Acceptance: ``python -m dcgen_quant adapt --demo`` on tiny FLUX and SANA, real photographs.

One demo run per family (tiny models built in code, autoencoders pre-trained for a few seconds;
FLUX: a small AutoencoderKL base and a 4x more compressed AutoencoderDC target), then its report
is checked:

- stage 1 lowers the per-block feature MSE against the base by at least 5x at every block;
- stage 2 lowers the held-out flow-matching loss, stage 3 the guidance-distilled held-out loss
  it trains (docs/ADAPT.md discusses the w = 1 column after stage 3);
- the loss breakdown: each guidance scale's held-out loss (its w = 1 equals the first table's),
  the empty caption, training images;
- the LoRA-only run without stage 1 stays further from the base at every block (the gap);
- the output is a diffusers directory that FluxTransformer2DModel loads and runs;
- the trained model, quantized by ``quantize`` with SVDQuant and with plain RTN W4A4, still draws
  its own images under ``evaluate``: an identical copy gives infinite PSNR, SVDQuant a finite PSNR
  above RTN's (issue 12's acceptance on the demo's trained model).
"""

import json
import math
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel

from dcgen_quant.adapt import family as fam
from dcgen_quant.adapt.data import HashedText

from .helpers import json_report, run_cli


# One test, one demo run: pytest-xdist would otherwise run a module fixture once per worker.
@pytest.mark.slow
def test_demo_acceptance(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli(["adapt", "--demo", "--out", str(out), "--json"], capsys)
    assert code == 0, stderr[-2000:]
    rep = json_report(stdout)
    rows = rep["rows"]

    # stage 1 lowers the per-block feature MSE by at least 5x at every block
    assert [r["block"] for r in rows] == ["embed", "double.0", "double.1", "single.0", "single.1"]
    for r in rows:
        assert r["gain"] == pytest.approx(r["surgery"] / r["stage1"])
        assert r["gain"] >= 5.0, r

    # stage 2 lowers the held-out flow loss, stage 3 the guidance-distilled one it trains
    flow = {r["model"]: r for r in rep["flow_loss"]}
    assert list(flow) == ["base", "surgery", "stage1", "stage2", "stage3", "lora-only"]
    assert flow["stage1"]["flow"] == flow["surgery"]["flow"]  # zero head: v = 0 either way
    assert flow["stage2"]["flow"] < 0.5 * flow["stage1"]["flow"]
    assert flow["stage2"]["guided"] < flow["stage1"]["guided"]
    assert flow["stage3"]["guided"] < flow["stage2"]["guided"]
    # not asserted: stage 3's loss at w = 1 alone, which its w ~ U[1, 14] objective weighs
    # little while stage 2 trained w = 1 only; higher than stage 2's in the default run (and
    # with seeds 1 and 2 of the first demo settings), while every w > 1 loss falls
    # (docs/ADAPT.md)

    # without stage 1, LoRA fine-tuning leaves the model further from the base at every block
    # and with a higher held-out loss than the aligned chain
    for r in rows:
        assert r["lora-only"] > r["stage3"], r
        assert r["lora-only"] > 2 * r["stage1"], r
    assert flow["lora-only"]["guided"] > flow["stage3"]["guided"]

    # the breakdown: every scale's held-out loss, the empty caption, training images at w = 1
    detail = {r["model"]: r for r in rep["flow_breakdown"]}
    assert list(detail) == list(flow)
    scales = ["w=1", "w=3.5", "w=7", "w=14"]
    for name, r in detail.items():
        assert list(r) == ["model", *scales, "empty", "train"]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in r if k != "model"), r
        # the report's two tables carry the one held-out pass's w = 1 loss in the same place
        # (that this pass's w = 1 equals a plain w = 1 evaluation: tests/adapt/test_flow.py)
        assert r["w=1"] == flow[name]["flow"]
        assert sum(r[k] for k in scales) / 4 == pytest.approx(flow[name]["guided"], rel=1e-9)
    assert detail["stage1"] == {**detail["surgery"], "model": "stage1"}  # zero head, v = 0
    assert detail["stage2"]["train"] < 0.5 * detail["stage1"]["train"]
    # stage 3 trains w ~ U[1, 14]: the largest scale's held-out loss falls
    assert detail["stage3"]["w=14"] < detail["stage2"]["w=14"]

    # the output is a plain diffusers FLUX transformer that loads and runs
    model = FluxTransformer2DModel.from_pretrained(out / "aligned" / "model", local_files_only=True)
    assert model.config.in_channels == 32 and model.config.out_channels == 32
    text = HashedText(
        model.config.joint_attention_dim, model.config.pooled_projection_dim, 4
    ).encode(["a", "b"])
    z = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = fam.forward(model, z, text, torch.tensor([0.3, 0.9]), torch.tensor([1.0, 3.5]), 1)
    assert v.shape == z.shape and torch.isfinite(v).all()
    saved = json.loads((out / "report.json").read_text())
    assert saved["blocks"]["stage1"] == {r["block"]: r["stage1"] for r in rows}
    assert saved["flow_breakdown"]["stage3"] == {
        k: v for k, v in detail["stage3"].items() if k != "model"
    }
    assert (out / "report.png").stat().st_size > 5000
    assert rep["ae_psnr_db"]["base"] > 15 and rep["ae_psnr_db"]["target"] > 12

    # a finished demo re-runs from its checkpoints and caches without training again
    code, stdout, _ = run_cli(["adapt", "--demo", "--out", str(out), "--resume", "--json"], capsys)
    assert code == 0 and json_report(stdout)["rows"] == rows

    _trained_model_survives_4_bits(out / "aligned" / "model", tmp_path, capsys)


def _trained_model_survives_4_bits(model_dir, tmp_path, capsys):
    """quantize the demo's trained model (SVDQuant INT4, plain RTN W4A4) and evaluate both and an
    identical copy against it, at the demo's resolution with its target autoencoder."""
    fast = ["--smooth-grid", "2", "--lowrank-iters", "1", "--calib-tokens", "512"]
    rtn = ["--rank", "0", "--no-smooth", "--no-gptq", "--no-clip-search"]
    ckpts = {}
    for name, extra in (("svdquant", fast), ("rtn", rtn)):
        ckpts[name] = tmp_path / f"{name}.safetensors"
        argv = ["quantize", "--model", str(model_dir), "--out", str(ckpts[name]),
                "--calib-samples", "2", "--steps", "2", "--threads", "1", *extra]  # fmt: skip
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err[-2000:]
    copy = shutil.copytree(model_dir, tmp_path / "copy" / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photograph of an astronaut\na cup of coffee on a table\n")
    argv = ["evaluate", "--model", str(ckpts["svdquant"]), "--model", str(ckpts["rtn"]),
            "--model", str(copy), "--reference", str(model_dir), "--prompts", str(prompts),
            "--steps", "4", "--resolution", "64", "--threads", "1", "--out",
            str(tmp_path / "evaluate"), "--json"]  # fmt: skip
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err[-2000:]
    totals = {t["model"]: t for t in json_report(stdout)["totals"]}
    svdq, rtn_psnr = totals["svdquant"]["psnr"], totals["rtn"]["psnr"]
    print(f"demo model, set PSNR: SVDQuant {svdq:.2f} dB, RTN {rtn_psnr:.2f} dB")
    assert math.isfinite(svdq) and math.isfinite(rtn_psnr) and svdq > rtn_psnr
    assert totals["svdquant"]["ssim"] > totals["rtn"]["ssim"]
    assert totals["copy"]["psnr"] == math.inf and totals["copy"]["ssim"] == 1.0


@pytest.mark.slow
def test_sana_demo(tmp_path, capsys):
    # SANA family: AutoencoderDC f8c32 -> AutoencoderDC f16c128 (4x fewer tokens)
    out = tmp_path / "sana"
    args = ["adapt", "--demo", "--family", "sana", "--out", str(out)]
    code, stdout, stderr = run_cli([*args, "--json"], capsys)
    assert code == 0, stderr[-2000:]
    rep = json_report(stdout)
    rows = rep["rows"]
    assert [r["block"] for r in rows] == ["embed", "block.0", "block.1"]
    for r in rows:
        assert r["gain"] >= 5.0, r
    flow = {r["model"]: r for r in rep["flow_loss"]}
    assert all(r["guided"] is None for r in flow.values())  # SANA has no guidance embedding
    assert flow["stage2"]["flow"] < 0.5 * flow["stage1"]["flow"]
    assert flow["stage3"]["flow"] < flow["stage2"]["flow"]
    for r in rows:  # without stage 1: further from the base at every block, higher loss
        assert r["lora-only"] > 2 * r["stage1"], r
        assert r["lora-only"] > r["stage3"], r
    assert flow["lora-only"]["flow"] > flow["stage3"]["flow"]
    # no guidance scales: the breakdown has the empty caption and the training images
    detail = {r["model"]: r for r in rep["flow_breakdown"]}
    assert list(detail) == list(flow)
    for r in detail.values():
        assert list(r) == ["model", "empty", "train"]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("empty", "train")), r
    assert detail["stage1"]["empty"] == flow["stage1"]["flow"]  # zero head: v = 0, any caption
    assert detail["stage3"]["train"] < detail["stage2"]["train"]
    model = SanaTransformer2DModel.from_pretrained(out / "aligned" / "model", local_files_only=True)
    assert model.config.in_channels == 128 and model.config.patch_size == 1


def test_ae_lr_factor_warms_up_then_decays():
    from dcgen_quant.adapt.demo import ae_lr_factor

    f = [ae_lr_factor(s, 400) for s in range(400)]
    assert f[:20] == pytest.approx([(s + 1) / 20 for s in range(20)])  # 5% warm-up, peak 1
    assert all(a >= b for a, b in zip(f[19:], f[20:])) and 0 < f[-1] < 1e-4
    assert ae_lr_factor(0, 1) == 1.0  # one step: the warm-up's single step at the peak
