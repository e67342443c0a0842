"""Measured results: whole-image rows, predicted-vs-measured comparison, md / json / png files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dcgen_quant.atomic import atomic_path, atomic_write_text
from dcgen_quant.tables import format_table

from . import latency
from .hardware import TERA, get_gpu
from .reproduce import PUBLISHED, Assumptions

__all__ = ["measured_rows", "run_rows", "write_results", "results_stem"]


def _index(result: dict) -> dict:
    return {(r["kind"], r["model"], r["precision"], r["resolution"]): r for r in result["runs"]}


def _dcgen_ae(result: dict, res: int, assumptions: Assumptions) -> str:
    if result.get("tiny"):
        return "dc-ae-1.5-f64c128"
    return assumptions.resolved().dcgen_autoencoders.get(res, "dc-ae-1.5-f64c128")


def _model_for(ae: str) -> str:
    return "dcgen-flux-f32c32" if ae == "dc-ae-f32c32" else "dcgen-flux-f64c128"


def _predicted(gpu, model, res, prec, ae, steps) -> tuple[float, float]:
    """(step_s, decode_s) predicted for full-size models (text excluded, as in the measurement)."""
    p = latency.predict_image(gpu, model, res, steps, prec, ae)
    return p.step_s, p.decode_s


def measured_rows(result: dict, assumptions: Assumptions | None = None) -> list[dict]:
    """Whole-image rows (steps x step + decode) from a :func:`measured.measure` result.

    Each row pairs base FLUX (bf16) with DC-Gen-FLUX in bf16 and, when measured, in W4A4, and
    (full-size runs on a modelled GPU) the latency model's prediction of the same quantities.
    """
    a = (assumptions or Assumptions()).resolved()
    idx = _index(result)
    fmt = result.get("format", "int4")
    gpu, calibrated = _gpus(result)
    resolutions = sorted({r["resolution"] for r in result["runs"]})
    rows = []
    for res in resolutions:
        ae = _dcgen_ae(result, res, a)
        dcgen_model = _model_for(ae)
        for prec in ("bf16", fmt):
            base_step = idx.get(("step", "flux", "bf16", res))
            base_dec = idx.get(("decode", "flux-vae", "bf16", res))
            d_step = idx.get(("step", dcgen_model, prec, res))
            d_dec = idx.get(("decode", ae, "bf16", res))
            if d_step is None:
                continue
            row = {"resolution": res, "precision": "bf16" if prec == "bf16" else f"bf16 vs {prec}",
                   "dcgen_model": dcgen_model, "dcgen_autoencoder": ae}  # fmt: skip
            base_s = dcgen_s = None
            if base_step and base_dec:
                base_s = a.base_steps * base_step["median_s"] + base_dec["median_s"]
            if d_dec:
                dcgen_s = a.dcgen_steps * d_step["median_s"] + d_dec["median_s"]
            row.update(
                base_step_s=base_step["median_s"] if base_step else None,
                base_decode_s=base_dec["median_s"] if base_dec else None,
                dcgen_step_s=d_step["median_s"],
                dcgen_decode_s=d_dec["median_s"] if d_dec else None,
                base_s=base_s,
                dcgen_s=dcgen_s,
                speedup=base_s / dcgen_s if base_s and dcgen_s else None,
            )
            for tag, g in (("", gpu), ("calibrated_", calibrated)):
                if g is None:
                    continue
                bs, bd = _predicted(g, "flux", res, "bf16", "flux-vae", a.base_steps)
                ds, dd = _predicted(g, dcgen_model, res, prec, ae, a.dcgen_steps)
                pb, pd = a.base_steps * bs + bd, a.dcgen_steps * ds + dd
                row.update({f"{tag}predicted_base_s": pb, f"{tag}predicted_dcgen_s": pd,
                            f"{tag}predicted_speedup": pb / pd})  # fmt: skip
            key = ("h100", "bf16" if prec == "bf16" else "w4a4")
            row["published_speedup_h100"] = PUBLISHED.get(key, {}).get(res, (None,) * 3)[2]
            rows.append(row)
    return rows


def _gpus(result: dict):
    """(the GPU with default parameters, the GPU with the measured ceilings' efficiencies)."""
    if not result.get("gpu") or result.get("tiny"):
        return None, None
    gpu = get_gpu(result["gpu"])
    implied = {k: min(v, 1.0) for k, v in implied_efficiencies(result).items()}
    return gpu, (dataclasses.replace(gpu, **implied) if implied else None)


def run_rows(result: dict) -> list[dict]:
    """One row per measured step / decode with the model's prediction and the ratio.

    ``predicted_ms`` uses the GPU's default parameters; ``calibrated_ms`` (when the ceilings
    were measured) the mm_eff / attn_eff / bw_eff this run measured.
    """
    gpu, calibrated = _gpus(result)
    out = []
    for r in result["runs"]:
        row = {k: r[k] for k in ("kind", "model", "precision", "resolution")}
        row["measured_ms"] = r["median_s"] * 1e3
        row["reps"] = r["reps"]
        for key, g in (("predicted_ms", gpu), ("calibrated_ms", calibrated)):
            if g is None:
                continue
            if r["kind"] == "step":
                p = latency.predict_image(g, r["model"], r["resolution"], 1, r["precision"],
                                          r["autoencoder"])  # fmt: skip
                row[key] = p.step_s * 1e3
            else:
                ops = latency.decode_ops(r["model"], r["resolution"])
                row[key] = latency.simulate(ops, g)["total"] * 1e3
        if "predicted_ms" in row:
            row["measured/predicted"] = row["measured_ms"] / row["predicted_ms"]
        row["note"] = r.get("note", "")
        out.append(row)
    return out


def implied_efficiencies(result: dict) -> dict[str, float]:
    """mm_eff / attn_eff / bw_eff implied by the measured ceilings and the GPU's datasheet."""
    c, key = result.get("ceilings") or {}, result.get("gpu")
    if not c or not key:
        return {}
    g = get_gpu(key)
    return {
        "mm_eff": c["matmul_bf16_tflops"] * TERA / g.bf16,
        "attn_eff": c["sdpa_bf16_tflops"] * TERA / g.bf16,
        "bw_eff": c["copy_tbs"] * TERA / g.bandwidth,
    }


def results_stem(result: dict) -> str:
    env = result["env"]
    if result.get("tiny"):
        name = "cpu-tiny" if env.get("gpu_name") is None else "tiny"
    else:
        name = result.get("gpu") or "".join(
            c if c.isalnum() else "-" for c in (env.get("gpu_name") or "gpu").lower()
        )
    return f"{name}-{env['date']}"


_MAIN_COLS = [
    ("resolution", "res", None), ("precision", "precision", None),
    ("base_step_s", "base step s", ".3f"), ("dcgen_step_s", "DC-Gen step s", ".4f"),
    ("base_s", "base s", ".2f"), ("dcgen_s", "DC-Gen s", ".2f"), ("speedup", "speedup", ".1f"),
    ("predicted_base_s", "pred base s", ".2f"), ("predicted_dcgen_s", "pred DC-Gen s", ".2f"),
    ("predicted_speedup", "pred speedup", ".1f"),
    ("calibrated_predicted_speedup", "pred speedup (measured effs)", ".1f"),
    ("published_speedup_h100", "paper H100", ".1f"),
]  # fmt: skip
_RUN_COLS = [
    ("kind", "kind", None), ("model", "model", None), ("precision", "prec", None),
    ("resolution", "res", None), ("measured_ms", "measured ms", ".2f"), ("reps", "n", None),
    ("predicted_ms", "predicted ms", ".2f"), ("measured/predicted", "meas/pred", ".2f"),
    ("calibrated_ms", "pred ms (measured effs)", ".2f"),
]  # fmt: skip


def markdown(result: dict, rows: list[dict], runs: list[dict], assumptions: Assumptions) -> str:
    env = result["env"]
    a = assumptions.resolved()
    lines = [
        f"# Measured latency: {env.get('gpu_name') or 'CPU (tiny models, timings meaningless)'}",
        "",
        f"date {env['date']}; driver {env.get('driver')}; torch {env['torch']} (CUDA "
        f"{env.get('cuda')}); triton {env.get('triton')}; diffusers {env.get('diffusers')}; "
        f"python {env.get('python')}",
        "",
        f"Whole image = steps x step + VAE decode (text encoders not measured); base FLUX "
        f"{a.base_steps} steps, DC-Gen-FLUX {a.dcgen_steps} steps; random weights; batch 1. "
        f"Predicted columns: the latency model with this GPU's default parameters, text "
        f"excluded. Run wall time {result.get('wall_s', 0):.0f} s."
        + (
            " Tiny CPU runs compute in float32 ('bf16' rows: the 16-bit models)."
            if result.get("tiny")
            else ""
        ),
        "",
    ]
    if result.get("ceilings"):
        ceilings = ", ".join(f"{k} {v:.1f}" for k, v in result["ceilings"].items())
        effs = ", ".join(f"{k} {v:.2f}" for k, v in implied_efficiencies(result).items())
        lines += [f"Measured ceilings: {ceilings}", f"Implied efficiencies: {effs}", ""]
    if result.get("w4a4_backend"):
        lines += [f"W4A4 rows timed with the {result['w4a4_backend']!r} backend.", ""]
    if result.get("w4a4_unavailable"):
        lines += [f"W4A4 not measured: {result['w4a4_unavailable']}", ""]
    lines += ["```", format_table(rows, _MAIN_COLS), "```", "", "Per run:", "```",
              format_table(runs, _RUN_COLS), "```", ""]  # fmt: skip
    notes = sorted({r["note"] for r in result["runs"] if r.get("note")})
    lines += [f"- {n}" for n in notes]
    if result["skipped"]:
        lines += ["", "Skipped:"]
        lines += [f"- {s['kind']} {s['model']} {s['precision']} {s['resolution']}: {s['reason']}"
                  for s in result["skipped"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Latency vs resolution (log scale): measured solid, predicted dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for prec in sorted({r["precision"] for r in rows}):
        sub = [r for r in rows if r["precision"] == prec]
        xs = [r["resolution"] for r in sub]
        for key, label, style in (
            ("base_s", "base FLUX", "o-"), ("dcgen_s", f"DC-Gen-FLUX ({prec})", "s-"),
            ("predicted_base_s", "base FLUX predicted", "o--"),
            ("predicted_dcgen_s", f"DC-Gen predicted ({prec})", "s--"),
        ):  # fmt: skip
            ys = [r.get(key) for r in sub]
            if any(y is not None for y in ys) and not (prec != "bf16" and "base" in key):
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("resolution (px per side)")
    ax.set_ylabel("whole-image latency (s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_results(result: dict, out_dir: str | Path, assumptions: Assumptions | None = None):
    """Write ``<out_dir>/<gpu>-<date>.{md,json,png}``; returns (rows, runs, paths)."""
    assumptions = assumptions or Assumptions()
    rows, runs = measured_rows(result, assumptions), run_rows(result)
    out_dir = Path(out_dir)
    stem = out_dir / results_stem(result)
    doc = {**result, "assumptions": assumptions.to_dict(), "rows": rows, "per_run": runs,
           "implied_efficiencies": implied_efficiencies(result)}  # fmt: skip
    paths = {
        "json": stem.with_suffix(".json"),
        "md": stem.with_suffix(".md"),
        "png": stem.with_suffix(".png"),
    }
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(paths["md"], markdown(result, rows, runs, assumptions))
    plot(
        rows, paths["png"], f"{result['env'].get('gpu_name') or 'CPU tiny'} {result['env']['date']}"
    )
    return rows, runs, paths
