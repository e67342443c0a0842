"""The fitting / held-out split of a layer's calibration tokens.

Every choice the quantizer makes from data (smoothing exponents, low-rank refinement steps, the
low-rank method, GPTQ or round-to-nearest) can fit the calibration tokens better than new ones:
GPTQ with fewer tokens than input features is the extreme case (its error on the calibration
tokens falls while the error on fresh tokens rises). So the tokens are split in two: the
*fitting* part feeds everything that is estimated (smoothing statistics, activation Gram and
GPTQ Hessian), the *held-out* part judges every choice and gives the reported held-out error.

The split is by position and deterministic: the last ``fraction`` of the tokens are held out.
Calibration tokens reach the layer quantizer in stream order (one calibration sample after the
other: :class:`~dcgen_quant.quantize.calibration.TokenReservoir` keeps that order), so the
held-out tokens are those of the last samples: new images and prompts rather than more tokens
of the images already fitted, which would be near copies of fitted tokens (a prompt's text
tokens barely change between denoising steps).
"""

from __future__ import annotations

import torch


def heldout_count(tokens: int, fraction: float) -> int:
    """How many of ``tokens`` calibration tokens are held out: ``floor(tokens * fraction)``, or 0
    (no split) when that leaves no token on either side."""
    count = int(tokens * fraction) if fraction > 0 else 0
    return count if 1 <= count < tokens else 0


def split_heldout(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split tokens ``x`` [T, K] into (fitting [T - H, K], held-out [H, K] or None).

    ``H = heldout_count(T, fraction)``; the held-out tokens are the last ``H`` rows (see the
    module docstring). ``None`` when ``H == 0`` (too few tokens, or ``fraction == 0``).
    """
    h = heldout_count(x.shape[0], fraction)
    if h == 0:
        return x, None
    return x[: x.shape[0] - h], x[x.shape[0] - h :]
