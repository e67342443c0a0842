"""Small on-disk inputs for the adapt CLI tests: real skimage crops, tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcgen_quant.adapt import train as T


@pytest.fixture
def step_hooks():
    yield T.STEP_HOOKS
    T.STEP_HOOKS.clear()


def _build(root: Path, family: str) -> dict:
    from dcgen_quant.adapt.demo import DEMO_FLUX, tiny_dc, tiny_flux_pipeline, tiny_kl, write_images
    from dcgen_quant.models.tiny import tiny_flux, tiny_sana

    write_images(
        root / "data",
        {"astronaut": "an astronaut", "coffee": "a cup of coffee", "camera": "a man with a camera"},
        3,
        48,
        seed=0,
    )
    write_images(root / "heldout", {"rocket": "a rocket"}, 2, 48, seed=1)
    paths = {"data": root / "data", "heldout": root / "heldout"}
    if family == "flux":
        base_ae, target_ae = tiny_kl(0), tiny_dc(1, 32, 5)
        base = tiny_flux(**DEMO_FLUX)
        pipe = tiny_flux_pipeline(base, base_ae, ["an astronaut", "a cup of coffee", ""], 0)
        pipe.save_pretrained(root / "pipeline")
        paths["pipeline"] = root / "pipeline"
    else:
        base_ae, target_ae = tiny_dc(0, 32, 4), tiny_dc(1, 128, 5)
        base = tiny_sana()
    base.save_pretrained(root / "base")
    base_ae.save_pretrained(root / "base_ae")
    target_ae.save_pretrained(root / "target_ae")
    paths.update(base=root / "base", base_ae=root / "base_ae", target_ae=root / "target_ae")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def flux_inputs(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        return _build(tmp_path_factory.mktemp("flux_inputs"), "flux")


@pytest.fixture(scope="module")
def sana_inputs(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        return _build(tmp_path_factory.mktemp("sana_inputs"), "sana")
