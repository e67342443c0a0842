"""Image metrics of a model's images against the reference's, per prompt and over the set.

Every metric reads the 8-bit images as written to the PNGs (uint8 [R, R, 3]), so a rerun that
reuses cached images gives the same numbers.

- PSNR: ``10 log10(255^2 / MSE)`` over all pixels and channels, scikit-image's
  ``peak_signal_noise_ratio`` (``data_range=255``); ``inf`` for identical images.
- SSIM: scikit-image's ``structural_similarity`` with the settings of Wang et al. (2004):
  11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances, averaged
  over the pixels whose window lies inside the image, per channel, then over channels.
- MS-SSIM: torchmetrics' ``multiscale_structural_similarity_index_measure`` (Wang et al. 2003:
  5 scales, weights 0.0448 0.2856 0.3001 0.2363 0.1333); it needs sides of at least 161 pixels
  (the 11-pixel window at the 5th scale), else it is listed as skipped.
- LPIPS, CLIP score, ImageReward, FID: :mod:`.learned`.

The set's value of a per-image metric is the mean over prompts (for PSNR the mean of the
per-image PSNRs, as the SVDQuant paper reports it; ``inf`` when an image is identical to its
reference); FID is computed over the set.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .learned import Learned

SSIM_MIN_SIDE = 11
MS_SSIM_MIN_SIDE = 161
PER_IMAGE = ("psnr", "ssim", "ms_ssim", "lpips", "clip", "image_reward")


def _check(ref: np.ndarray, img: np.ndarray) -> None:
    if ref.dtype != np.uint8 or img.dtype != np.uint8 or ref.shape != img.shape:
        raise ValueError(
            f"images: got {ref.dtype} {ref.shape} and {img.dtype} {img.shape}; expected two "
            "uint8 [H, W, 3] arrays of one size"
        )


def psnr(ref: np.ndarray, img: np.ndarray) -> float:
    """PSNR in dB of uint8 [H, W, 3] ``img`` against ``ref`` (``inf`` when identical)."""
    from skimage.metrics import peak_signal_noise_ratio

    _check(ref, img)
    if np.array_equal(ref, img):
        return math.inf  # scikit-image divides by zero (with a warning) to get the same
    return float(peak_signal_noise_ratio(ref, img, data_range=255))


def ssim(ref: np.ndarray, img: np.ndarray) -> float:
    """Mean SSIM of uint8 [H, W, 3] images (Wang et al. 2004 settings; 1.0 when identical)."""
    from skimage.metrics import structural_similarity

    _check(ref, img)
    return float(
        structural_similarity(
            ref,
            img,
            data_range=255,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
    )


def ms_ssim(ref: np.ndarray, img: np.ndarray) -> float:
    """MS-SSIM of uint8 [H, W, 3] images (sides >= 161), torchmetrics' implementation."""
    import torch
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    _check(ref, img)

    def t(a):
        return torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about float64 inputs on some versions
        value = multiscale_structural_similarity_index_measure(t(img), t(ref), data_range=255.0)
    return float(value)


def pixel_skips(resolution: int) -> dict[str, str]:
    """Pixel metrics that the resolution does not allow, with the reason."""
    out = {}
    if resolution < SSIM_MIN_SIDE:
        out["ssim"] = f"needs images of at least {SSIM_MIN_SIDE} px (the 11-px window)"
    if resolution < MS_SSIM_MIN_SIDE:
        out["ms_ssim"] = (
            f"needs images of at least {MS_SSIM_MIN_SIDE} px (an 11-px window at the 5th scale); "
            f"these are {resolution} px"
        )
    return out


def set_mean(values: list[float | None]) -> float | None:
    """Mean over prompts of a per-image metric (None values, i.e. skipped, are left out)."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def compare(
    label: str,
    reference: list[np.ndarray],
    images: list[np.ndarray],
    prompts: list[str],
    learned: Learned,
    skipped: dict[str, str],
) -> tuple[list[dict], dict]:
    """Per-prompt rows and the set's row of one model against the reference.

    Parameters
    ----------
    reference, images : uint8 [R, R, 3] per prompt
    skipped : metrics not computed (name -> reason), from :func:`pixel_skips` and ``learned``
    """
    rows = []
    for i, (ref, img, prompt) in enumerate(zip(reference, images, prompts)):
        row = {"model": label, "prompt": i, "text": prompt}
        row["psnr"] = psnr(ref, img)
        row["ssim"] = None if "ssim" in skipped else ssim(ref, img)
        row["ms_ssim"] = None if "ms_ssim" in skipped else ms_ssim(ref, img)
        row["lpips"] = learned.lpips(ref, img) if learned.lpips else None
        row["clip"] = learned.clip(img, prompt) if learned.clip else None
        row["image_reward"] = learned.image_reward(img, prompt) if learned.image_reward else None
        rows.append(row)
    total = {"model": label, "prompt": "all", "text": f"{len(prompts)} prompts"}
    for key in PER_IMAGE:
        total[key] = set_mean([r[key] for r in rows])
    total["fid"] = learned.fid(reference, images) if learned.fid else None
    return rows, total


def reference_rows(
    label: str, reference: list[np.ndarray], prompts: list[str], learned: Learned
) -> tuple[list[dict], dict] | None:
    """CLIP score / ImageReward of the reference's own images (the scale the models' are read
    on); None when neither metric runs."""
    if learned.clip is None and learned.image_reward is None:
        return None
    rows = []
    for i, (img, prompt) in enumerate(zip(reference, prompts)):
        row = {"model": f"{label} (reference)", "prompt": i, "text": prompt}
        row["clip"] = learned.clip(img, prompt) if learned.clip else None
        row["image_reward"] = learned.image_reward(img, prompt) if learned.image_reward else None
        rows.append(row)
    total = {"model": f"{label} (reference)", "prompt": "all", "text": f"{len(prompts)} prompts"}
    for key in ("clip", "image_reward"):
        total[key] = set_mean([r[key] for r in rows])
    return rows, total
