"""Quantize linears (and 1x1 convs) into the runtime modules of dcgen_quant/nn.py.

* :func:`quantize_linear`: one ``nn.Linear`` / 1x1 ``nn.Conv2d`` and its calibration inputs ->
  ``SVDQLinear`` / ``SVDQConv1x1`` (or the W4A16 classes with ``weight_only=True``);
* :func:`quantize_linears`: linears that read the same input (q/k/v, ...) as one fused group:
  one smoothing vector, one ``proj_down``, and per member its slice of ``proj_up`` and its own
  4-bit residual.

Both fill a :class:`~dcgen_quant.quantize.report.LayerReport` per layer (relative output error of
naive W4A4, smoothing only and full SVDQuant on the fitting tokens, SVDQuant's on the held-out
tokens, chosen alpha/beta and low-rank method, seconds).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import (
    UNSIGNED_ACT_SHIFT,
    QuantizedWeight,
    check_unsigned,
    dequantize_weight,
    get_format,
    quantize_weight,
)
from ..formats.int4 import pack_int4, unpack_int4
from ..formats.nvfp4 import nvfp4_tensor_scale
from ..nn import SVDQConv1x1, SVDQLinear, SVDQSplitLinear, W4A16Conv1x1, W4A16Linear
from .clip import clip_factors, quantize_clipped
from .config import QuantConfig
from .gptq import fitted_hessian, gptq_quantize, inverse_factor
from .holdout import split_heldout
from .lowrank import activation_whitener
from .report import LayerReport, QuantReport
from .search import GroupProblem, SearchResult, refine_output, search

QUANTIZED_TYPES = (SVDQLinear, W4A16Linear)


@dataclass
class LinearSpec:
    """A linear map ``y = x W^T + b`` taken from an ``nn.Linear`` or a 1x1 ``nn.Conv2d``."""

    name: str
    module: nn.Module
    weight: torch.Tensor  # [N, K] float32
    bias: torch.Tensor | None  # [N] float32
    conv: bool

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def unsupported_reason(module: nn.Module) -> str | None:
    """None if ``module`` is a linear map this quantizer handles, else why not."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.kernel_size != (1, 1):
            return f"{module.kernel_size[0]}x{module.kernel_size[1]} convolution (not 1x1)"
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.stride != (1, 1) or module.padding not in ((0, 0), "valid"):
            return "1x1 convolution with stride or padding"
        return None
    return f"{type(module).__name__} is not a linear layer"


def linear_spec(module: nn.Module, name: str) -> LinearSpec:
    """Read ``module``'s weight as [N, K] float32; raises ValueError if unsupported."""
    if reason := unsupported_reason(module):
        raise ValueError(f"layer {name}: cannot quantize: {reason}")
    weight = module.weight.detach()
    conv = isinstance(module, nn.Conv2d)
    if conv:
        weight = weight.reshape(weight.shape[0], weight.shape[1])
    bias = module.bias.detach().float() if module.bias is not None else None
    return LinearSpec(name, module, weight.float(), bias, conv)


def check_group_size(spec: LinearSpec, fmt: str) -> str | None:
    """None if K fits the format's groups, else the reason (used to skip or to raise)."""
    group = get_format(fmt).group_size
    if spec.in_features % group:
        return f"in_features={spec.in_features} is not a multiple of the {fmt} group size {group}"
    return None


def check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{what}: found {bad} NaN/Inf value(s); quantization needs finite input")


def tokens_of(x: torch.Tensor, in_features: int, conv: bool, name: str) -> torch.Tensor:
    """Calibration inputs as tokens: [..., K] (or NCHW [B, K, H, W] for a conv) -> [T, K]."""
    if conv and x.dim() == 4 and x.shape[1] == in_features:
        x = x.permute(0, 2, 3, 1)
    if x.shape[-1] != in_features:
        raise ValueError(
            f"layer {name}: calibration inputs have shape {tuple(x.shape)}, expected [..., "
            f"{in_features}]" + (f" or [B, {in_features}, H, W]" if conv else "")
        )
    return x.detach().reshape(-1, in_features)


