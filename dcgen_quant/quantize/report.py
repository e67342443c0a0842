"""Per-layer report of a quantization run (goes into the checkpoint metadata and the CLI table).

Errors are relative output errors ``||y_q - y|| / ||y||`` of the layer on its calibration inputs,
``y`` being the original layer's output (bias included) computed in float32 and ``y_q`` the
quantized layer's output through the reference ops, i.e. exactly what the runtime computes.
The calibration tokens are split into fitting and held-out ones (``QuantConfig.holdout``,
holdout.py); the ``err_*`` fields but ``err_heldout`` are on the fitting tokens:

``err_rtn``      naive W4A4: round-to-nearest, rank 0, no smoothing; for W4A16 layers the
                round-to-nearest 4-bit weight;
``err_smooth``   smoothing only (rank 0, (alpha, beta) searched); None for W4A16 layers;
``err_svdq``     the layer as quantized with the run's QuantConfig (what the model now holds);
``err_heldout``  the same layer on the held-out tokens, which no choice was fitted on (None when
                nothing was held out): what to expect on new inputs. ``err_svdq`` far below it
                means the layer fits its calibration tokens better than new ones.

``summary()`` keys: ``layers_quantized``, ``w4a4``, ``w4a16``, ``layers_skipped``,
``mean_rel_err`` / ``max_rel_err`` (of ``err_svdq`` over the quantized layers),
``max_rel_err_layer``, ``mean_rel_err_heldout`` / ``max_rel_err_heldout`` (of ``err_heldout``,
None if no layer has one), ``mean_rel_err_rtn``, ``total_seconds``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("w4a4", "w4a16", "skipped")


@dataclass
class LayerReport:
    """One linear (or 1x1 conv) of the model."""

    name: str
    """Qualified module name in the model, e.g. ``transformer_blocks.0.attn.to_q``."""
    kind: str
    """"w4a4", "w4a16" or "skipped"."""
    module: str
    """Class of the module now in the model (``SVDQLinear``, ``W4A16Conv1x1``, ``Linear``...)."""
    out_features: int
    in_features: int
    bias: bool = False
    rank: int = 0
    group: list[str] | None = None
    """Names of the fused group (shared smoothing and proj_down), None when quantized alone."""
    act_unsigned: bool = False
    """INT4 W4A4 with unsigned activation codes of ``x + UNSIGNED_ACT_SHIFT`` (GELU inputs)."""
    split_at: int | None = None
    """An ``SVDQSplitLinear``: input columns [0, split_at) signed, [split_at, K) (a GELU output)
    unsigned, each part with its own smoothing and low-rank branch (``rank``: the larger)."""
    alpha: float | None = None
    beta: float | None = None
    lowrank_iters: int = 0
    """SVDs computed for the chosen (alpha, beta): 1 + refinement steps that were kept or tried."""
    lowrank: str | None = None
    """How the branch was fitted: "svd" (the smoothed weight's SVD, refined with the residual)
    or "output" (output-aware steps lowered the held-out error further); None without a branch."""
    gptq: bool = False
    """GPTQ chose the residual's codes (False: round-to-nearest was kept)."""
    clip: bool = False
    """The residual's group scales were clipped (``QuantConfig.clip``: searched per group and
    kept because the held-out error fell)."""
    err_rtn: float | None = None
    err_smooth: float | None = None
    err_svdq: float | None = None
    err_heldout: float | None = None
    calib_tokens: int = 0
    """Calibration tokens of the layer, fitting and held-out together."""
    heldout_tokens: int = 0
    """How many of them were held out (the last ones); 0: all fitted, ``err_heldout`` None."""
    seconds: float = 0.0
    """Wall time of this layer (a fused group's time is split evenly between its members)."""
    reason: str | None = None
    """Why a layer was skipped."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), the shape of the weight."""
        return (self.out_features, self.in_features)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class QuantReport:
    """All layers of one run, in the order they were processed."""

    layers: list[LayerReport] = field(default_factory=list)
    model_class: str | None = None
    calib_samples: int = 0

    def add(self, layer: LayerReport) -> None:
        if any(existing.name == layer.name for existing in self.layers):
            raise ValueError(f"layer {layer.name!r} is already in the report")
        self.layers.append(layer)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the report")

    def __contains__(self, name: object) -> bool:
        return any(layer.name == name for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.kind != "skipped"]

    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.kind == "skipped"]

    def summary(self) -> dict[str, Any]:
        """Totals: layer counts, mean / max relative error (full SVDQuant), total seconds."""
        quantized = self.quantized()
        errs = [
            (layer.err_svdq, layer.name)
            for layer in quantized
            if layer.err_svdq is not None and math.isfinite(layer.err_svdq)
        ]
        naive = [layer.err_rtn for layer in quantized if layer.err_rtn is not None]
        heldout = [
            layer.err_heldout
            for layer in quantized
            if layer.err_heldout is not None and math.isfinite(layer.err_heldout)
        ]
        worst = max(errs) if errs else (None, None)
        return {
            "layers_quantized": len(quantized),
            "w4a4": sum(layer.kind == "w4a4" for layer in quantized),
            "w4a16": sum(layer.kind == "w4a16" for layer in quantized),
            "layers_skipped": len(self.skipped()),
            "mean_rel_err": sum(e for e, _ in errs) / len(errs) if errs else None,
            "max_rel_err": worst[0],
            "max_rel_err_layer": worst[1],
            "mean_rel_err_heldout": sum(heldout) / len(heldout) if heldout else None,
            "max_rel_err_heldout": max(heldout) if heldout else None,
            "mean_rel_err_rtn": sum(naive) / len(naive) if naive else None,
            "total_seconds": sum(layer.seconds for layer in self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the checkpoint's per-layer calibration metadata)."""
        return {
            "version": 1,
            "model_class": self.model_class,
            "calib_samples": self.calib_samples,
            "summary": self.summary(),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantReport:
        return cls(
            layers=[LayerReport.from_dict(x) for x in d.get("layers", [])],
            model_class=d.get("model_class"),
            calib_samples=d.get("calib_samples", 0),
        )

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per layer, for :func:`dcgen_quant.tables.emit`."""
        return [
            {
                "name": layer.name,
                "kind": layer.kind,
                "shape": f"{layer.out_features}x{layer.in_features}",
                "alpha": layer.alpha,
                "beta": layer.beta,
                "err_rtn": layer.err_rtn,
                "err_smooth": layer.err_smooth,
                "err_svdq": layer.err_svdq,
                "err_heldout": layer.err_heldout,
                "seconds": layer.seconds,
                "reason": layer.reason,
            }
            for layer in self.layers
        ]
