"""QuantConfig: every knob of the SVDQuant quantizer, with the reference defaults.

The search follows DeepCompressor's SVDQuant settings (REFERENCE.md section 2): rank 32,
smoothing with an (alpha, beta) grid search, iterative low-rank refinement, GPTQ on the residual.
Unlike DeepCompressor, every choice is judged on held-out calibration tokens (``holdout``), the
low-rank branch may be fitted to the layer's output instead of its weight (``lowrank``), and
GPTQ (with a shrunk Hessian) and clipped group scales are kept per layer only where they lower
the held-out error (docs/QUANTIZE.md). ``QuantConfig(format=..., rank=0, smooth=False,
gptq=False, clip=False)`` is plain round-to-nearest W4A4; ``QuantConfig(holdout=0,
lowrank="svd", gptq=False, clip=False)`` is the search as DeepCompressor runs it (all choices
judged on the calibration tokens themselves).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..formats import get_format

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantConfig:
    """Settings of :func:`dcgen_quant.quantize_model` / :func:`dcgen_quant.quantize_linear`."""

    format: str = "int4"
    """"int4" (group 64, 16-bit scales) or "nvfp4" (group 16, E4M3 scales + FP32 tensor scale)."""
    rank: int = 32
    """Rank of the 16-bit low-rank branch; 0 disables it."""
    smooth: bool = True
    """Per-channel smoothing with a per-layer (alpha, beta) grid search."""
    gptq: bool = True
    """GPTQ on the 4-bit residual, kept per layer only where it lowers the held-out error
    (round-to-nearest otherwise). Its Hessian is shrunk toward its diagonal (``gptq_shrink``), so
    that it generalizes from fewer tokens than input features. With ``holdout=0`` it is kept
    where it lowers the error on the calibration tokens (which overfits: docs/QUANTIZE.md)."""
    clip: bool = True
    """Also try clipped weight scales for the 4-bit residual: per group, the scale of the
    fraction of its largest magnitude (0.5-1.0) that minimizes the group's output-weighted
    rounding error (:mod:`.clip`); GPTQ then rounds with those scales. Kept per layer only
    where the held-out error falls, like GPTQ. On by default (about 6% more CPU time on the
    tiny FLUX, docs/QUANTIZE.md); ``False`` tries round-to-nearest's scales only."""
    smooth_grid: int = 20
    """Grid points per exponent in [0, 1] for the (alpha, beta) search."""
    lowrank_iters: int = 8
    """Maximum refinement iterations of the low-rank branch (stops early when error rises)."""
    svd: str = "randomized"
    """"randomized" (fast truncated SVD) or "full" (torch.linalg.svd), for comparison."""
    gptq_damp: float = 0.01
    """``gptq_damp * mean(diag(H))`` is added to the Hessian's diagonal (reference 0.01)."""
    gptq_block: int = 128
    gptq_shrink: float | None = None
    """Weight of the diagonal in the shrunk Hessian ``(1 - s) H + s diag(H)``, in [0, 1]; None:
    estimated per layer from its fitting tokens (Ledoit-Wolf intensity, :func:`.gptq.shrinkage`):
    about 1 for uncorrelated inputs (GPTQ then reduces to round-to-nearest), near 0 when
    plenty of tokens pin down the correlations."""
    holdout: float = 0.25
    """Fraction of each layer's calibration tokens held out (the last ones: the last samples,
    holdout.py): the smoothing search, the refinement, the low-rank method and GPTQ are judged
    on them, and the report gives the error on them (``err_heldout``). 0: no split, every choice
    judged on the calibration tokens (DeepCompressor's way)."""
    lowrank: str = "auto"
    """"svd": the branch is the SVD of the smoothed weight minus the quantized residual
    (DeepCompressor); "output": the SVD that minimizes the layer's output error on the fitting
    tokens (activation-whitened, lowrank.py); "auto": the SVD refinement, then output-aware
    steps while they lower the held-out error."""
    rank_alloc: bool = False
    """Per-layer ranks (multiples of 16, up to ``2 * rank``) chosen per transformer block by
    held-out error per byte, within the bytes of the uniform ``rank`` (ranks.py)."""
    lowrank_shrink: float = 0.5
    """Weight of the diagonal in the activation Gram that whitens the output-aware branch,
    ``(1 - s) X^T X + s diag(X^T X)``: 0 is the pure output error, 1 a per-channel weighting."""
    dtype: torch.dtype = torch.bfloat16
    """Compute / storage dtype of the quantized layers (scales, low-rank factors, bias)."""
    calib_tokens: int = 4096
    """Calibration tokens kept per layer (uniformly subsampled across samples and timesteps)."""
    search_tokens: int = 1024
    """Tokens (a uniform subsample of the held-out tokens; of all calibration tokens with
    ``holdout=0``) on which the (alpha, beta) grid search ranks its candidates; the refinement,
    the low-rank method and GPTQ are judged on all held-out tokens, and the smoothing statistics
    (max |x| per channel) are those of all fitting tokens."""
    skip: tuple[str, ...] = field(default_factory=tuple)
    """Extra module-name patterns (fnmatch) to keep in 16 bits, on top of the family's list."""
    weight_only_adanorm: bool = True
    """AdaLayerNorm modulation linears: 4-bit weights, 16-bit activations (W4A16Linear)."""
    unsigned_gelu: bool = True
    """INT4: layers whose input is a GELU output (the family's list, e.g. FLUX's ``ff.net.2``)
    quantize ``x + 0.171875`` to unsigned codes 0..15 instead of signed -8..7, using all 16 codes
    on the values GELU produces (about half the activation error); their bias cancels the
    shift. Ignored for NVFP4."""
    skip_incompatible: bool = False
    """Keep target layers whose in_features is not a multiple of the group size in 16 bits
    (listed as skipped in the report) instead of raising ValueError."""
    nunchaku_compatible: bool = False
    """Produce checkpoints that ``convert --to nunchaku`` exports without changing a value:
    AdaLayerNorm (W4A16) layers in INT4 group 64 (Nunchaku runs them as AWQ INT4, also in NVFP4
    models) with codes in -7..7 (its zero point 7 cannot hold -8), and FLUX adaLN biases rounded
    so that the ``b + 1`` Nunchaku stores for the scale chunks is exact in 16 bits. Requires
    ``unsigned_gelu`` and ``weight_only_adanorm``: Nunchaku's INT4 GELU inputs are unsigned, its
    adaLN W4A16."""
    seed: int = 0

    def __post_init__(self) -> None:
        get_format(self.format)  # raises ValueError naming the choices
        if isinstance(self.dtype, str):
            self.dtype = _DTYPES.get(self.dtype.replace("torch.", ""), self.dtype)
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.svd not in ("randomized", "full"):
            raise ValueError(f"svd must be 'randomized' or 'full', got {self.svd!r}")
        if self.smooth_grid < 1:
            raise ValueError(f"smooth_grid must be >= 1, got {self.smooth_grid}")
        if self.calib_tokens < 1:
            raise ValueError(f"calib_tokens must be >= 1, got {self.calib_tokens}")
        if self.search_tokens < 1:
            raise ValueError(f"search_tokens must be >= 1, got {self.search_tokens}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.lowrank not in ("auto", "svd", "output"):
            raise ValueError(f"lowrank must be 'auto', 'svd' or 'output', got {self.lowrank!r}")
        if self.rank_alloc and (self.rank < 16 or self.rank % 16):
            raise ValueError(f"rank_alloc needs a rank that is a multiple of 16, got {self.rank}")
        if not 0 <= self.lowrank_shrink <= 1:
            raise ValueError(f"lowrank_shrink must be in [0, 1], got {self.lowrank_shrink}")
        if self.gptq_shrink is not None and not 0 <= self.gptq_shrink <= 1:
            raise ValueError(f"gptq_shrink must be None or in [0, 1], got {self.gptq_shrink}")
        self.skip = tuple(self.skip)
        if self.nunchaku_compatible and not (self.unsigned_gelu and self.weight_only_adanorm):
            raise ValueError(
                "nunchaku_compatible needs unsigned_gelu=True and weight_only_adanorm=True "
                "(CLI: drop --signed-gelu)"
            )

    @property
    def weight_only_format(self) -> str:
        """Format of the W4A16 (AdaLayerNorm) layers: INT4 with ``nunchaku_compatible``."""
        return "int4" if self.nunchaku_compatible else self.format

    @property
    def group_size(self) -> int:
        return get_format(self.format).group_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (checkpoint metadata)."""
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["skip"] = list(self.skip)
        d["group_size"] = self.group_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
