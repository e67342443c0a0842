"""Smoothing candidates and vectors; randomized vs full SVD; the low-rank factor layout."""

import pytest
import torch

from dcgen_quant.quantize.lowrank import (
    full_svd,
    lowrank_factors,
    lowrank_weight,
    randomized_svd,
)
from dcgen_quant.quantize.smoothing import alpha_beta_candidates, smooth_factor

from .helpers import structured_weight


def test_reference_grid_has_39_candidates_starting_with_no_smoothing():
    pairs = alpha_beta_candidates(20)
    assert len(pairs) == 39 and len(set(pairs)) == 39
    assert pairs[0] == (0.0, 0.0)
    assert all(0 <= a <= 1 and 0 <= b <= 1 for a, b in pairs)
    assert alpha_beta_candidates(20, smooth=False) == [(0.0, 0.0)]
    assert alpha_beta_candidates(1) == [(0.0, 0.0)]
    with pytest.raises(ValueError, match="grid must be >= 1, got 0"):
        alpha_beta_candidates(0)


def test_smooth_factor_values():
    g = torch.Generator().manual_seed(0)
    x_max = torch.rand(96, generator=g) * 10
    x_max[5] = 0.0  # a channel never active in calibration
    w_max = torch.rand(96, generator=g) + 0.1
    assert torch.equal(smooth_factor(x_max, w_max, 0.0, 0.0, torch.bfloat16), torch.ones(96))
    lam = smooth_factor(x_max, w_max, 0.5, 0.5, torch.bfloat16)
    assert bool(torch.isfinite(lam).all()) and bool((lam > 0).all())
    assert torch.equal(lam, lam.to(torch.bfloat16).float())  # representable in the layer dtype
    # proportional to max|X|^a / max|W|^b (up to the normalizing constant and bf16 rounding)
    ratio = lam / (x_max.clamp_min(1e-4).sqrt() / w_max.sqrt())
    keep = x_max > 0
    assert float(ratio[keep].max() / ratio[keep].min()) < 1.01


def test_randomized_svd_matches_full_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(1)
    a = structured_weight(300, 192, g)
    u, s, vh = randomized_svd(a, 16, torch.Generator().manual_seed(0))
    uf, sf, vhf = full_svd(a, 16)
    assert u.shape == (300, 16) and s.shape == (16,) and vh.shape == (16, 192)
    # measured: singular values within 1.0%, approximation error 1.0009x the optimal one
    torch.testing.assert_close(s, sf, rtol=0.02, atol=0)
    err_r = torch.linalg.matrix_norm(a - (u * s) @ vh)
    err_f = torch.linalg.matrix_norm(a - (uf * sf) @ vhf)
    assert float(err_r) <= 1.003 * float(err_f)
    # seeded: the same generator seed gives the same factors
    u2, s2, vh2 = randomized_svd(a, 16, torch.Generator().manual_seed(0))
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)


@pytest.mark.parametrize("method", ["randomized", "full"])
def test_proj_down_folds_the_smoothing(method):
    g = torch.Generator().manual_seed(2)
    w_hat = structured_weight(80, 64, g)
    lam = (torch.rand(64, generator=g) + 0.5).to(torch.bfloat16).float()
    pd, pu = lowrank_factors(w_hat, lam, 8, torch.bfloat16, method, torch.Generator())
    assert pd.shape == (64, 8) and pu.shape == (80, 8)
    assert torch.equal(pd, pd.to(torch.bfloat16).float())
    x = torch.randn(5, 64, generator=g)
    # the runtime computes (x @ proj_down) @ proj_up^T from the unsmoothed x; that is the
    # branch's weight (in smoothed space) applied to x / lambda
    branch = lowrank_weight(pd, pu, lam)
    torch.testing.assert_close((x @ pd) @ pu.t(), (x / lam) @ branch.t(), rtol=1e-4, atol=1e-4)
    # and it is the best rank-8 approximation of w_hat up to the factors' bf16 rounding
    # (measured 0.28% randomized, 0.26% full)
    uf, sf, vhf = full_svd(w_hat, 8)
    best = (uf * sf) @ vhf
    assert float((branch - best).norm() / best.norm()) < 0.005
