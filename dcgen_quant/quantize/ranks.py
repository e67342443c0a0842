"""Rank allocation: per-layer low-rank ranks chosen by held-out error per byte.

A uniform rank spends the same 16-bit branch on every layer, though some layers' errors fall
much more with rank than others'. With ``QuantConfig(rank_alloc=True)`` the W4A4 groups of each
transformer block share the bytes that rank ``config.rank`` would give them, and get ranks in
multiples of :data:`RANK_STEP` (Nunchaku's kernels need that; docs/INTEROP.md) between
``RANK_STEP`` and twice the configured rank:

1. per group, :func:`rank_errors` fixes the smoothing (the (alpha, beta) grid at the configured
   rank) and measures the held-out objective (sum over members of squared relative output
   errors) of the refined SVD branch at every candidate rank;
2. :func:`allocate` starts every group at the lowest rank and repeatedly raises the rank of the
   group whose next step lowers the objective most per byte of branch, while the block's bytes
   stay within the uniform rank's.

The branch of a group costs ``rank * (m K + N) * 2`` bytes in the checkpoint (each of its ``m``
members stores ``proj_down`` [K, r] and its ``proj_up`` [N_i, r] in 16 bits), so the checkpoint
is never larger than with the uniform rank. Split layers
(FLUX's single-block ``proj_out``) and W4A16 layers keep the uniform rank. The allocation is
per block because the quantizer streams the model block by block; it depends only on the
block's calibration tokens and the run's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..formats import UNSIGNED_ACT_SHIFT
from .config import QuantConfig
from .holdout import split_heldout
from .layer import LinearSpec, effective_rank, linear_spec, seed_for
from .lowrank import lowrank_factors, lowrank_weight
from .search import GroupProblem, search

RANK_STEP = 16


def candidate_ranks(rank: int, out_features: int, in_features: int) -> list[int]:
    """Multiples of :data:`RANK_STEP` from RANK_STEP to ``2 * rank``, at most min(N, K)."""
    top = min(2 * rank, out_features, in_features)
    return list(range(RANK_STEP, top + 1, RANK_STEP))


def branch_bytes(rank: int, out_features: int, in_features: int, members: int = 1) -> int:
    """Checkpoint bytes of a rank-``rank`` branch in 16 bits: every member's proj_down [K, r]
    and proj_up [N_i, r] (``out_features`` is the members' total N)."""
    return 2 * rank * (out_features + members * in_features)


def rank_errors(
    specs: Sequence[LinearSpec],
    x: torch.Tensor,
    config: QuantConfig,
    ranks: Sequence[int],
    act_unsigned: bool = False,
) -> dict[int, float]:
    """Held-out objective of a group at each rank in ``ranks`` (smoothing fixed, SVD branch).

    ``x`` [T, K] float32 is the group's calibration tokens; the split, the generator and the
    smoothing search are those :func:`~dcgen_quant.quantize.layer.quantize_group` would use.
    """
    x = x.detach().float()
    generator = torch.Generator(x.device).manual_seed(seed_for(config.seed, specs[0].name))
    weight = torch.cat([s.weight for s in specs], dim=0)
    splits = [s.out_features for s in specs]
    x_fit, x_heldout = split_heldout(x, config.holdout)
    problem = GroupProblem(
        weight, splits, x_fit, config.format, config.dtype, act_unsigned=act_unsigned
    )
    judge = problem if x_heldout is None else problem.on(x_heldout)
    rank = effective_rank(config.rank, weight.shape[0], weight.shape[1])
    ranking = judge.subset(config.search_tokens, generator)
    chosen = search(
        problem, rank, config.smooth, config.smooth_grid, 0, config.svd, generator, ranking, judge
    )
    lam = chosen.smooth
    w_hat = weight * lam
    errors = {}
    for r in ranks:
        pd, pu = lowrank_factors(w_hat, lam, r, config.dtype, config.svd, generator)
        residual_q = problem.quantize_residual(w_hat - lowrank_weight(pd, pu, lam))
        best = judge.objective(lam, pd, pu, residual_q)
        for _ in range(config.lowrank_iters):
            target = w_hat - residual_q
            pd, pu = lowrank_factors(target, lam, r, config.dtype, config.svd, generator)
            candidate_q = problem.quantize_residual(w_hat - lowrank_weight(pd, pu, lam))
            obj = judge.objective(lam, pd, pu, candidate_q)
            if obj >= best:
                break
            best, residual_q = obj, candidate_q
        errors[r] = best
    return errors


def allocate(errors: Sequence[dict[int, float]], costs: Sequence[int], budget: int) -> list[int]:
    """Ranks, one per group, minimizing the summed objective within ``budget`` bytes (greedy).

    Parameters
    ----------
    errors : per group, {rank: objective} over its candidate ranks
    costs : per group, bytes per unit of rank (``branch_bytes(1, N, K)``)
    budget : bytes the groups' branches may take together

    Every group starts at its lowest candidate rank; then the step (a group to its next
    candidate rank) with the largest objective decrease per byte is taken while it fits, until
    no step lowers the objective or fits.
    """
    ranks = [min(e) for e in errors]
    spent = sum(r * c for r, c in zip(ranks, costs))
    if spent > budget:
        raise ValueError(f"the lowest ranks take {spent} bytes, over the budget of {budget}")
    while True:
        best_gain, best_group = 0.0, None
        for i, (e, c) in enumerate(zip(errors, costs)):
            higher = [r for r in sorted(e) if r > ranks[i]]
            if not higher:
                continue
            step = higher[0]
            extra = (step - ranks[i]) * c
            gain = (e[ranks[i]] - e[step]) / extra
            if spent + extra <= budget and gain > best_gain:
                best_gain, best_group = gain, i
        if best_group is None:
            return ranks
        step = min(r for r in errors[best_group] if r > ranks[best_group])
        spent += (step - ranks[best_group]) * costs[best_group]
        ranks[best_group] = step


def group_rank_errors(
    model, group, x: torch.Tensor | None, config: QuantConfig
) -> tuple[str, dict[int, float], int, int] | None:
    """(first member's name, held-out objective per candidate rank, branch bytes per unit of
    rank, uniform rank) of one planned group (:class:`~dcgen_quant.models.base.PlannedGroup`)
    with calibration tokens ``x`` [T, K]; None for a group that keeps ``config.rank`` (split,
    weight-only, never called (``x`` None), or too small a layer to choose for)."""
    if config.rank % RANK_STEP:
        raise ValueError(
            f"rank allocation needs a rank that is a multiple of {RANK_STEP}, got {config.rank}"
        )
    if group.kind != "w4a4" or group.split_at is not None or x is None:
        return None
    specs = [linear_spec(model.get_submodule(n), n) for n in group.names]
    x = x.float()
    unsigned = group.act_unsigned and float(x.min()) >= -UNSIGNED_ACT_SHIFT
    n_total, k = sum(s.out_features for s in specs), specs[0].in_features
    ranks = candidate_ranks(config.rank, n_total, k)
    base = effective_rank(config.rank, n_total, k)
    if not ranks or base % RANK_STEP:
        return None
    with torch.no_grad():
        errors = rank_errors(specs, x, config, ranks, unsigned)
    return group.names[0], errors, branch_bytes(1, n_total, k, len(specs)), base


def allocate_block(items: Sequence[tuple[str, dict[int, float], int, int]]) -> dict[str, int]:
    """{first member's name: rank} for one block from its groups' :func:`group_rank_errors`
    (in plan order), within the bytes of their uniform ranks."""
    if not items:
        return {}
    names, errors, costs, uniform = zip(*items)
    budget = sum(r * c for r, c in zip(uniform, costs))
    return dict(zip(names, allocate(list(errors), list(costs), budget)))
