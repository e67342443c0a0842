"""``python -m dcgen_quant adapt`` on directories: errors, stages, resume, the output model."""

import json
import math

import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel
from safetensors.torch import load_file

from dcgen_quant.adapt import family as fam
from dcgen_quant.adapt.data import HashedText

from .helpers import chain_args, json_report, run_cli


def test_help_lists_the_adapt_options(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(["adapt", "--help"], capsys)
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--base",
        "--target-ae",
        "--data",
        "--stage",
        "--out",
        "--steps",
        "--resume",
        "--json",
        "--demo",
    ):
        assert flag in out


def test_errors_are_one_line_and_name_the_argument(flux_inputs, tmp_path, capsys):
    cases = [
        (["--base", str(tmp_path / "nope")], "base: .*nope does not exist"),
        (["--base", str(tmp_path)], "neither a diffusers pipeline"),
        (["--base", flux_inputs["base_ae"]], "holds a AutoencoderKL"),
        (["--target-ae", flux_inputs["base"]], "target_ae: .* holds a FluxTransformer2DModel"),
        (["--data", str(tmp_path / "none")], "data: .*none is not a directory"),
    ]
    for change, pattern in cases:
        args = chain_args(flux_inputs, tmp_path / "out")
        i = args.index(change[0])
        args[i + 1] = change[1]
        code, out, err = run_cli(args, capsys)
        assert code == 2, (change, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        import re

        assert re.search(pattern, err), (pattern, err)
    code, _, err = run_cli(["adapt", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--base: required" in err
    code, _, err = run_cli(["adapt", "--demo", "--base", "x"], capsys)
    assert code == 2 and "--base: not used with --demo" in err
    args = chain_args(flux_inputs, tmp_path / "o2")
    args[args.index("--base-ae") : args.index("--base-ae") + 2] = []
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "base_ae:" in err and "--base-ae DIR" in err


def _forward(model_dir, cls, c):
    model = cls.from_pretrained(model_dir, local_files_only=True)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, c, 4, 4, generator=g)
    if cls is FluxTransformer2DModel:
        text = HashedText(256, 128, 5).encode(["a", "b"])
    else:
        text = HashedText(128, None, 5, mask=True).encode(["a", "b"])
    with torch.no_grad():
        out = fam.forward(model, z, text, torch.tensor([0.2, 0.7]), torch.tensor([1.0, 3.5]), 1)
    assert out.shape == z.shape and torch.isfinite(out).all()
    return out


@pytest.mark.slow
def test_stages_one_at_a_time_with_resume_and_the_output_loads(flux_inputs, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        chain_args(flux_inputs, out, "--stage", "align", "--steps", "5", "--json"), capsys
    )
    assert code == 0, err
    rep = json_report(stdout)
    assert {r["block"] for r in rep["rows"]} >= {"embed", "double.0", "single.1"}
    assert [f["model"] for f in rep["flow_loss"]] == ["base", "surgery", "align"]
    code, _, err = run_cli(chain_args(flux_inputs, out, "--stage", "head", "--steps", "3"), capsys)
    assert code == 2 and "--resume" in err  # reusing OUT needs --resume
    for stage in ("head", "lora"):
        code, stdout, err = run_cli(
            chain_args(flux_inputs, out, "--stage", stage, "--steps", "3", "--resume"), capsys
        )
        assert code == 0, err
    assert "per-block feature MSE" in stdout and "held-out flow loss" in stdout
    assert "held-out w=14" in stdout and "train images w=1" in stdout
    state = json.loads((out / "adapt.json").read_text())
    assert [s for s in ("align", "head", "lora") if state["stages"][s]["done"]] == [
        "align",
        "head",
        "lora",
    ]
    assert state["run"]["text"].startswith("hashed-v1")  # bare transformer: the fallback
    assert not (out / "lora" / "ckpt").exists()
    side = json.loads((out / "model" / "dcgen_adapt.json").read_text())
    assert side["stages"] == ["align", "head", "lora"] and side["latent_patch_size"] == 1
    _forward(out / "model", FluxTransformer2DModel, 32)
    assert (out / "report.png").stat().st_size > 1000
    # a stage may not run before one that is already done
    code, _, err = run_cli(chain_args(flux_inputs, out, "--stage", "head", "--resume"), capsys)
    assert code == 0  # head is done: nothing to do
    fresh = tmp_path / "lora_first"
    assert (
        run_cli(chain_args(flux_inputs, fresh, "--stage", "lora", "--steps", "2"), capsys)[0] == 0
    )
    code, _, err = run_cli(chain_args(flux_inputs, fresh, "--stage", "align", "--resume"), capsys)
    assert code == 2 and "would run after lora" in err


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("where", [("align", 3), ("head", 4), ("lora", 3)])
def test_interrupted_run_resumes_to_the_same_weights(
    flux_inputs, tmp_path, capsys, step_hooks, where
):
    common = ("--stage", "all", "--steps", "6", "--ckpt-every", "2", "--ema", "0.9")
    ref = tmp_path / "ref"
    assert run_cli(chain_args(flux_inputs, ref, *common), capsys)[0] == 0

    def hook(name, done):
        if (name, done) == where:
            raise Interrupt(f"injected in {name} at step {done}")

    step_hooks.append(hook)
    run = tmp_path / "run"
    code, _, err = run_cli(chain_args(flux_inputs, run, *common), capsys)
    assert code == 130 and "interrupted" in err
    assert not (run / "model").exists()
    ckpt = json.loads((run / where[0] / "ckpt" / "meta.json").read_text())
    assert ckpt["step"] == where[1] and ckpt["world_size"] == 1
    step_hooks.clear()
    code, _, err = run_cli(chain_args(flux_inputs, run, *common, "--resume"), capsys)
    assert code == 0, err
    state = json.loads((run / "adapt.json").read_text())
    assert state["stages"][where[0]]["resumed_from"] == where[1]
    a = load_file(str(ref / "model" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(run / "model" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_pipeline_dir_uses_its_text_encoders(flux_inputs, tmp_path, capsys):
    out = tmp_path / "p"
    code, stdout, err = run_cli(
        chain_args(flux_inputs, out, "--stage", "align", "--steps", "2", "--json", base="pipeline"),
        capsys,
    )
    assert code == 0, err
    state = json.loads((out / "adapt.json").read_text())
    assert state["run"]["text"].startswith("pipeline:FluxPipeline")
    cache = [p.name for p in (out / "cache").iterdir()]
    assert (
        any(n.startswith("text-") for n in cache)
        and sum(n.startswith("latents-") for n in cache) == 2
    )


@pytest.mark.slow
def test_sana_chain(sana_inputs, tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, err = run_cli(
        chain_args(sana_inputs, out, "--stage", "all", "--steps", "3", "--json"), capsys
    )
    assert code == 0, err
    rep = json_report(stdout)
    assert [r["block"] for r in rep["rows"]] == ["embed", "block.0", "block.1"]
    model = SanaTransformer2DModel.from_pretrained(out / "model", local_files_only=True)
    assert model.config.in_channels == 128 and model.config.sample_size == 4
    _forward(out / "model", SanaTransformer2DModel, 128)


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_bfloat16_chain_trains_float32_parameters_under_autocast(
    flux_inputs, sana_inputs, tmp_path, capsys, family
):
    # --dtype bfloat16: frozen weights in bf16, trainable parameters float32, autocast. On a GPU
    # this is the memory-saving path (with --device cuda); here it runs every dtype boundary
    # the device boundaries share.
    inputs = flux_inputs if family == "flux" else sana_inputs
    out = tmp_path / "bf16"
    argv = chain_args(inputs, out, "--stage", "all", "--steps", "3", "--dtype", "bfloat16")
    code, stdout, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    rep = json_report(stdout)
    assert all(math.isfinite(v) for r in rep["rows"] for k, v in r.items() if k != "block" and v)
    assert all(math.isfinite(f["flow"]) for f in rep["flow_loss"])
    # the loss breakdown, on the CLI's own path: per scale (FLUX), empty caption, training images
    scales = ["w=1", "w=3.5", "w=7", "w=14"] if family == "flux" else []
    flow = {f["model"]: f for f in rep["flow_loss"]}
    detail = {r["model"]: r for r in rep["flow_breakdown"]}
    assert list(detail) == list(flow) == ["base", "surgery", "align", "head", "lora"]
    for name, r in detail.items():
        assert list(r) == ["model", *scales, "empty", "train"]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in r if k != "model"), r
        if scales:  # both tables show the one held-out pass's w = 1 loss (tests/adapt/test_flow.py
            assert r["w=1"] == flow[name]["flow"]  # checks it equals a plain w = 1 evaluation)
    saved = json.loads((out / "report.json").read_text())["flow_breakdown"]
    assert saved == {k: {c: v for c, v in r.items() if c != "model"} for k, r in detail.items()}
    state = json.loads((out / "adapt.json").read_text())
    assert all(state["stages"][s]["config"]["autocast"] == "bfloat16" for s in state["stages"])
    for stage in ("align", "head", "lora"):  # what trained was float32
        params = load_file(str(out / stage / "params.safetensors"))
        assert params and all(t.dtype == torch.float32 for t in params.values()), stage
    (weights,) = (out / "model").glob("*.safetensors")
    saved = load_file(str(weights))
    blocks = [t for k, t in saved.items() if k.startswith(("transformer_blocks.", "single_"))]
    assert blocks and all(t.dtype == torch.bfloat16 for t in blocks)  # LoRA merged into bf16
    cls = FluxTransformer2DModel if family == "flux" else SanaTransformer2DModel
    _forward(out / "model", cls, 32 if family == "flux" else 128)
