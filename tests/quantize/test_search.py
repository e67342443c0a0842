"""The per-group search: its objective, the token subset, and its monotonicity guarantees."""

import torch

import dcgen_quant.quantize.search as search_module
from dcgen_quant.quantize.fakequant import fake_quant_act, fake_quant_weight
from dcgen_quant.quantize.search import GroupProblem, search

from .helpers import outlier_inputs, structured_weight


def _problem(t=600, k=128, splits=(64, 96), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = structured_weight(sum(splits), k, g, strong=16)
    return GroupProblem(w, list(splits), outlier_inputs(t, k, g, 4, 30.0), "int4", torch.bfloat16)


def test_objective_is_the_runtime_error_and_bf16_changes_it_little(monkeypatch):
    p = _problem()
    lam = torch.ones(128)
    rq = p.quantize_residual(p.weight)
    assert torch.equal(rq[:64], fake_quant_weight(p.weight[:64], "int4", torch.bfloat16))
    # float32 reference: sum over members of ||E_i||^2 / ||Y_i||^2, E = Q(x) Q(W)^T - x W^T
    err = fake_quant_act(p.x, "int4", torch.bfloat16) @ rq.t() - p.y
    expected = sum(
        float(e.square().sum() / y.square().sum())
        for e, y in zip(err.split(p.splits, 1), p.y.split(p.splits, 1))
    )
    monkeypatch.setattr(search_module, "_bf16_is_fast", lambda device_type: False)
    exact = p.objective(lam, None, None, rq)
    assert abs(exact - expected) <= 1e-4 * expected
    monkeypatch.undo()
    fast = p.objective(lam, None, None, rq)
    # bf16 operands: far below the differences the search ranks (measured 1.1e-4 relative here)
    assert abs(fast - exact) <= 0.01 * exact


def test_subset_keeps_the_smoothing_statistics():
    p = _problem()
    sub = p.subset(100, torch.Generator().manual_seed(0))
    assert sub.x.shape == (100, 128) and sub.x_absmax is p.x_absmax
    assert p.subset(600, torch.Generator()) is p


def test_smoothing_and_refinement_never_make_it_worse():
    p = _problem()
    gen = torch.Generator().manual_seed(0)
    no_smooth = search(p, 0, False, 20, 0, "randomized", gen)
    with_smooth = search(p, 0, True, 20, 0, "randomized", gen)
    none_obj = p.objective(no_smooth.smooth, None, None, p.quantize_residual(no_smooth.residual))
    assert with_smooth.objective <= none_obj
    one_svd = search(p, 8, True, 4, 0, "randomized", torch.Generator().manual_seed(1))
    refined = search(p, 8, True, 4, 8, "randomized", torch.Generator().manual_seed(1))
    assert refined.objective <= one_svd.objective
    assert 1 <= refined.svd_count <= 9 and one_svd.svd_count == 1
    # ranking on a subset, refining on everything: the objective is the full problem's
    ranked = search(p, 8, True, 4, 2, "randomized", torch.Generator().manual_seed(1), p.subset(
        200, torch.Generator().manual_seed(2)))  # fmt: skip
    full = p.objective(
        ranked.smooth, ranked.proj_down, ranked.proj_up, p.quantize_residual(ranked.residual)
    )
    assert abs(ranked.objective - full) <= 1e-6 * full
