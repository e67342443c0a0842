"""evaluate's metrics on fixed image pairs (scikit-image photographs) against textbook formulas
and independent implementations; LPIPS / CLIP / FID code paths with small random networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dcgen_quant.evaluate import learned as L
from dcgen_quant.evaluate import metrics as M
from dcgen_quant.evaluate.lpips import LPIPS

from .conftest import random_lpips_state, tiny_clip_dir


def _pair(name: str, size: int, sigma: float, seed: int = 0):
    """(crop of a scikit-image photograph, the same + Gaussian noise), uint8 [size, size, 3]."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.ascontiguousarray(img[:size, :size, :3]).astype(np.uint8)
    rng = np.random.default_rng(seed)
    noisy = np.clip(np.round(img + rng.normal(0, sigma, img.shape)), 0, 255).astype(np.uint8)
    return img, noisy


def _chw64(a):
    return torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name,sigma", [("astronaut", 4.0), ("coffee", 20.0), ("camera", 9.0)])
def test_psnr_is_the_textbook_formula(name, sigma):
    ref, img = _pair(name, 96, sigma)
    mse = ((ref.astype(np.float64) - img.astype(np.float64)) ** 2).mean()
    assert M.psnr(ref, img) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)
    assert M.psnr(ref, ref) == math.inf


@pytest.mark.parametrize("name,sigma", [("astronaut", 4.0), ("coffee", 20.0), ("chelsea", 9.0)])
def test_ssim_is_wang_et_al_over_the_valid_region(name, sigma):
    # an independent implementation: torchmetrics' SSIM map (11-tap Gaussian, sigma 1.5, same
    # constants), averaged over the pixels whose window lies inside the image, as Wang et al.
    from torchmetrics.functional.image import structural_similarity_index_measure

    ref, img = _pair(name, 64, sigma)
    _, full = structural_similarity_index_measure(
        _chw64(img), _chw64(ref), data_range=255.0, return_full_image=True
    )
    assert M.ssim(ref, img) == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-12)
    assert M.ssim(ref, ref) == 1.0
    assert 0 < M.ssim(ref, img) < 1


def test_ms_ssim_is_torchmetrics_and_needs_161_pixels():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    ref, img = _pair("astronaut", 192, 10.0)
    want = multiscale_structural_similarity_index_measure(_chw64(img), _chw64(ref), data_range=255)
    assert M.ms_ssim(ref, img) == pytest.approx(float(want), abs=1e-12)
    assert M.ms_ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    _, worse = _pair("astronaut", 192, 30.0)
    assert M.ms_ssim(ref, worse) < M.ms_ssim(ref, img) < 1
    assert "ms_ssim" in M.pixel_skips(160) and "ms_ssim" not in M.pixel_skips(161)


def test_metrics_refuse_mismatched_images():
    ref, img = _pair("astronaut", 32, 5.0)
    with pytest.raises(ValueError, match="one size"):
        M.psnr(ref, img[:16])
    with pytest.raises(ValueError, match="uint8"):
        M.ssim(ref, img.astype(np.float32))


