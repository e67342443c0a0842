"""Data: image folder, captions, resizing, held-out split, caches, text embeddings."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen_quant.adapt import data as D


def write(folder, name, w, h, seed, caption=None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(f"  {caption}\n")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    write(d, "b.png", 40, 24, 0, "a red square")
    write(d, "a.jpg", 17, 33, 1)
    write(d, "c.webp", 20, 20, 2, "")
    (d / "notes.md").write_text("not an image")
    return d


def test_scan_folder_captions_and_order(folder):
    items = D.scan_folder(folder, "default caption")
    assert [it.path.name for it in items] == ["a.jpg", "b.png", "c.webp"]
    assert [it.caption for it in items] == ["default caption", "a red square", ""]


def test_scan_folder_errors(tmp_path):
    with pytest.raises(NotADirectoryError, match="data: .*missing"):
        D.scan_folder(tmp_path / "missing", "x")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        D.scan_folder(tmp_path, "x")


def test_load_image_resizes_and_center_crops(tmp_path):
    arr = np.zeros((30, 90, 3), dtype=np.uint8)
    arr[:, 30:60] = 255  # white middle third: the center crop of a 3:1 image
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = D.load_image(tmp_path / "wide.png", 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x[:, :, 3:13].min() > 0.9 and x.max() <= 1.0
    Image.fromarray(arr[:7, :5]).save(tmp_path / "tiny.png")  # smaller than R: upscaled
    assert D.load_image(tmp_path / "tiny.png", 16).shape == (3, 16, 16)
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "gray.png")  # grayscale becomes RGB
    assert D.load_image(tmp_path / "gray.png", 8).shape == (3, 8, 8)


def test_split_holdout_is_by_name_hash(folder, tmp_path):
    items = D.scan_folder(folder, "x")
    train, held = D.split_holdout(items, 1)
    assert len(held) == 1 and len(train) == 2
    write(folder, "zzz.png", 8, 8, 5)  # another file does not change who is held out
    train2, held2 = D.split_holdout(D.scan_folder(folder, "x"), 1)
    assert [h.path.name for h in held2] == [h.path.name for h in held]
    with pytest.raises(ValueError, match="holdout: got 4"):
        D.split_holdout(items, 4)


def test_hashed_text_is_deterministic_and_word_based():
    enc = D.HashedText(32, 8, length=6, mask=True)
    a = enc.encode(["a red cat", "A RED dog", ""])
    b = D.HashedText(32, 8, length=6, mask=True).encode(["a red cat"])
    assert a.embeds.shape == (3, 6, 32) and a.pooled.shape == (3, 8) and a.mask.shape == (3, 6)
    assert torch.equal(a.embeds[0], b.embeds[0]) and torch.equal(a.pooled[0], b.pooled[0])
    assert torch.equal(a.embeds[0, :2], a.embeds[1, :2])  # shared words "a red"
    assert not torch.equal(a.embeds[0, 2], a.embeds[1, 2])
    assert a.mask[0].tolist() == [1, 1, 1, 1, 0, 0] and a.mask[2].tolist() == [1, 0, 0, 0, 0, 0]
    assert abs(a.embeds.std().item() - 1) < 0.2


def test_cached_latents_and_text(folder, tmp_path, monkeypatch):
    items = D.scan_folder(folder, "x")
    calls = []

    def fake_encode(ae, images):
        calls.append(images.shape[0])
        return images[:, :2, ::4, ::4] * ae

    monkeypatch.setattr(D, "encode", fake_encode)
    cache = tmp_path / "cache"
    out = D.cached_latents(
        cache,
        items,
        8,
        {"base": 1.0, "new": 2.0},
        {"base": "1", "new": "2"},
        batch_size=2,
        progress=False,
    )
    assert out["names"] == ["a.jpg", "b.png", "c.webp"]
    assert out["base"].shape == (3, 2, 2, 2) and torch.equal(out["new"], 2 * out["base"])
    assert sum(calls) == 6
    again = D.cached_latents(
        cache, items, 8, {"base": 1.0, "new": 2.0}, {"base": "1", "new": "2"}, progress=False
    )
    assert sum(calls) == 6 and torch.equal(again["new"], out["new"])  # served from the cache
    D.cached_latents(
        cache, items, 8, {"base": 1.0, "new": 2.0}, {"base": "1", "new": "3"}, progress=False
    )
    assert sum(calls) == 12  # another autoencoder: recomputed
    write(folder, "b.png", 40, 24, 9)  # changed image bytes: recomputed
    D.cached_latents(
        cache,
        D.scan_folder(folder, "x"),
        8,
        {"base": 1.0, "new": 2.0},
        {"base": "1", "new": "2"},
        progress=False,
    )
    assert sum(calls) == 18

    enc = D.HashedText(16, None, 4)
    texts, empty = D.cached_text(cache, enc, ["b", "a c"])
    assert texts.embeds.shape == (2, 4, 16) and empty.embeds.shape == (1, 4, 16)
    assert torch.equal(empty.embeds, enc.encode([""]).embeds)
    monkeypatch.setattr(enc, "encode", lambda caps: pytest.fail("not cached"))
    texts2, _ = D.cached_text(cache, enc, ["b", "a c"])
    assert torch.equal(texts2.embeds, texts.embeds)


def test_autoencoder_helpers_round_trip_scaling():
    from dcgen_quant.adapt.demo import tiny_dc, tiny_kl

    kl, dc = tiny_kl(0), tiny_dc(1, 8, 3)
    kl.register_to_config(scaling_factor=0.5, shift_factor=0.25)
    dc.register_to_config(scaling_factor=2.0)
    assert (D.ae_kind(kl), D.ae_downsample(kl)) == ("kl", 4)
    assert (D.ae_kind(dc), D.ae_downsample(dc)) == ("dc", 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = kl.encode(x).latent_dist.mode()
        raw_dc = dc.encode(x).latent
    torch.testing.assert_close(D.encode(kl, x), (raw - 0.25) * 0.5)
    torch.testing.assert_close(D.encode(dc, x), raw_dc * 2.0)
    with torch.no_grad():
        torch.testing.assert_close(D.decode(kl, D.encode(kl, x)), kl.decode(raw).sample)
    with pytest.raises(TypeError, match="AutoencoderKL or AutoencoderDC"):
        D.ae_kind(torch.nn.Linear(1, 1))
