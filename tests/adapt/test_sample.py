"""Sampling (dcgen_quant/adapt/sample.py) and ``python -m dcgen_quant generate``."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen_quant.adapt.demo import tiny_dc
from dcgen_quant.adapt.flow import resolution_shift
from dcgen_quant.adapt.sample import euler, sigma_schedule
from dcgen_quant.models.tiny import tiny_flux, tiny_sana

from ..quantized_models import FAST_QUANT
from .helpers import run_cli


@pytest.mark.parametrize("steps,tokens", [(1, 256), (20, 256), (28, 4096), (7, 1024)])
def test_sigma_schedule_matches_diffusers_flux_scheduler(steps, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FluxPipeline: sigmas = linspace(1, 1/steps, steps), dynamic shifting with mu
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(
        sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=math.log(resolution_shift(tokens))
    )
    ours = sigma_schedule(steps, tokens)
    assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-6)


def test_euler_lands_on_the_data_point_of_a_straight_flow():
    # data = one point c: the exact velocity is (x - c) / sigma and the trajectories are
    # straight lines, so Euler on any decreasing schedule from 1 to 0 ends exactly at c
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 4, 5, 5, generator=g)
    noise = torch.randn(3, 4, 5, 5, generator=g)
    for steps in (1, 4, 20):
        x = euler(lambda x, s: (x - c) / s.view(-1, 1, 1, 1), noise, sigma_schedule(steps, 64))
        torch.testing.assert_close(x, c, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny FLUX that reads a 32-channel AutoencoderDC latent at patch 1, and that AE."""
    root = tmp_path_factory.mktemp("gen")
    ae = tiny_dc(0, 32, 4)  # f8 c32
    ae.save_pretrained(root / "ae")
    tiny_flux(seed=0, in_channels=32).save_pretrained(root / "flux")
    tiny_sana(seed=0).save_pretrained(root / "sana")
    tiny_dc(1, 32, 3).save_pretrained(root / "ae_sana")  # f4 c32: 32x32 images -> 8x8 latent
    return root


def _pixels(path):
    return np.asarray(Image.open(path))


def _generate(capsys, model, out, *extra, ae=None, prompts=("a cat",), resolution=64):
    """``python -m dcgen_quant generate`` in-process; returns (exit code, stderr)."""
    argv = ["generate", "--model", str(model), "--out", str(out), "--resolution", str(resolution)]
    argv += [a for p in prompts for a in ("--prompt", p)]
    argv += ["--ae", str(ae)] if ae is not None else []
    code, _, err = run_cli([*argv, *extra], capsys)
    return code, err


def test_generate_writes_deterministic_images(tiny_dirs, tmp_path, capsys):
    kw = {"ae": tiny_dirs / "ae", "prompts": ("a cat", "a dog")}
    code, err = _generate(capsys, tiny_dirs / "flux", tmp_path / "a", "--steps", "4", **kw)
    assert code == 0, err
    assert "HashedText" in err  # no text encoders given: the stand-in, with a warning
    a0, a1 = _pixels(tmp_path / "a" / "0.png"), _pixels(tmp_path / "a" / "1.png")
    assert a0.shape == (64, 64, 3) and a0.std() > 0 and not np.array_equal(a0, a1)
    code, err = _generate(capsys, tiny_dirs / "flux", tmp_path / "b", "--steps", "4", **kw)
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "b" / "0.png"), a0)  # same seed, same image


def test_generate_from_a_quantized_checkpoint(tiny_dirs, tmp_path, capsys):
    from dcgen_quant.checkpoint import save_quantized
    from dcgen_quant.models.calibration import synthetic_calibration
    from dcgen_quant.quantize import QuantConfig, quantize_model

    model = tiny_flux(seed=0, in_channels=32).eval()
    calib = synthetic_calibration(model, samples=2, steps=2, seed=0)
    quantize_model(model, calib, QuantConfig(**FAST_QUANT), progress=False)
    save_quantized(model, tmp_path / "q.safetensors")
    for source, out in ((tmp_path / "q.safetensors", "q"), (tiny_dirs / "flux", "f")):
        code, err = _generate(capsys, source, tmp_path / out, "--steps", "4", ae=tiny_dirs / "ae")
        assert code == 0, err
    q = _pixels(tmp_path / "q" / "0.png").astype(float)
    f = _pixels(tmp_path / "f" / "0.png").astype(float)
    psnr = 10 * math.log10(255**2 / max(((q - f) ** 2).mean(), 1e-12))
    print(f"int4 vs 16-bit image PSNR {psnr:.1f} dB")
    assert psnr > 20, psnr  # the 4-bit model draws nearly the 16-bit model's image


def test_generate_sana_with_classifier_free_guidance(tiny_dirs, tmp_path, capsys):
    extra = ("--steps", "3", "--guidance", "4.5")
    code, err = _generate(
        capsys, tiny_dirs / "sana", tmp_path / "s", *extra, ae=tiny_dirs / "ae_sana", resolution=32
    )
    assert code == 0, err
    assert _pixels(tmp_path / "s" / "0.png").shape == (32, 32, 3)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--resolution", "60"], "multiple of the autoencoder's downsampling factor 8"),
        (["--steps", "0"], "--steps"),
        (["--ae", "/nonexistent/ae"], "does not exist"),
    ],
)
def test_generate_errors_are_one_line(tiny_dirs, tmp_path, capsys, extra, message):
    code, err = _generate(capsys, tiny_dirs / "flux", tmp_path / "x", *extra, ae=tiny_dirs / "ae")
    assert code == 2 and message in err, err
    assert not list(tmp_path.glob("x/*.png"))  # nothing written


def test_generate_needs_an_autoencoder_for_a_bare_transformer(tiny_dirs, tmp_path, capsys):
    code, err = _generate(capsys, tiny_dirs / "flux", tmp_path / "x")
    assert code == 2 and "--ae" in err, err
