"""Stages: grid reconciliation, stage-1 training vs its least-squares floor, LoRA, merge."""

import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel

from dcgen_quant.adapt import family as fam
from dcgen_quant.adapt.data import HashedText, LatentSet
from dcgen_quant.adapt.stages import (
    add_lora,
    align,
    align_head,
    align_loss,
    finetune_lora,
    lstsq_embedder,
    merge,
    reconcile,
)
from dcgen_quant.adapt.surgery import save_adapted, surgery
from dcgen_quant.adapt.train import TrainConfig
from dcgen_quant.models.tiny import tiny_flux, tiny_sana


def test_reconcile_pool_is_the_block_mean_and_bilinear_upsamples():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, 6 * 4, 3, generator=g)  # grid 6 x 4
    small = torch.randn(2, 3 * 2, 3, generator=g)  # grid 3 x 2
    a, b = reconcile(small, (3, 2), big, (6, 4), "pool")
    assert torch.equal(a, small)
    grid = big.reshape(2, 6, 4, 3)
    mean = grid.reshape(2, 3, 2, 2, 2, 3).mean(dim=(2, 4)).reshape(2, 6, 3)
    torch.testing.assert_close(b, mean)
    a, b = reconcile(small, (3, 2), big, (6, 4), "bilinear")
    assert torch.equal(b, big) and a.shape == big.shape
    const = torch.ones(1, 6, 1) * 2.5  # bilinear weights sum to 1
    up, _ = reconcile(const, (3, 2), big[:1, :, :1], (6, 4), "bilinear")
    torch.testing.assert_close(up, torch.full_like(up, 2.5))
    same, same2 = reconcile(small, (3, 2), small, (3, 2), "bilinear")
    assert same is small and same2 is small
    with pytest.raises(ValueError, match="reconcile: got 'nearest'"):
        reconcile(small, (3, 2), big, (6, 4), "nearest")
    with pytest.raises(ValueError, match="one must contain the other"):
        reconcile(small, (3, 2), torch.zeros(2, 8, 3), (1, 8), "pool")


