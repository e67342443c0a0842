"""The SVDQuant search for one fused group of linears that read the same input.

Given the concatenated weight ``W`` [N, K] of the group and calibration inputs ``X`` [T, K]:

1. for every (alpha, beta) candidate (smoothing.py): ``lambda``, ``W_hat = W diag(lambda)``,
   the rank-r branch from one SVD of ``W_hat``, the residual ``R = W_hat - L`` quantized per
   member, and the group's output error on a uniform subset of ``X``
   (``QuantConfig.search_tokens``; ``lambda`` itself always uses the statistics of all of X);
2. for the best candidate, iterative refinement of the branch:
   ``L <- SVD_r(W_hat - Q(W_hat - L))`` while the output error keeps falling (at most
   ``lowrank_iters`` steps); :func:`refine_output` continues with output-aware steps
   ``L <- argmin ||X (W_hat - Q(W_hat - L) - L)^T||`` (lowrank.py) while they lower it further.

Which tokens judge: the problem's own (the fitting tokens) give the smoothing statistics and the
activation Gram; a ``judge`` problem (the held-out tokens, holdout.py) ranks the candidates and
decides every refinement step. Without one, the problem judges itself (DeepCompressor's way).

The error simulated here is the runtime's: activations rounded to the layer dtype, divided by the
dtype-rounded ``lambda`` and quantized per token and group (for unsigned activations: shifted by
``UNSIGNED_ACT_SHIFT`` first, and the shift's contribution removed again, as the bias does);
factors rounded to the dtype (the residual is taken against the rounded factors, so it
compensates their rounding). The objective
of a group is ``sum_i ||E_i||^2 / ||Y_i||^2`` over its members, so that a member with small
outputs counts as much as a large one.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..formats import UNSIGNED_ACT_SHIFT
from .fakequant import fake_quant_act, fake_quant_weight
from .lowrank import lowrank_factors, lowrank_weight, output_factors
from .smoothing import alpha_beta_candidates, channel_absmax, smooth_factor


@functools.cache
def _bf16_is_fast(device_type: str) -> bool:
    if device_type == "cuda":
        return True
    if device_type == "cpu":
        # native bf16 dot products only: torch.ops.mkldnn._is_mkldnn_bf16_supported() is also
        # true on AVX-512 CPUs without them, where oneDNN emulates bf16 and the product is 3.5x
        # slower than float32 (measured on this project's CI-class Xeon: 15.5 vs 4.5 ms for
        # 1024 x 256 x 768), which made the default quantize run 3x slower
        return _cpu_has_native_bf16()
    return False


def _cpu_has_native_bf16() -> bool:
    """Whether the CPU advertises AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo; False
    elsewhere, which keeps float32: always correct, at worst slower)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def search_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` for the search objective: [T, K] x [N, K] -> [T, N] float32 (a new tensor).

    In bf16 (float32 accumulation) where that is fast (CUDA, CPUs with AVX512-BF16 / AMX): 2-5x
    quicker than float32 here. Its rounding (~0.2% of the output, independent per element) is
    two orders of magnitude below the 4-bit error being ranked, so it changes the objective by
    ~0.01%; the errors in the report are computed exactly, through the runtime modules.
    """
    if _bf16_is_fast(a.device.type):
        return (a.to(torch.bfloat16) @ b.to(torch.bfloat16).t()).float()
    return a @ b.t()


@dataclass
class SearchResult:
    """The chosen decomposition of a group's weight (all float32, dtype-representable)."""

    alpha: float
    beta: float
    smooth: torch.Tensor  # [K]
    proj_down: torch.Tensor | None  # [K, r], None for rank 0
    proj_up: torch.Tensor | None  # [N, r] (all members stacked)
    residual: torch.Tensor  # [N, K], smoothed space, what gets quantized
    objective: float  # on the judging tokens
    svd_count: int
    lowrank: str = "svd"  # "output" once an output-aware step was kept


class GroupProblem:
    """A group's weight, calibration inputs and the simulated output error.

    Parameters
    ----------
    weight : Tensor [N, K], float32; the members' weights stacked along N
    splits : list[int]; N of each member (sums to N)
    x : Tensor [T, K], float32; calibration inputs
    fmt, dtype : the 4-bit format and the layer's 16-bit dtype
    act_unsigned : INT4 activations quantized as unsigned codes of ``x + UNSIGNED_ACT_SHIFT``;
        the smoothing statistics are then those of the shifted input, which is what gets
        quantized
    """

    def __init__(
        self, weight, splits, x, fmt: str, dtype: torch.dtype, x_absmax=None,
        act_unsigned: bool = False,
    ):  # fmt: skip
        self.weight = weight
        self.splits = list(splits)
        self.fmt, self.dtype = fmt, dtype
        self.act_unsigned = act_unsigned
        self.shift = UNSIGNED_ACT_SHIFT if act_unsigned else 0.0
        self.x = x.to(dtype).float()  # what the runtime sees after its cast to the layer dtype
        self.y = x @ weight.t()  # reference output (no bias: the bias is added exactly)
        self.y_norm2 = [
            max(float(y.square().sum()), 1e-30) for y in self.y.split(self.splits, dim=1)
        ]
        if x_absmax is None:
            x_absmax = channel_absmax(self.x + self.shift if act_unsigned else self.x)
        self.x_absmax = x_absmax
        self.w_absmax = weight.abs().amax(dim=0)
        self._x_source = x

    def on(self, x: torch.Tensor) -> GroupProblem:
        """The same weight and smoothing statistics, judged on other tokens ``x`` [T', K]."""
        return GroupProblem(
            self.weight, self.splits, x, self.fmt, self.dtype, self.x_absmax, self.act_unsigned
        )

    def subset(self, n: int, generator: torch.Generator) -> GroupProblem:
        """The same problem on ``n`` uniformly chosen tokens (itself if it has no more).

        The smoothing statistics stay those of all tokens, so every candidate's ``lambda`` is
        the one the full problem would use.
        """
        t = self.x.shape[0]
        if t <= n:
            return self
        keep = torch.randperm(t, generator=generator, device=generator.device)[:n]
        keep = keep.sort().values.to(self.x.device)
        return GroupProblem(
            self.weight, self.splits, self._x_source[keep], self.fmt, self.dtype, self.x_absmax,
            self.act_unsigned,
        )  # fmt: skip

    def quantize_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """The group's residual [N, K] 4-bit fake-quantized: [N, K].

        Scales are per row and group, and NVFP4 members share one tensor scale (that of the
        whole residual, as the final quantization does), so quantizing the stacked residual
        equals quantizing each member's rows with the shared scale.
        """
        return fake_quant_weight(residual, self.fmt, self.dtype)

    def objective(self, smooth, proj_down, proj_up, residual_q) -> float:
        """``sum_i ||E_i||^2 / ||Y_i||^2`` of the simulated runtime output."""
        if self.act_unsigned:
            # Q((x + c) / lambda) - c / lambda: the bias compensation removes c's contribution
            a = fake_quant_act((self.x + self.shift) / smooth, self.fmt, self.dtype, True)
            a -= self.shift / smooth
        else:
            a = fake_quant_act(self.x / smooth, self.fmt, self.dtype)
        b = residual_q
        if proj_down is not None:
            # one matmul for both paths: [Q(x/lambda), x @ proj_down] @ [Q(R), proj_up]^T
            a = torch.cat([a, self.x @ proj_down], dim=1)
            b = torch.cat([b, proj_up], dim=1)
        err = search_matmul(a, b).sub_(self.y)
        if len(self.splits) == 1:
            return float(torch.linalg.vector_norm(err)) ** 2 / self.y_norm2[0]
        col2 = err.square_().sum(dim=0)  # [N]; row-major friendly, unlike strided column views
        return sum(float(c.sum()) / n2 for c, n2 in zip(col2.split(self.splits), self.y_norm2))


def search(
    problem: GroupProblem,
    rank: int,
    smooth: bool,
    grid: int,
    lowrank_iters: int,
    svd: str,
    generator: torch.Generator,
    ranking: GroupProblem | None = None,
    judge: GroupProblem | None = None,
) -> SearchResult:
    """Grid search over (alpha, beta) with the rank-``rank`` branch in place, then refinement.

    ``rank=0`` searches smoothing alone; ``smooth=False`` tries only (0, 0). ``problem`` gives
    the weight and the smoothing statistics; ``judge`` (default ``problem``) decides the
    refinement steps and the result's ``objective``; the candidates are ranked on ``ranking``
    (default ``judge``; a token subset of it). The generator drives the randomized SVD (one
    seeded sketch per SVD, drawn in a fixed order: reproducible).
    """
    w = problem.weight
    judge = judge or problem
    ranking = ranking or judge
    best: SearchResult | None = None
    candidates = alpha_beta_candidates(grid, smooth)
    for alpha, beta in candidates:
        lam = smooth_factor(problem.x_absmax, problem.w_absmax, alpha, beta, problem.dtype)
        w_hat = w * lam
        pd = pu = None
        residual = w_hat
        if rank > 0:
            pd, pu = lowrank_factors(w_hat, lam, rank, problem.dtype, svd, generator)
            residual = w_hat - lowrank_weight(pd, pu, lam)
        if len(candidates) == 1 and rank == 0:
            obj = float("nan")  # nothing to rank, and no refinement follows
        else:
            obj = ranking.objective(lam, pd, pu, problem.quantize_residual(residual))
        if best is None or obj < best.objective:
            best = SearchResult(alpha, beta, lam, pd, pu, residual, obj, 1 if rank else 0)
    assert best is not None
    if rank == 0:
        return best

    # Iterative refinement: the branch should capture what the 4-bit residual cannot.
    lam = best.smooth
    w_hat = w * lam
    residual_q = problem.quantize_residual(best.residual)
    if ranking is not judge:
        best.objective = judge.objective(lam, best.proj_down, best.proj_up, residual_q)
    for _ in range(lowrank_iters):
        pd, pu = lowrank_factors(w_hat - residual_q, lam, rank, problem.dtype, svd, generator)
        residual = w_hat - lowrank_weight(pd, pu, lam)
        candidate_q = problem.quantize_residual(residual)
        obj = judge.objective(lam, pd, pu, candidate_q)
        best.svd_count += 1
        if obj >= best.objective:
            break
        best.proj_down, best.proj_up, best.residual, best.objective = pd, pu, residual, obj
        residual_q = candidate_q
    return best


def refine_output(
    problem: GroupProblem,
    result: SearchResult,
    whitener: torch.Tensor,
    iters: int,
    svd: str,
    generator: torch.Generator,
    judge: GroupProblem | None = None,
) -> SearchResult:
    """Continue ``result`` (rank > 0, ``objective`` on ``judge``) with output-aware steps.

    Each step fits the branch to what the current 4-bit residual leaves of the smoothed weight,
    in the layer's output norm on the fitting tokens (``whitener``:
    :func:`~dcgen_quant.quantize.lowrank.activation_whitener` of ``problem.x``):
    ``L <- argmin ||X (W_hat - Q(R) - L)^T||``, ``R = W_hat - L``; a step is kept while it
    lowers ``judge``'s objective (default ``problem``'s), at most ``iters`` steps. Returns a new
    result (``lowrank="output"`` if a step was kept; ``result`` itself is not changed).
    """
    judge = judge or problem
    best = dataclasses.replace(result)
    lam = best.smooth
    rank = best.proj_down.shape[1]
    w_hat = problem.weight * lam
    residual_q = problem.quantize_residual(best.residual)
    for _ in range(iters):
        target = (w_hat - residual_q) / lam  # acts on the unsmoothed x, as proj_down does
        pd, pu = output_factors(target, whitener, rank, problem.dtype, svd, generator)
        residual = w_hat - lowrank_weight(pd, pu, lam)
        candidate_q = problem.quantize_residual(residual)
        obj = judge.objective(lam, pd, pu, candidate_q)
        best.svd_count += 1
        if obj >= best.objective:
            break
        best.proj_down, best.proj_up, best.residual, best.objective = pd, pu, residual, obj
        best.lowrank = "output"
        residual_q = candidate_q
    return best
