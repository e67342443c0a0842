"""The paper's latency tables: published numbers, the assumptions they need, predicted rows.

Published (REFERENCE.md section 1, arXiv 2509.25180): FLUX.1-Krea vs DC-Gen-FLUX, whole image,
one H100: 1K 4.65 / 1.10 s (4.2x), 2K 23.76 / 1.41 s (16.9x), 4K 213.81 / 4.04 s (52.9x; the
README rounds differently: 53.8x). DC-Gen-FLUX with NVFP4 SVDQuant on one RTX 5090: a 4K image
in 3.5 s, 138x less than base FLUX.1-Krea on that card (so ~483 s for the base, implied).

What the paper does not state, and this module makes explicit (:class:`Assumptions`):

* ``base_steps`` = 28: steps of the base FLUX.1-Krea runs (diffusers' FluxPipeline default, which
  the Krea model card uses). DC-Gen-FLUX uses 20 (``dcgen_steps``, stated in the paper and the
  DC-Gen repository's ``generate.py``).
* ``dcgen_autoencoders``: DC-Gen-FLUX's autoencoder per resolution. The DC-Gen repository ships
  a 1K model on DC-AE f32c32 (task ``t2i_1k``, "up to 1K") and a 4K model on DC-AE-1.5 f64c128
  (task ``t2i_4k``, "up to 4K"); 2K is served by the 4K model (its 2K latency, 1.41 s, is close
  to its 1K one, REFERENCE.md). Default: f32c32 at 1K, f64c128 at 2K and 4K.
* the attention kernel efficiency of the base runs is a GPU parameter (``attn_eff``,
  :mod:`dcgen_quant.bench.hardware`).

:func:`sensitivity` shows how the speedups move with each of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import latency
from .hardware import GPU

__all__ = ["PUBLISHED", "Assumptions", "predicted_rows", "sensitivity", "RESOLUTIONS"]

RESOLUTIONS = (1024, 2048, 4096)

# (gpu, precision of the DC-Gen run) -> resolution -> (base_s, dcgen_s, speedup); base
# precision is bf16 everywhere. None = not published.
PUBLISHED: dict[tuple[str, str], dict[int, tuple[float | None, float | None, float]]] = {
    ("h100", "bf16"): {
        1024: (4.65, 1.10, 4.2),
        2048: (23.76, 1.41, 16.9),
        4096: (213.81, 4.04, 52.9),
    },
    ("rtx5090", "w4a4"): {4096: (None, 3.5, 138.0)},
}

FAMILIES = {
    # family -> (base model, DC-Gen model per autoencoder, default DC-Gen autoencoders, steps)
    "flux": (
        "flux",
        {"dc-ae-f32c32": "dcgen-flux-f32c32", "dc-ae-1.5-f64c128": "dcgen-flux-f64c128"},
        {1024: "dc-ae-f32c32", 2048: "dc-ae-1.5-f64c128", 4096: "dc-ae-1.5-f64c128"},
        (28, 20),
    ),
    "sana": (
        "sana-1.6b",
        {"dc-ae-1.5-f64c128": "dcgen-sana"},
        {1024: "dc-ae-1.5-f64c128", 2048: "dc-ae-1.5-f64c128", 4096: "dc-ae-1.5-f64c128"},
        (20, 20),  # SANA's default: 20 Flow-DPM-Solver steps, CFG as a batch of 2
    ),
}


@dataclass
class Assumptions:
    """The choices the published numbers leave open (see the module docstring)."""

    family: str = "flux"
    base_steps: int | None = None  # None: the family default (FLUX 28, SANA 20)
    dcgen_steps: int | None = None  # None: 20
    dcgen_autoencoders: dict[int, str] = field(default_factory=dict)  # {} = family default

    def resolved(self) -> Assumptions:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; expected one of {', '.join(FAMILIES)}")
        _, models, aes, (b, d) = FAMILIES[self.family]
        aes = {**aes, **self.dcgen_autoencoders}
        for res, ae in aes.items():
            if ae not in models:
                raise ValueError(
                    f"autoencoder {ae!r} at {res}px: DC-Gen-{self.family} exists for "
                    f"{', '.join(models)}"
                )
        for name, v in (("base_steps", self.base_steps), ("dcgen_steps", self.dcgen_steps)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        return Assumptions(self.family, self.base_steps or b, self.dcgen_steps or d, aes)

    def to_dict(self) -> dict:
        a = self.resolved()
        return {
            "family": a.family,
            "base_steps": a.base_steps,
            "dcgen_steps": a.dcgen_steps,
            "dcgen_autoencoders": {str(k): v for k, v in a.dcgen_autoencoders.items()},
        }


def _explain(base: latency.Prediction, dcgen: latency.Prediction) -> str:
    """One line saying where a speedup comes from."""
    b, d = base.breakdown(), dcgen.breakdown()
    attn_share = b["attention"] / base.total_s
    fixed = (dcgen.decode_s + dcgen.text_s) / dcgen.total_s
    attn = b["attention"] / max(d["attention"], 1e-12)
    lin = b["linear"] / max(d["linear"], 1e-12)
    return (
        f"tokens {base.tokens}->{dcgen.tokens} ({base.tokens / dcgen.tokens:.0f}x); per step "
        f"{base.step_s / dcgen.step_s:.1f}x (attention {attn:.0f}x less over the run, linear "
        f"{lin:.1f}x); steps "
        f"{base.steps}/{dcgen.steps}; base is {attn_share:.0%} attention; VAE+text are "
        f"{fixed:.0%} of DC-Gen"
    )


def predicted_rows(
    gpu: GPU,
    w4a4: bool = False,
    assumptions: Assumptions | None = None,
    resolutions=RESOLUTIONS,
) -> list[dict]:
    """One row per resolution: predicted base vs DC-Gen latency next to the published numbers.

    Without ``w4a4`` both models run in bf16. With ``w4a4`` the DC-Gen model runs W4A4 in the
    GPU's native 4-bit format (INT4 via INT8 on Hopper, NVFP4 on Blackwell) and the speedup is
    the paper's "total latency reduction": base bf16 over DC-Gen W4A4.
    """
    a = (assumptions or Assumptions()).resolved()
    base_model, models, _, _ = FAMILIES[a.family]
    published = (
        PUBLISHED.get((gpu.name, "w4a4" if w4a4 else "bf16"), {}) if a.family == "flux" else {}
    )
    rows = []
    for res in resolutions:
        # resolutions without an explicit choice use the highest resolution's autoencoder
        ae = a.dcgen_autoencoders.get(res) or a.dcgen_autoencoders[max(a.dcgen_autoencoders)]
        dcgen_model = models[ae]
        base = latency.predict_image(gpu, base_model, res, a.base_steps)
        dcgen_bf16 = latency.predict_image(gpu, dcgen_model, res, a.dcgen_steps, "bf16", ae)
        dcgen = (
            latency.predict_image(gpu, dcgen_model, res, a.dcgen_steps, "w4a4", ae)
            if w4a4
            else dcgen_bf16
        )
        pub_base, pub_dcgen, pub_speedup = published.get(res, (None, None, None))
        speedup = base.total_s / dcgen.total_s
        row = {
            "resolution": res,
            "gpu": gpu.name,
            "precision": f"bf16 vs {dcgen.precision}" if w4a4 else "bf16",
            "base_model": base_model,
            "dcgen_model": dcgen_model,
            "dcgen_autoencoder": ae,
            "base_steps": a.base_steps,
            "dcgen_steps": a.dcgen_steps,
            "base_tokens": base.tokens,
            "dcgen_tokens": dcgen.tokens,
            "base_s": base.total_s,
            "dcgen_s": dcgen.total_s,
            "speedup": speedup,
            "published_base_s": pub_base,
            "published_dcgen_s": pub_dcgen,
            "published_speedup": pub_speedup,
            "speedup_rel_error": (speedup / pub_speedup - 1) if pub_speedup else None,
            "base_step_s": base.step_s,
            "dcgen_step_s": dcgen.step_s,
            "base_step_tflop": base.step_flops / 1e12,
            "dcgen_step_tflop": dcgen.step_flops / 1e12,
            "base_breakdown": base.breakdown(),
            "dcgen_breakdown": dcgen.breakdown(),
            "explanation": _explain(base, dcgen),
        }
        if w4a4:
            base_q = latency.predict_image(gpu, base_model, res, a.base_steps, "w4a4")
            row["dcgen_bf16_s"] = dcgen_bf16.total_s
            row["base_w4a4_s"] = base_q.total_s
        rows.append(row)
    return rows


def sensitivity(
    gpu: GPU,
    w4a4: bool = False,
    attn_effs=(0.35, 0.50, 0.66),
    base_steps=(20, 28),
    autoencoders_1k=("dc-ae-f32c32", "dc-ae-1.5-f64c128"),
) -> list[dict]:
    """Speedups of the FLUX table over a grid of the open assumptions (one row per point)."""
    out = []
    for eff in sorted({*attn_effs, gpu.attn_eff}):
        g = dataclasses.replace(gpu, attn_eff=eff)
        for steps in base_steps:
            for ae in autoencoders_1k:
                a = Assumptions("flux", steps, None, {1024: ae})
                rows = predicted_rows(g, w4a4, a)
                rec = {"attn_eff": eff, "base_steps": steps, "dcgen_ae_1k": ae}
                for r in rows:
                    rec[f"speedup_{r['resolution'] // 1024}k"] = r["speedup"]
                out.append(rec)
    return out