def subsample(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniformly choose ``n`` of the rows of ``x`` [T, K] (all of them if T <= n)."""
    if x.shape[0] <= n:
        return x
    keep = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:n]
    keep = keep.sort().values.to(x.device)
    return x[keep]


def seed_for(seed: int, name: str) -> int:
    """A per-layer seed that depends only on the run's seed and the layer's name (resumable)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


# --------------------------------------------------------------------------------------------
# building modules


def make_module(
    kind: str,
    conv: bool,
    in_features: int,
    out_features: int,
    rank: int,
    bias: bool,
    fmt: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    act_unsigned: bool = False,
) -> nn.Module:
    """An empty runtime module of the class for (kind, conv) (checkpoint loading, resume)."""
    kw = {"fmt": fmt, "bias": bias, "dtype": dtype, "device": device}
    if kind == "w4a4":
        cls = SVDQConv1x1 if conv else SVDQLinear
        return cls(in_features, out_features, rank=rank, act_unsigned=act_unsigned, **kw)
    if kind == "w4a16":
        cls = W4A16Conv1x1 if conv else W4A16Linear
        return cls(in_features, out_features, **kw)
    raise ValueError(f"kind must be 'w4a4' or 'w4a16', got {kind!r}")


def effective_rank(rank: int, out_features: int, in_features: int) -> int:
    """The low-rank branch's rank for a (group of) layer(s): at most min(N, K)."""
    return min(rank, out_features, in_features)


def make_split_module(
    in_features: int,
    out_features: int,
    split_at: int,
    rank: int,
    bias: bool,
    fmt: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> SVDQSplitLinear:
    """An empty :class:`SVDQSplitLinear` as :func:`quantize_split` builds it (resume): part 0
    reads columns [0, split_at) with signed codes and the layer's bias, part 1 the rest with
    unsigned codes and the bias that cancels their shift; ``rank`` is the configured rank."""
    layout = ((split_at, bias, False), (in_features - split_at, True, True))
    return SVDQSplitLinear([
        SVDQLinear(k, out_features, effective_rank(rank, out_features, k), fmt, has_bias, dtype,
                   device, unsigned)
        for k, has_bias, unsigned in layout
    ])  # fmt: skip


def _fill_weight(module, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
    module.qweight.copy_(qw.qweight)
    module.wscales.copy_(qw.wscales)
    if qw.wtscale is not None:
        module.wtscale.copy_(qw.wtscale)
    if bias is not None:
        module.bias.copy_(bias)


def unsigned_bias(qw: QuantizedWeight, smooth: torch.Tensor, bias: torch.Tensor | None):
    """The bias of an ``act_unsigned`` layer: ``b - UNSIGNED_ACT_SHIFT * sum_k R_q[n, k] /
    smooth[k]`` [N] float32, which cancels the shift that quantize_act adds to x (``R_q``: the
    stored 4-bit residual, dequantized exactly; ``smooth`` [K]: the stored smoothing factors)."""
    r = dequantize_weight(qw).double() / smooth.double()
    shift_out = UNSIGNED_ACT_SHIFT * r.sum(dim=1)
    return ((bias.double() if bias is not None else 0.0) - shift_out).float()


def _build_w4a4(spec, qw, smooth, proj_down, proj_up, config, act_unsigned=False) -> nn.Module:
    rank = 0 if proj_down is None else proj_down.shape[1]
    module = make_module(
        "w4a4", spec.conv, spec.in_features, spec.out_features, rank,
        spec.bias is not None or act_unsigned, config.format, config.dtype, spec.weight.device,
        act_unsigned,
    )  # fmt: skip
    module.smooth_factor.copy_(smooth)
    bias = unsigned_bias(qw, module.smooth_factor, spec.bias) if act_unsigned else spec.bias
    _fill_weight(module, qw, bias)
    if rank:
        module.proj_down.copy_(proj_down)
        module.proj_up.copy_(proj_up)
    return module


def _linear_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's forward on tokens [T, K], also for the conv classes (same buffers)."""
    if isinstance(module, SVDQSplitLinear):
        return module(x)
    base = SVDQLinear if isinstance(module, SVDQLinear) else W4A16Linear
    return base.forward(module, x)


def relative_error(module: nn.Module, spec: LinearSpec, x: torch.Tensor) -> float:
    """``||module(x) - (x W^T + b)|| / ||x W^T + b||`` on tokens x [T, K] (float32 reference)."""
    with torch.no_grad():
        y = x @ spec.weight.t()
        if spec.bias is not None:
            y = y + spec.bias
        yq = _linear_forward(module, x).float()
    denom = float(y.norm())
    num = float((yq - y).norm())
    return num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))


# --------------------------------------------------------------------------------------------
# the group quantizer


def _quantize_residuals(problem, judge, result: SearchResult, splits, config, alternatives: bool):
    """Per-member QuantizedWeight of the residual by round-to-nearest, and the alternatives to
    try against it: ``{"clip": clipped scales (config.clip), "gptq": GPTQ codes (config.gptq,
    with the clipped scales when config.clip)}``, each a list over members (empty when
    ``alternatives`` is False or nothing could judge them).

    NVFP4 members of a group share one tensor scale (that of the whole residual), so that the
    group can run as one concatenated GEMM (:mod:`dcgen_quant.fusion`).
    """
    parts = result.residual.split(splits, dim=0)
    shared = None
    if len(parts) > 1 and get_format(config.format).has_tensor_scale:
        shared = nvfp4_tensor_scale(result.residual)
    rtn = [quantize_weight(p, config.format, config.dtype, shared) for p in parts]
    # an alternative is kept only where tokens it was not fitted on confirm it (with holdout=0,
    # the user asked for in-sample judging); with too few tokens to hold any out, none is tried
    if not alternatives or (judge is problem and config.holdout > 0):
        return rtn, {}
    found: dict[str, list[QuantizedWeight]] = {}
    rounding = rtn
    xs = problem.x / result.smooth  # the smoothed fitting tokens [T, K]
    if config.clip:
        d = xs.square().mean(dim=0)  # [K] what the output feels of each channel
        rounding = [
            quantize_clipped(p, clip_factors(p, d, config.format, config.dtype, shared),
                             config.format, config.dtype, shared)
            for p in parts
        ]  # fmt: skip
        found["clip"] = rounding
    if config.gptq:
        # one factor for every member; the Hessian is handed over as a call's result (no name
        # holds it), so inverse_factor frees it before its last two float64 [K, K] steps
        hinv = inverse_factor(fitted_hessian(xs, config.gptq_shrink)[0], config.gptq_damp)
        args = (config.format, config.dtype, config.gptq_damp, config.gptq_block, shared)
        found["gptq"] = [
            gptq_quantize(p, None, *args, hinv=hinv, scales=r) for p, r in zip(parts, rounding)
        ]
    return rtn, found


def _w4a4_modules(problem, judge, result, specs, splits, config, alternatives, x_judge=None):
    """Runtime modules of a group and, per member, which residual it kept: None (round to
    nearest), "clip" or "gptq" (:func:`_quantize_residuals`).

    GPTQ minimizes the error against unquantized activations on the fitting tokens; with 4-bit
    activations, or fewer tokens than inputs, it can lose to round-to-nearest, and so can
    clipped scales. So each member keeps an alternative only where its runtime module has the
    lower relative output error on ``x_judge`` (the held-out tokens; default ``judge.x``), the
    very error the report gives: a member's error depends only on its own rows of the residual,
    so the members of a fused group (q/k/v) are decided one by one and no alternative ever
    raises a member's held-out error.
    """
    rtn, found = _quantize_residuals(problem, judge, result, splits, config, alternatives)
    ups = result.proj_up.split(splits, dim=0) if result.proj_up is not None else [None] * len(rtn)

    def build(spec, qw, up):
        return _build_w4a4(
            spec, qw, result.smooth, result.proj_down, up, config, problem.act_unsigned
        )

    modules = [build(spec, qw, up) for spec, qw, up in zip(specs, rtn, ups)]
    kept: list[str | None] = [None] * len(specs)
    if found:
        x_judge = judge.x if x_judge is None else x_judge
        for i, (spec, up) in enumerate(zip(specs, ups)):
            best = relative_error(modules[i], spec, x_judge)
            for label, weights in found.items():
                candidate = build(spec, weights[i], up)
                err = relative_error(candidate, spec, x_judge)
                if err < best:
                    modules[i], kept[i], best = candidate, label, err
    return modules, kept


def _baseline_errors(problem, judge, specs, x, config, generator, ranking):
    """Per member: relative error on tokens ``x`` of naive W4A4 (round to nearest, rank 0, no
    smoothing) and of smoothing only (rank 0, the (alpha, beta) search), in ``problem``'s
    activation codes."""
    splits = problem.splits
    base = search(problem, 0, False, 1, 0, config.svd, generator)
    naive_modules, _ = _w4a4_modules(problem, judge, base, specs, splits, config, False)
    naive = [relative_error(m, s, x) for m, s in zip(naive_modules, specs)]
    sm = search(
        problem, 0, config.smooth, config.smooth_grid, 0, config.svd, generator, ranking, judge
    )
    sm_modules, _ = _w4a4_modules(problem, judge, sm, specs, splits, config, False)
    smooth_only = [relative_error(m, s, x) for m, s in zip(sm_modules, specs)]
    return naive, smooth_only


def _heldout_error(module, spec, x_heldout):
    return None if x_heldout is None else relative_error(module, spec, x_heldout)


def quantize_group(
    specs: Sequence[LinearSpec],
    x: torch.Tensor,
    config: QuantConfig,
    *,
    baselines: bool = True,
    generator: torch.Generator | None = None,
    act_unsigned: bool = False,
) -> list[tuple[nn.Module, LayerReport]]:
    """SVDQuant of linears sharing the input ``x`` [T, K] (float32 tokens, already subsampled).

    The last ``config.holdout`` of the tokens are held out (holdout.py): the rest fit, these
    judge the search, the low-rank method and GPTQ. Returns one (runtime module, report) per
    member, in order; the report has the error on the fitting tokens (``err_svdq``) and on the
    held-out ones (``err_heldout``). ``baselines=False`` skips the naive and smoothing-only
    reference errors (their fields stay None). ``act_unsigned`` (INT4): the layers quantize
    ``x + UNSIGNED_ACT_SHIFT`` to unsigned codes (for inputs that are GELU outputs, >= -0.17) and
    their bias cancels the shift; the baselines use the same activation codes. ValueError if a
    calibration input lies below ``-UNSIGNED_ACT_SHIFT``.
    """
    start = time.perf_counter()
    k = specs[0].in_features
    label = (
        f"layer {specs[0].name}" if len(specs) == 1 else "group " + "+".join(s.name for s in specs)
    )
    for spec in specs:
        if spec.in_features != k:
            raise ValueError(f"{label}: members have different in_features")
        if reason := check_group_size(spec, config.format):
            raise ValueError(f"layer {spec.name}: {reason}")
        check_finite(spec.weight, f"layer {spec.name}: weight")
        if spec.bias is not None:
            check_finite(spec.bias, f"layer {spec.name}: bias")
    x = x.detach().float()
    check_finite(x, f"{label}: calibration inputs")
    check_unsigned(config.format, act_unsigned)
    if act_unsigned and (low := float(x.min())) < -UNSIGNED_ACT_SHIFT:
        raise ValueError(
            f"{label}: act_unsigned needs inputs >= -{UNSIGNED_ACT_SHIFT} (a GELU output), but "
            f"the calibration inputs go down to {low:.4g}; they would be clipped"
        )
    if generator is None:
        generator = torch.Generator(x.device).manual_seed(seed_for(config.seed, specs[0].name))
    splits = [s.out_features for s in specs]
    weight = torch.cat([s.weight for s in specs], dim=0)
    x_fit, x_heldout = split_heldout(x, config.holdout)
    problem = GroupProblem(
        weight, splits, x_fit, config.format, config.dtype, act_unsigned=act_unsigned
    )
    judge = problem if x_heldout is None else problem.on(x_heldout)
    rank = effective_rank(config.rank, weight.shape[0], k)
    ranking = judge.subset(config.search_tokens, generator)
    svd_iters = 0 if config.lowrank == "output" else config.lowrank_iters
    result = search(
        problem, rank, config.smooth, config.smooth_grid, svd_iters, config.svd, generator,
        ranking, judge,
    )  # fmt: skip
    if rank > 0 and config.lowrank != "svd":
        whitener = activation_whitener(problem.x, config.lowrank_shrink)
        result = refine_output(
            problem, result, whitener, config.lowrank_iters, config.svd, generator, judge
        )
        del whitener  # [K, K]: freed before GPTQ builds its own [K, K] matrices
    x_judge = x_fit if x_heldout is None else x_heldout
    modules, kept = _w4a4_modules(problem, judge, result, specs, splits, config, True, x_judge)

    naive = smooth_only = [None] * len(specs)
    if baselines:
        naive, smooth_only = _baseline_errors(
            problem, judge, specs, x_fit, config, generator, ranking
        )
    seconds = (time.perf_counter() - start) / len(specs)
    group = [s.name for s in specs] if len(specs) > 1 else None
    out = []
    for spec, module, e_naive, e_smooth, choice in zip(specs, modules, naive, smooth_only, kept):
        report = LayerReport(
            name=spec.name, kind="w4a4", module=type(module).__name__,
            out_features=spec.out_features, in_features=k, bias=module.bias is not None,
            rank=rank, group=group, act_unsigned=act_unsigned, alpha=result.alpha, beta=result.beta,
            lowrank_iters=result.svd_count, lowrank=result.lowrank if rank else None,
            gptq=choice == "gptq", clip=choice == "clip" or (choice == "gptq" and config.clip),
            err_rtn=e_naive, err_smooth=e_smooth,
            err_svdq=relative_error(module, spec, x_fit),
            err_heldout=_heldout_error(module, spec, x_heldout), calib_tokens=x.shape[0],
            heldout_tokens=0 if x_heldout is None else x_heldout.shape[0], seconds=seconds,
        )  # fmt: skip
        out.append((module, report))
    return out


def quantize_split(
    spec: LinearSpec,
    x: torch.Tensor,
    config: QuantConfig,
    split_at: int,
    *,
    baselines: bool = True,
) -> tuple[SVDQSplitLinear, LayerReport]:
    """SVDQuant of a linear whose input columns ``[split_at, K)`` are a GELU output.

    The layer becomes an :class:`SVDQSplitLinear` of two parts, each searched on its own
    columns of ``x`` [T, K]: part 0 (columns before ``split_at``, signed codes, the layer's
    bias) and part 1 (the GELU columns, unsigned codes, see :func:`quantize_group`). The report
    is the whole layer's: ``err_svdq`` of the sum, ``err_rtn`` / ``err_smooth`` of the unsplit
    layer with signed codes (what plain W4A4 would give).
    """
    start = time.perf_counter()
    k, n = spec.in_features, spec.out_features
    group = get_format(config.format).group_size
    if spec.conv:
        raise ValueError(f"layer {spec.name}: only linears (not 1x1 convs) can be split")
    if not 0 < split_at < k or split_at % group:
        raise ValueError(
            f"layer {spec.name}: split_at={split_at} must lie inside (0, K={k}) and be a "
            f"multiple of the {config.format} group size {group}"
        )
    x = x.detach().float()
    check_finite(x, f"layer {spec.name}: calibration inputs")
    generator = torch.Generator(x.device).manual_seed(seed_for(config.seed, spec.name))
    head = LinearSpec(f"{spec.name}.parts.0", spec.module, spec.weight[:, :split_at], spec.bias,
                      False)  # fmt: skip
    tail = LinearSpec(f"{spec.name}.parts.1", spec.module, spec.weight[:, split_at:], None, False)
    ((m0, r0),) = quantize_group(
        [head], x[:, :split_at], config, baselines=False, generator=generator
    )
    ((m1, r1),) = quantize_group(
        [tail], x[:, split_at:], config, baselines=False, generator=generator, act_unsigned=True
    )
    module = SVDQSplitLinear([m0, m1])
    x_fit, x_heldout = split_heldout(x, config.holdout)  # the rows each part was split by
    naive = smooth_only = None
    if baselines:
        problem = GroupProblem(spec.weight, [n], x_fit, config.format, config.dtype)
        judge = problem if x_heldout is None else problem.on(x_heldout)
        ranking = judge.subset(config.search_tokens, generator)
        (naive,), (smooth_only,) = _baseline_errors(
            problem, judge, [spec], x_fit, config, generator, ranking
        )
    lowrank = None
    if r0.lowrank or r1.lowrank:
        lowrank = "output" if "output" in (r0.lowrank, r1.lowrank) else "svd"
    report = LayerReport(
        name=spec.name, kind="w4a4", module=type(module).__name__, out_features=n,
        in_features=k, bias=spec.bias is not None, rank=max(r0.rank, r1.rank),
        split_at=split_at, lowrank_iters=r0.lowrank_iters + r1.lowrank_iters, lowrank=lowrank,
        gptq=r0.gptq or r1.gptq, clip=r0.clip or r1.clip, err_rtn=naive, err_smooth=smooth_only,
        err_svdq=relative_error(module, spec, x_fit),
        err_heldout=_heldout_error(module, spec, x_heldout), calib_tokens=x.shape[0],
        heldout_tokens=r0.heldout_tokens, seconds=time.perf_counter() - start,
    )  # fmt: skip
    return module, report


def quantize_weight_only(
    spec: LinearSpec, x: torch.Tensor, config: QuantConfig
) -> tuple[nn.Module, LayerReport]:
    """4-bit weight, 16-bit activations (``W4A16Linear`` / ``W4A16Conv1x1``) for ``spec``.

    ``x`` [T, K] float32 serves the error report and, with ``config.gptq``, the Hessian (of the
    fitting tokens; GPTQ is kept where it lowers the error on the held-out ones, holdout.py).
    The format is ``config.weight_only_format`` (INT4 with ``nunchaku_compatible``, whose codes
    are then kept in -7..7: round to nearest gives that by itself, GPTQ codes -8 become -7).
    """
    start = time.perf_counter()
    fmt = config.weight_only_format
    if reason := check_group_size(spec, fmt):
        raise ValueError(f"layer {spec.name}: {reason}")
    check_finite(spec.weight, f"layer {spec.name}: weight")
    x = x.detach().float()
    check_finite(x, f"layer {spec.name}: calibration inputs")
    bias = spec.bias is not None
    bias_value = spec.bias
    if config.nunchaku_compatible and bias:
        bias_value = _nunchaku_exact_bias(spec.name, spec.bias, config.dtype)

    def build(qw):
        if config.nunchaku_compatible:
            qw = _without_code_minus_8(qw)
        module = make_module(
            "w4a16", spec.conv, spec.in_features, spec.out_features, 0, bias, fmt,
            config.dtype, spec.weight.device,
        )  # fmt: skip
        _fill_weight(module, qw, bias_value)
        return module

    x_fit, x_heldout = split_heldout(x, config.holdout)
    x_judge = x_fit if x_heldout is None else x_heldout
    rtn = build(quantize_weight(spec.weight, fmt, config.dtype))
    module, used_gptq = rtn, False
    if config.gptq and (x_heldout is not None or config.holdout == 0):  # as _quantize_residuals
        hinv = inverse_factor(  # the Hessian handed over, as in _quantize_residuals
            fitted_hessian(x_fit.to(config.dtype).float(), config.gptq_shrink)[0], config.gptq_damp
        )
        qw = gptq_quantize(spec.weight, None, fmt, config.dtype, config.gptq_damp,
                           config.gptq_block, hinv=hinv)  # fmt: skip
        del hinv
        cand = build(qw)
        if relative_error(cand, spec, x_judge) < relative_error(rtn, spec, x_judge):
            module, used_gptq = cand, True
    report = LayerReport(
        name=spec.name, kind="w4a16", module=type(module).__name__,
        out_features=spec.out_features, in_features=spec.in_features, bias=bias, gptq=used_gptq,
        err_rtn=relative_error(rtn, spec, x_fit), err_svdq=relative_error(module, spec, x_fit),
        err_heldout=_heldout_error(module, spec, x_heldout), calib_tokens=x.shape[0],
        heldout_tokens=0 if x_heldout is None else x_heldout.shape[0],
        seconds=time.perf_counter() - start,
    )  # fmt: skip
    return module, report


def _nunchaku_exact_bias(name: str, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias [N] of FLUX adaLN linear ``name`` in ``dtype``, rounded so that Nunchaku's
    stored ``b + 1`` (its scale chunks carry the +1 of ``x * (1 + scale)``) is exact in 16
    bits; other layers' bias unchanged. A change of at most half a 16-bit step of ``b + 1``,
    which Nunchaku's format makes anyway, made here so the export changes no value."""
    from ..interop.nunchaku.flux import adanorm_chunks
    from ..interop.nunchaku.packing import exact_adanorm_bias

    chunks = adanorm_chunks(name)
    if chunks is None:
        return bias
    return exact_adanorm_bias(bias.to(dtype), chunks)


def _without_code_minus_8(qw: QuantizedWeight) -> QuantizedWeight:
    """INT4 codes -8 -> -7 (Nunchaku's AWQ layers add a zero point of 7: codes -7..8)."""
    codes = unpack_int4(qw.qweight)
    if bool((codes == -8).any()):
        return QuantizedWeight(pack_int4(codes.clamp(min=-7)), qw.wscales, qw.wtscale, qw.fmt)
    return qw


# --------------------------------------------------------------------------------------------
# public entry points


def _prepare(modules, names, x, config):
    config = config or QuantConfig()
    if names is None:
        names = ["linear"] if len(modules) == 1 else [f"linear{i}" for i in range(len(modules))]
    if len(names) != len(modules):
        raise ValueError(f"names has {len(names)} entries for {len(modules)} linears")
    specs = [linear_spec(m, n) for m, n in zip(modules, names)]
    with torch.no_grad():
        tokens = tokens_of(x, specs[0].in_features, specs[0].conv, names[0]).float()
    generator = torch.Generator(tokens.device).manual_seed(seed_for(config.seed, names[0]))
    return config, specs, subsample(tokens, config.calib_tokens, generator)


def quantize_linear(
    linear: nn.Module,
    x: torch.Tensor,
    config: QuantConfig | None = None,
    *,
    name: str = "linear",
    report: QuantReport | None = None,
    weight_only: bool = False,
    baselines: bool = True,
    act_unsigned: bool = False,
) -> nn.Module:
    """SVDQuant one ``nn.Linear`` (or 1x1 ``nn.Conv2d``) with calibration inputs ``x``.

    Parameters
    ----------
    linear : nn.Linear [N, K] or nn.Conv2d 1x1 (K -> N channels), any float dtype
    x : Tensor [..., K] (or [B, K, H, W] for a conv); calibration inputs, subsampled to
        ``config.calib_tokens`` tokens with the config's seed
    config : QuantConfig (default: ``QuantConfig()``)
    name : the layer's name in errors and the report
    report : if given, the layer's :class:`LayerReport` is appended to it
    weight_only : W4A16 (4-bit weights, 16-bit activations) instead of W4A4
    baselines : also measure naive W4A4 and smoothing-only errors for the report (about doubles
        the time of a W4A4 layer); False leaves those fields None
    act_unsigned : INT4 W4A4 only: unsigned activation codes of ``x + UNSIGNED_ACT_SHIFT``, for a
        linear whose input is a GELU output (x >= -0.17); about halves the activation error there

    Returns
    -------
    SVDQLinear (SVDQConv1x1 for a conv), or W4A16Linear / W4A16Conv1x1 with ``weight_only``;
    its forward approximates ``linear``'s. Raises ValueError naming the layer when K is not a
    multiple of the format's group size or the weight / inputs hold NaN or Inf.
    """
    if weight_only and act_unsigned:
        raise ValueError("act_unsigned applies to W4A4 layers; weight_only layers keep 16-bit x")
    config, specs, tokens = _prepare([linear], [name], x, config)
    if weight_only:
        module, entry = quantize_weight_only(specs[0], tokens, config)
    else:
        ((module, entry),) = quantize_group(
            specs, tokens, config, baselines=baselines, act_unsigned=act_unsigned
        )
    if report is not None:
        report.add(entry)
    return module


def quantize_linears(
    linears: Sequence[nn.Module],
    x: torch.Tensor,
    config: QuantConfig | None = None,
    *,
    names: Sequence[str] | None = None,
    report: QuantReport | None = None,
    baselines: bool = True,
    act_unsigned: bool = False,
) -> list[nn.Module]:
    """SVDQuant linears that read the same input ``x`` as one fused group.

    They share ``smooth_factor`` and ``proj_down`` (smoothing and SVD of the stacked weight);
    each gets its rows of ``proj_up`` and its own 4-bit residual. Parameters as
    :func:`quantize_linear` (``x`` is the members' common input); ``names`` default to
    ``linear0, linear1, ...``.
    """
    if not linears:
        raise ValueError("linears must not be empty")
    config, specs, tokens = _prepare(list(linears), names, x, config)
    results = quantize_group(specs, tokens, config, baselines=baselines, act_unsigned=act_unsigned)
    if report is not None:
        for _, entry in results:
            report.add(entry)
    return [module for module, _ in results]
