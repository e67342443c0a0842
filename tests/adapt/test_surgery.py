"""Surgery and the family helpers: shapes, config, round trip, packing as diffusers does it."""

import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from dcgen_quant.adapt import family as fam
from dcgen_quant.adapt.family import TextBatch
from dcgen_quant.adapt.surgery import load_adapted, save_adapted, surgery
from dcgen_quant.models.tiny import tiny_flux, tiny_sana


def flux_text(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextBatch(torch.randn(b, 5, 256, generator=g), torch.randn(b, 128, generator=g))


def sana_text(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextBatch(torch.randn(b, 5, 128, generator=g), None, torch.ones(b, 5))


@pytest.mark.parametrize("p,h,w", [(1, 1, 1), (1, 3, 5), (2, 2, 2), (2, 6, 10), (3, 9, 3)])
def test_pack_unpack_round_trip(p, h, w):
    z = torch.randn(2, 5, h, w, generator=torch.Generator().manual_seed(p))
    tokens = fam.pack(z, p)
    assert tokens.shape == (2, (h // p) * (w // p), 5 * p * p)
    assert torch.equal(fam.unpack(tokens, (h // p, w // p), p), z)


def test_pack_is_diffusers_flux_packing_at_p2_and_ids_match():
    z = torch.randn(3, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    ours = fam.pack(z, 2)
    theirs = FluxPipeline._pack_latents(z, 3, 16, 8, 6)
    assert torch.equal(ours, theirs)
    ids = FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32)
    assert torch.equal(fam.image_ids((4, 3)), ids)


def test_pack_rejects_indivisible_size():
    with pytest.raises(ValueError, match="multiples of p=2"):
        fam.pack(torch.zeros(1, 4, 5, 6), 2)


def test_latent_patch_size():
    flux, sana = tiny_flux(), tiny_sana()
    assert fam.latent_patch_size(flux, 16) == 2  # 64 = 16 * 2 * 2, FLUX's packing
    assert fam.latent_patch_size(flux, 64) == 1
    assert fam.latent_patch_size(sana, 32) == 1
    with pytest.raises(ValueError, match="latent_channels: got 24"):
        fam.latent_patch_size(flux, 24)
    with pytest.raises(ValueError, match="in_channels 32"):
        fam.latent_patch_size(sana, 16)
    with pytest.raises(TypeError, match="Linear"):
        fam.family_of(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["flux", "sana"])
@pytest.mark.parametrize("c,p", [(32, 1), (12, 2)])
def test_surgery_layers_config_and_shared_weights(family, c, p):
    base = tiny_flux() if family == "flux" else tiny_sana()
    before = {n: t.clone() for n, t in base.state_dict().items()}
    ad = surgery(base, c, p, sample_size=4)
    assert type(ad) is type(base)
    emb, head = fam.embedder(ad), fam.head(ad)
    dim = base.proj_out.in_features
    if family == "flux":
        assert (emb.in_features, emb.out_features) == (c * p * p, dim)
        assert ad.config.in_channels == ad.config.out_channels == c * p * p
        assert ad.config.patch_size == 1
    else:
        assert isinstance(emb, torch.nn.Conv2d)
        assert (emb.in_channels, emb.out_channels, emb.kernel_size, emb.stride) == (
            c,
            dim,
            (p, p),
            (p, p),
        )
        assert ad.config.in_channels == ad.config.out_channels == c
        assert ad.config.patch_size == p and ad.config.sample_size == 4
    assert (head.in_features, head.out_features) == (dim, c * p * p)
    assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0  # zero head init
    # the base is untouched and everything but the embedder / head is the base's
    for n, t in base.state_dict().items():
        assert torch.equal(t, before[n]), n
    replaced = (fam.embedder_name(ad) + ".", "proj_out.")
    shared = [n for n in ad.state_dict() if not n.startswith(replaced)]
    assert len(shared) > 20
    for n in shared:
        assert torch.equal(ad.state_dict()[n], before[n]), n


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_surgery_forward_save_load_round_trip(family, tmp_path):
    base = tiny_flux() if family == "flux" else tiny_sana()
    c, p = (32, 1) if family == "flux" else (128, 2)
    ad = surgery(base, c, p, head_init="default", sample_size=8, seed=3)
    z = torch.randn(2, c, 8, 6, generator=torch.Generator().manual_seed(1))
    text = flux_text(2) if family == "flux" else sana_text(2)
    sigma, w = torch.tensor([0.3, 0.8]), torch.tensor([1.0, 3.5])
    with torch.no_grad():
        out = fam.forward(ad, z, text, sigma, w, p)
    assert out.shape == z.shape and torch.isfinite(out).all() and out.abs().sum() > 0
    save_adapted(ad, tmp_path / "m", {"latent_patch_size": p})
    cls = FluxTransformer2DModel if family == "flux" else SanaTransformer2DModel
    again = cls.from_pretrained(tmp_path / "m", local_files_only=True)
    with torch.no_grad():
        out2 = fam.forward(again, z, text, sigma, w, p)
    assert torch.equal(out, out2)
    model, meta = load_adapted(tmp_path / "m")
    assert meta == {"latent_patch_size": p} and type(model) is cls


def test_surgery_init_is_seeded_and_does_not_touch_global_rng():
    base = tiny_flux()
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    a = surgery(base, 32, 1, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = surgery(base, 32, 1, seed=5)
    c = surgery(base, 32, 1, seed=6)
    assert torch.equal(a.x_embedder.weight, b.x_embedder.weight)
    assert not torch.equal(a.x_embedder.weight, c.x_embedder.weight)
    z = surgery(base, 32, 1, embedder_init="zeros")
    assert z.x_embedder.weight.abs().sum() == 0


def test_surgery_inplace_replaces_the_base_layers():
    base = tiny_flux()
    ad = surgery(base, 32, 1, inplace=True)
    assert ad is base and base.x_embedder.in_features == 32


def test_surgery_errors_name_the_argument():
    base = tiny_flux()
    with pytest.raises(ValueError, match="new_channels: got 0"):
        surgery(base, 0, 1)
    with pytest.raises(ValueError, match="new_patch_size: got 1.5"):
        surgery(base, 4, 1.5)
    with pytest.raises(ValueError, match="embedder_init: got 'xavier'"):
        surgery(base, 4, 1, embedder_init="xavier")
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        surgery(torch.nn.Linear(3, 3), 4, 1)


def test_load_adapted_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_adapted(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_adapted(tmp_path)
