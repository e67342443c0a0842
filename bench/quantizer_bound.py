"""How low can a W4A4 layer's error go? An oracle sweep on quantizer_quality's outlier layers.

``python -m dcgen_quant.bench.quantizer_bound --out DIR`` takes the synthetic outlier layer of
bench/quantizer_quality.py (``outlier_layer``: 2% of the input channels at 30x, 512 calibration
and 2048 fresh tokens) and, for each smoothing vector of a family, builds the SVDQuant layer the
format allows with every other choice made as well as this script knows how:

- the low-rank branch: the rank-r SVD of the smoothed weight, refined once against the 4-bit
  residual (``L = SVD_r(W lambda - Q(R))``);
- the residual: per (row, group) the clipped scale ``c * amax / q_max`` with ``c`` on a fine grid
  (0.40-1.00, step 0.01) minimizing ``sum_k d_k (w_k - q_k)^2``, where ``d_k`` is the mean
  square of smoothed channel k *on the fresh tokens the error is scored on* (an oracle: nothing
  a quantizer could know). Given the scales, rounding each weight to its nearest code is the
  optimum of that objective, which is the output error's expectation when the input channels
  are independent (a diagonal Hessian): GPTQ has nothing to add there;
- the activations: the format's dynamic per-token group scales (``amax / 7``, NVFP4 ``amax / 6``
  in E4M3), as the kernels and Nunchaku compute them.

Smoothing families: ``lambda = max|x|^a / max|w|^b`` for a in 0, 0.1, ..., 1 with b = 0 or
1 - a (the quantizer's search space, on a finer grid than its default), and ``lambda = t`` on
the outlier channels only (1 elsewhere), t in 3, 10, 30, 100, 300: move the outliers into the
16-bit branch whole. Every point's fresh error is scored; the table gives each family's best,
the two parts it splits into (4-bit weights with exact activations; 4-bit activations with
exact weights) and the ratio to the ``baseline`` and ``default`` configurations of
quantizer_quality measured on the same layer in the same process.

This is a bound over the families above, not over every possible quantizer. It answers whether
issue 14's 0.90x target is in reach of any choice of smoothing, branch and weight scales.
Writes ``DIR/quantizer_bound.md`` and ``.json``; ``--quick``: a 256 -> 512 layer, a few points.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

NAME = "quantizer_bound"
CLIP_FINE = tuple(round(1.0 - 0.01 * i, 2) for i in range(61))  # 1.00 .. 0.40
EXPONENTS = tuple(i / 10 for i in range(11))
OUTLIER_SCALES = (3.0, 10.0, 30.0, 100.0, 300.0)
CONFIGS = ("baseline", "default")  # quantizer_quality variants scored beside the oracle


def families(x_absmax: torch.Tensor, w_absmax: torch.Tensor, quick: bool):
    """(name, lambda [K]) pairs: the exponent family and the outlier-only family."""
    xa, wa = x_absmax.clamp_min(1e-5), w_absmax.clamp_min(1e-5)
    exps = (0.0, 0.5, 1.0) if quick else EXPONENTS
    for a in exps:
        yield f"a={a:.1f}, b=0", xa**a
        if 0 < a < 1:
            yield f"a={a:.1f}, b={1 - a:.1f}", xa**a / wa ** (1 - a)
    outliers = x_absmax > 10 * x_absmax.median()
    for t in (10.0,) if quick else OUTLIER_SCALES:
        yield f"outliers x{t:g}", torch.where(outliers, t, 1.0)


def _svd_r(a: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _quantize(r: torch.Tensor, d: torch.Tensor, fmt: str) -> torch.Tensor:
    from dcgen_quant.formats import dequantize_weight
    from dcgen_quant.quantize.clip import clip_factors, quantize_clipped

    f = clip_factors(r, d, fmt, torch.bfloat16, grid=CLIP_FINE)
    return dequantize_weight(quantize_clipped(r, f, fmt, torch.bfloat16)).float()


def oracle_point(w, b, fresh, lam, fmt: str, rank: int) -> dict[str, float]:
    """Fresh-token errors of the best layer this script builds for smoothing ``lam`` [K]:
    total, weight part (activations exact), activation part (weights exact)."""
    from dcgen_quant.quantize.fakequant import fake_quant_act

    ws = w * lam
    xs = fresh / lam
    d = xs.square().mean(dim=0)
    low = _svd_r(ws, rank)
    q = _quantize(ws - low, d, fmt)
    low = _svd_r(ws - q, rank)  # one refinement against the 4-bit residual
    q = _quantize(ws - low, d, fmt)
    y = fresh @ w.t() + b
    branch = xs @ low.t() + b
    xq = fake_quant_act(xs, fmt, torch.bfloat16)

    def rel(out):
        return float((out - y).norm() / y.norm())

    return {
        "total": rel(xq @ q.t() + branch),
        "weight": rel(xs @ q.t() + branch),
        "activation": rel(xq @ (ws - low).t() + branch),
    }


def measure(k: int, n: int, kind: str, fmt: str, quick: bool, rank: int = 32) -> dict[str, Any]:
    from .quantizer_quality import measure_layer, outlier_layer

    calib_n, fresh_n = (256, 512) if quick else (512, 2048)
    lin, calib, fresh = outlier_layer(k, n, kind, calib_n, fresh_n)
    configs = {v: measure_layer(lin, calib, fresh, v, fmt)["err_fresh"] for v in CONFIGS}
    w, b = lin.weight.detach().float(), lin.bias.detach().float()
    xa, wa = calib.abs().amax(dim=0), w.abs().amax(dim=0)
    points = []
    for name, lam in families(xa, wa, quick):
        point = {"smoothing": name, **oracle_point(w, b, fresh, lam, fmt, rank)}
        points.append(point)
        print(json.dumps({"layer": f"{k}->{n}", "inputs": kind, "format": fmt, **point}),
              flush=True)  # fmt: skip
    best = min(points, key=lambda p: p["total"])
    return {"layer": f"{k}->{n}", "inputs": kind, "format": fmt, "rank": rank, **configs,
            "best": best, "points": points}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = ["# W4A4 oracle bound on the outlier layers", "", f"`{result['command']}`", "",
             "Fresh-token relative output error. *oracle*: the lowest of every smoothing point "
             "(bench/quantizer_bound.py); *weight* / *activation*: its two parts; *baseline* / "
             "*default*: quantizer_quality's configurations on the same layer and tokens.", "",
             "| layer | inputs | format | baseline | default | oracle | oracle / baseline | "
             "0.90 x baseline | best smoothing | weight part | activation part |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for e in result["entries"]:
        best = e["best"]
        lines.append(
            f"| {e['layer']} | {e['inputs']} | {e['format']} | {e['baseline']:.4f} | "
            f"{e['default']:.4f} | {best['total']:.4f} | {best['total'] / e['baseline']:.3f} | "
            f"{0.9 * e['baseline']:.4f} | {best['smoothing']} | {best['weight']:.4f} | "
            f"{best['activation']:.4f} |"
        )
    env = ", ".join(f"{k} {v}" for k, v in result["environment"].items())
    return "\n".join([*lines, "", f"Environment: {env}", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dcgen_quant.bench.quantizer_bound", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--sizes", default="1536x4096", help="layers as KxN, comma-separated")
    parser.add_argument("--formats", default="int4,nvfp4", help="comma-separated formats")
    parser.add_argument("--inputs", default="iid", help="iid and/or correlated")
    parser.add_argument("--quick", action="store_true", help="a 256 -> 512 layer, a few points")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if bad := [f for f in formats if f not in ("int4", "nvfp4")]:
        parser.error(f"--formats: unknown format(s) {', '.join(bad)} (int4, nvfp4)")
    kinds = [k for k in args.inputs.split(",") if k]
    if not kinds or (bad := sorted(set(kinds) - {"iid", "correlated"})):
        parser.error(f"--inputs: expected iid and/or correlated, got {args.inputs!r}")
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes: expected KxN[,KxN...], got {args.sizes!r}")
    if args.quick:
        sizes = [(256, 512)]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the small-calibration GPTQ warning of the configurations
    from dcgen_quant.atomic import atomic_write_text

    from .quantizer_speed import environment

    command = " ".join(["python -m dcgen_quant.bench.quantizer_bound", *(argv or sys.argv[1:])])
    result: dict[str, Any] = {"benchmark": NAME, "command": command, "entries": [],
                              "environment": environment(torch.device("cpu"))}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for k, n in sizes:
        for kind in kinds:
            for fmt in formats:
                result["entries"].append(measure(k, n, kind, fmt, args.quick))
                atomic_write_text(args.out / f"{NAME}.json", json.dumps(result, indent=2) + "\n")
                atomic_write_text(args.out / f"{NAME}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
