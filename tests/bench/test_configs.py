"""Full-size configurations: parameter counts and token geometry against public numbers."""

from __future__ import annotations

import pytest

from dcgen_quant.bench import configs


def _params(model) -> float:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_public_sizes():
    assert _params(configs.build_transformer("flux")) == pytest.approx(11.9e9, rel=0.01)
    assert _params(configs.build_transformer("sana-1.6b")) == pytest.approx(1.6e9, rel=0.01)
    # DC-Gen changes only the embedder and head: same size within 0.01%
    dcgen = _params(configs.build_transformer("dcgen-flux-f64c128"))
    assert dcgen == pytest.approx(_params(configs.build_transformer("flux")), rel=1e-4)
    vae = configs.build_autoencoder("flux-vae")
    assert _params(vae.decoder) == pytest.approx(49.5e6, rel=0.01)


@pytest.mark.parametrize(
    ("model", "ae", "tokens"),
    [  # REFERENCE.md section 1, token table (1K, 2K, 4K)
        ("flux", None, (4096, 16384, 65536)),
        ("dcgen-flux-f32c32", None, (1024, 4096, 16384)),
        ("dcgen-flux-f64c128", None, (256, 1024, 4096)),
        ("sana-1.6b", None, (1024, 4096, 16384)),
        ("dcgen-sana", None, (256, 1024, 4096)),
    ],
)
def test_token_counts(model, ae, tokens):
    spec = configs.transformer_spec(model)
    assert tuple(spec.tokens(r, ae) for r in (1024, 2048, 4096)) == tokens


def test_bad_names_and_resolutions_raise_with_the_value():
    with pytest.raises(ValueError, match="unknown transformer 'flux2'"):
        configs.transformer_spec("flux2")
    with pytest.raises(ValueError, match="resolution=1000"):
        configs.transformer_spec("flux").tokens(1000)
    with pytest.raises(ValueError, match="unknown autoencoder"):
        configs.build_autoencoder("sd-vae")