def flux_data(n=24, seed=0):
    """Latent pairs where the new latent is a noisy linear function of the pooled base one."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, 8, 8, generator=g)
    pooled = torch.nn.functional.avg_pool2d(base, 4)  # 16 x 2 x 2
    mix = torch.randn(16, 12, generator=g) / 4
    new = torch.einsum("nchw,cd->ndhw", pooled, mix) + 0.05 * torch.randn(n, 12, 2, 2, generator=g)
    text = HashedText(256, 128, length=4)
    caps = ["a cat", "a dog", "two birds"]
    return LatentSet(
        base,
        new,
        torch.arange(n) % 3,
        text.encode(caps),
        text.encode([""]),
        [f"{i}.png" for i in range(n)],
    )


@pytest.mark.parametrize("mode", ["pool", "bilinear"])
def test_align_trains_only_the_embedder_and_approaches_the_lstsq_floor(mode):
    base = tiny_flux()
    data = flux_data()
    ad = surgery(base, 12, 1)
    frozen = {n: p.clone() for n, p in ad.named_parameters() if not n.startswith("x_embedder")}
    res = align(
        ad,
        base,
        data,
        TrainConfig(steps=150, lr=3e-3, batch_size=8),
        reconcile_mode=mode,
        progress=False,
    )
    for n, p in ad.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    floor = lstsq_embedder(surgery(base, 12, 1), base, data, mode)
    first, last = res.losses[0], sum(res.losses[-10:]) / 10
    assert last - floor < 0.2 * (first - floor)  # most of the way to the optimum
    trained = align_loss(ad, base, data, mode)
    best = surgery(base, 12, 1)
    lstsq_embedder(best, base, data, mode)
    # the least-squares embedder reaches the floor it reports, and nothing beats it
    assert align_loss(best, base, data, mode) == pytest.approx(floor, rel=1e-4)
    assert floor <= trained


def test_lstsq_floor_on_sana_with_patch_2():
    base = tiny_sana()
    g = torch.Generator().manual_seed(1)
    text = HashedText(128, None, 4, mask=True)
    data = LatentSet(
        torch.randn(10, 32, 8, 8, generator=g),
        torch.randn(10, 20, 4, 4, generator=g),
        torch.zeros(10, dtype=torch.long),
        text.encode(["x"]),
        text.encode([""]),
        list("abcdefghij"),
    )
    ad = surgery(base, 20, 2, sample_size=4)
    before = align_loss(ad, base, data)
    floor = lstsq_embedder(ad, base, data)
    assert align_loss(ad, base, data) == pytest.approx(floor, rel=1e-4)
    assert floor < 0.5 * before
    other = surgery(base, 20, 2, sample_size=4)
    align(other, base, data, TrainConfig(steps=30, lr=1e-3, batch_size=10), progress=False)
    assert floor <= align_loss(other, base, data)


def test_lora_targets_cover_every_block_linear():
    flux = tiny_flux()
    names = fam.lora_targets(flux)
    linears = [n for n, m in flux.named_modules() if isinstance(m, torch.nn.Linear)]
    in_blocks = [n for n in linears if n.startswith(("transformer_blocks.", "single_transformer"))]
    assert names == in_blocks and len(names) == 2 * 14 + 2 * 6
    sana = fam.lora_targets(tiny_sana())
    assert "transformer_blocks.0.ff.conv_inverted" in sana
    assert "transformer_blocks.0.ff.conv_point" in sana
    assert "transformer_blocks.0.ff.conv_depth" not in sana  # depthwise 3x3 is not a linear


def _randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_merged_lora_equals_unmerged(family, tmp_path):
    base = tiny_flux() if family == "flux" else tiny_sana()
    c = 16
    ad = surgery(base, c, 1, head_init="default", sample_size=4)
    add_lora(ad, rank=8, alpha=16, seed=0)
    _randomize_lora(ad, 1)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, c, 4, 6, generator=g)
    if family == "flux":
        text = HashedText(256, 128, 6).encode(["a", "b c", "d e f"])
    else:
        text = HashedText(128, None, 6, mask=True).encode(["a", "b c", "d e f"])
    sigma, w = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([1.0, 4.0, 9.0])
    with torch.no_grad():
        unmerged = fam.forward(ad, z, text, sigma, w, 1)
        no_lora = surgery(base, c, 1, head_init="default", sample_size=4)
        plain = fam.forward(no_lora, z, text, sigma, w, 1)
    assert (unmerged - plain).norm() > 0.05 * plain.norm()  # the LoRA matters
    merge(ad)
    assert not any("lora" in type(m).__module__ for m in ad.modules())
    assert not any(".lora_" in n for n, _ in ad.named_parameters())
    with torch.no_grad():
        merged = fam.forward(ad, z, text, sigma, w, 1)
    rel = ((merged - unmerged).norm() / unmerged.norm()).item()
    assert rel < 1e-5, rel
    save_adapted(ad, tmp_path / "m")
    cls = FluxTransformer2DModel if family == "flux" else SanaTransformer2DModel
    again = cls.from_pretrained(tmp_path / "m", local_files_only=True)
    with torch.no_grad():
        assert torch.equal(fam.forward(again, z, text, sigma, w, 1), merged)


def test_head_and_lora_stages_train_the_right_parameters():
    base = tiny_flux()
    data = flux_data(12)
    ad = surgery(base, 12, 1)
    before = {n: p.clone() for n, p in ad.named_parameters()}
    res = align_head(
        ad, data, TrainConfig(steps=3, lr=1e-3, batch_size=2, grad_clip=0.1), progress=False
    )
    changed = {n for n, p in ad.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"x_embedder.weight", "x_embedder.bias", "proj_out.weight", "proj_out.bias"}
    assert len(res.losses) == 3
    before = {n: p.clone() for n, p in ad.named_parameters()}
    finetune_lora(
        ad,
        data,
        TrainConfig(steps=3, lr=1e-3, batch_size=2, ema=0.999),
        rank=4,
        alpha=4,
        progress=False,
    )
    lora = [n for n, _ in ad.named_parameters() if ".lora_" in n]
    assert len(lora) == 2 * len(fam.lora_targets(base))
    for n, p in ad.named_parameters():
        if ".lora_B" in n:
            assert p.abs().sum() > 0, n  # trained away from its zero init
        elif ".lora_" not in n and not n.startswith(("x_embedder", "proj_out")):
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    with pytest.raises(ValueError, match="rank: got 0"):
        add_lora(surgery(base, 12, 1), rank=0, alpha=1)