def _oracle_lpips(monkeypatch, backbone, lins):
    """torchmetrics' LPIPS network (its scaling, normalization, slicing, weighting, averaging)
    with our AlexNet module as the backbone (torchvision, which it builds that from, does not
    import here) and the same weights."""
    import torchmetrics.functional.image.lpips as tm

    from dcgen_quant.evaluate.lpips import alexnet_features

    monkeypatch.setattr(tm, "_get_tv_model_features", lambda *args, **kw: alexnet_features())
    oracle = tm._LPIPS(pretrained=False, net="alex", pnet_rand=True)
    state = {}
    for k, (start, end) in enumerate([(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]):
        for i in range(start, end):
            for p in ("weight", "bias"):
                if f"features.{i}.{p}" in backbone:
                    state[f"net.slice{k + 1}.{i}.{p}"] = backbone[f"features.{i}.{p}"]
    state.update(lins)
    state.update({f"lins.{k}.model.1.weight": lins[f"lin{k}.model.1.weight"] for k in range(5)})
    oracle.load_state_dict(state, strict=True)  # lins.k is the same module as link
    return oracle.eval()


def test_lpips_equals_torchmetrics_network_with_the_same_weights(monkeypatch):
    backbone, lins = random_lpips_state(seed=3)
    ours = LPIPS()
    ours.load_weights(backbone, lins)
    oracle = _oracle_lpips(monkeypatch, backbone, lins)
    for name, sigma, size in (("astronaut", 8.0, 64), ("coffee", 25.0, 48), ("rocket", 3.0, 37)):
        ref, img = _pair(name, size, sigma)
        a, b = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1 for x in (ref, img))
        want = float(oracle(a, b).squeeze())
        got = float(ours(a, b)[0])
        assert got == pytest.approx(want, rel=1e-5), (name, got, want)
        assert got > 0
        assert float(ours(a, a)[0]) == 0.0
    with pytest.raises(ValueError, match="sides >= 32"):
        ours(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


def test_the_shipped_lpips_linear_layers_load():
    path = L._shipped_lpips_lins()
    assert path is not None and path.name == "alex.pth"
    backbone, _ = random_lpips_state()
    net = LPIPS()
    net.load_weights(backbone, L._load_pth(path, "LPIPS"))
    assert all(float(getattr(net, f"lin{k}").model[1].weight.min()) >= 0 for k in range(5))
    bad = dict(backbone)
    bad["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ValueError, match="features.0.weight"):
        net.load_weights(bad, L._load_pth(path, "LPIPS"))


def test_clip_score_is_100_times_the_clamped_cosine(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    path = tiny_clip_dir(tmp_path / "clip")
    ref, img = _pair("chelsea", 48, 5.0)
    model = CLIPModel.from_pretrained(path).eval()
    proc = CLIPProcessor.from_pretrained(path)
    score = L.clip_scorer(lambda: (CLIPModel.from_pretrained(path), proc), "cpu")
    for prompt, pixels in (("a cat", ref), ("a tabby cat, noisy", img)):
        x = proc(text=[prompt], images=[torch.from_numpy(pixels).permute(2, 0, 1)],
                 return_tensors="pt", padding=True)  # fmt: skip
        with torch.no_grad():
            i = L._tensor_output(model.get_image_features(x["pixel_values"]))
            t = L._tensor_output(model.get_text_features(x["input_ids"], x["attention_mask"]))
        cos = float(torch.nn.functional.cosine_similarity(i, t)[0])
        assert score(pixels, prompt) == pytest.approx(100 * max(cos, 0.0), rel=1e-5, abs=1e-4)


def test_fid_is_the_frechet_distance_of_the_feature_gaussians():
    from scipy import linalg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )

    class Net(torch.nn.Module):  # uint8 images in, [N, 4] features out, as Inception is used
        def __init__(self):
            super().__init__()
            self.f = features

        def forward(self, x):
            return self.f(x.float() / 255.0)

    rng = np.random.default_rng(0)
    ref = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(10)]
    img = [np.clip(r.astype(int) + rng.integers(-40, 41, r.shape), 0, 255).astype(np.uint8)
           for r in ref]  # fmt: skip

    def feats(xs):
        with torch.no_grad():
            return Net()(torch.stack([torch.from_numpy(x).permute(2, 0, 1) for x in xs])).double()

    a, b = feats(ref).numpy(), feats(img).numpy()
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = mu @ mu + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert L.fid_scorer(Net(), "cpu")(ref, img) == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_learned_metrics_without_weights_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torch hub cache
    monkeypatch.setattr(L, "CLIP_HUB_NAME", "dcgen-quant-tests/no-such-model")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    learned = L.load_learned(tmp_path, "cpu", n_images=2)
    assert learned.lpips is learned.clip is learned.image_reward is learned.fid is None
    for name in ("lpips", "clip", "image_reward", "fid"):
        assert learned.skipped[name].startswith("no weights"), learned.skipped
    assert "at least 2 prompts" in L.load_learned(tmp_path, "cpu", n_images=1).skipped["fid"]
    # ImageReward / FID files present, packages unusable here: skipped naming the package
    (tmp_path / "image-reward").mkdir()
    (tmp_path / "image-reward" / "ImageReward.pt").write_bytes(b"x")
    (tmp_path / "image-reward" / "med_config.json").write_text("{}")
    (tmp_path / "fid").mkdir()
    (tmp_path / "fid" / L.INCEPTION_FILE).write_bytes(b"x")
    monkeypatch.setitem(__import__("sys").modules, "ImageReward", None)  # import fails
    learned = L.load_learned(tmp_path, "cpu", n_images=2)
    assert learned.skipped["image_reward"].startswith("needs the image-reward package")
    if learned.fid is None:  # torch-fidelity (torchvision) absent, as on this project's CPU CI
        assert learned.skipped["fid"].startswith("needs torch-fidelity")
    with pytest.raises(NotADirectoryError, match="--metric-weights"):
        L.load_learned(tmp_path / "missing", "cpu", n_images=2)


def test_lpips_and_clip_run_from_a_weights_directory(metric_weights):
    learned = L.load_learned(metric_weights, "cpu", n_images=2, wanted=("lpips", "clip"))
    assert learned.lpips is not None and learned.clip is not None, learned.skipped
    assert learned.skipped == {"image_reward": "not requested (--metrics)",
                               "fid": "not requested (--metrics)"}  # fmt: skip
    ref, img = _pair("astronaut", 40, 12.0)
    assert learned.lpips(ref, ref) == 0.0 and learned.lpips(ref, img) > 0
    assert math.isfinite(learned.clip(img, "an astronaut"))
