"""``grid.png`` (images side by side) and ``layers.png`` (per-layer quantization error map).

grid.png: one row per prompt; columns: the reference, then for every model its image and the
amplified difference ``min(255, 8 * mean_c |model - reference|)`` (gray). Under each model image:
its PSNR and LPIPS against the reference ("-" when LPIPS is skipped). Images smaller than 128 px
are enlarged by an integer factor (nearest neighbour, so pixels stay visible); larger than 256 px
are reduced to 256 px (Lanczos). Size: :func:`grid_size`.

layers.png: for every 4-bit checkpoint among the models, a heat map of the relative output error
``err_svdq`` that ``quantize`` measured per layer on its calibration inputs (checkpoint metadata
``calibration.layers``): rows are transformer blocks, columns layer kinds (the name within the
block, e.g. ``attn.to_q``); empty cells (no such layer) are blank. Size: :func:`layers_size`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

DIFF_GAIN = 8
PAD = 6
HEADER = 16
LINE = 14
CAPTION = 2 * LINE
_BLOCK = re.compile(r"^(.*?blocks\.(\d+))\.(.+)$")


def tile_size(resolution: int) -> int:
    """Side in pixels at which one image is drawn in grid.png."""
    if resolution < 128:
        return resolution * math.ceil(128 / resolution)
    return min(resolution, 256)


def grid_size(n_prompts: int, n_models: int, resolution: int) -> tuple[int, int]:
    """(width, height) of grid.png."""
    t = tile_size(resolution)
    cols = 1 + 2 * n_models
    return PAD + cols * (t + PAD), PAD + HEADER + n_prompts * (LINE + t + CAPTION + PAD)


def _fit(draw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _tile(pixels: np.ndarray, t: int):
    from PIL import Image

    im = Image.fromarray(pixels)
    if im.width == t:
        return im
    method = Image.Resampling.NEAREST if t > im.width else Image.Resampling.LANCZOS
    return im.resize((t, t), method)


def difference(ref: np.ndarray, img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] gray image of ``DIFF_GAIN`` x the mean absolute channel difference."""
    d = np.abs(img.astype(np.int16) - ref.astype(np.int16)).mean(axis=-1) * DIFF_GAIN
    gray = np.clip(np.round(d), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def write_grid(
    path: Path,
    prompts: list[str],
    reference: tuple[str, list[np.ndarray]],
    models: list[tuple[str, list[np.ndarray], list[dict]]],
) -> tuple[int, int]:
    """Draw grid.png (atomically); returns its (width, height).

    Parameters
    ----------
    reference : (label, uint8 [R, R, 3] per prompt)
    models : (label, uint8 images per prompt, metric rows per prompt with "psnr" / "lpips")
    """
    from PIL import Image, ImageDraw, ImageFont

    from ..atomic import atomic_path

    res = reference[1][0].shape[0]
    t = tile_size(res)
    size = grid_size(len(prompts), len(models), res)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    titles = [f"{reference[0]} (reference)"]
    for label, _, _ in models:
        titles += [label, f"difference x{DIFF_GAIN}"]
    for c, title in enumerate(titles):
        draw.text((PAD + c * (t + PAD), PAD), _fit(draw, title, t, font), fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y = PAD + HEADER + i * (LINE + t + CAPTION + PAD)
        line = _fit(draw, f"{i}: {prompt}", size[0] - 2 * PAD, font)
        draw.text((PAD, y), line, fill="black", font=font)
        y += LINE
        canvas.paste(_tile(reference[1][i], t), (PAD, y))
        for m, (_, images, rows) in enumerate(models):
            x = PAD + (1 + 2 * m) * (t + PAD)
            canvas.paste(_tile(images[i], t), (x, y))
            canvas.paste(_tile(difference(reference[1][i], images[i]), t), (x + t + PAD, y))
            texts = (f"PSNR {_fmt(rows[i].get('psnr'), '.2f')} dB",
                     f"LPIPS {_fmt(rows[i].get('lpips'), '.4f')}")  # fmt: skip
            for k, text in enumerate(texts):
                draw.text((x, y + t + 1 + k * LINE), _fit(draw, text, t, font), fill="black",
                          font=font)  # fmt: skip
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return size


# --------------------------------------------------------------------------------------------
# layers.png


def error_matrix(calibration: dict) -> tuple[list[str], list[str], np.ndarray] | None:
    """(blocks, kinds, float64 [blocks, kinds] err_svdq with NaN for absent layers) of a
    checkpoint's calibration report, or None when it has no per-layer errors."""
    entries = []
    for layer in calibration.get("layers") or []:
        err = layer.get("err_svdq") if isinstance(layer, dict) else None
        if not isinstance(err, (int, float)) or not math.isfinite(err):
            continue
        m = _BLOCK.match(str(layer.get("name", "")))
        block, kind = (m.group(1), m.group(3)) if m else ("other", str(layer.get("name")))
        entries.append((block, kind, float(err)))
    if not entries:
        return None
    blocks = list(dict.fromkeys(b for b, _, _ in entries))
    kinds = list(dict.fromkeys(k for _, k, _ in entries))
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for b, k, e in entries:
        grid[blocks.index(b), kinds.index(k)] = e
    return blocks, kinds, grid


def _panel_px(n_blocks: int) -> int:
    return 150 + 24 * n_blocks


def layers_size(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """(width, height) of layers.png for panels of (blocks, kinds)."""
    kinds = max(k for _, k in shapes)
    return 260 + 48 * kinds, 40 + sum(_panel_px(b) for b, _ in shapes)


def write_layers(path: Path, panels: list[tuple[str, dict]]) -> tuple[int, int] | None:
    """Draw layers.png (atomically) for (label, calibration report) of each checkpoint;
    returns its (width, height), or None (nothing written) when no report has per-layer errors."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    mats = [(label, m) for label, cal in panels if (m := error_matrix(cal)) is not None]
    if not mats:
        return None
    size = layers_size([(len(b), len(k)) for _, (b, k, _) in mats])
    vmax = max(float(np.nanmax(g)) for _, (_, _, g) in mats)
    fig = plt.figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    top = 1 - 30 / size[1]
    for label, (blocks, kinds, grid) in mats:
        h = _panel_px(len(blocks)) / size[1]
        # below each heat map: rotated layer-kind labels (105 px); above it: the title (30 px)
        ax = fig.add_axes((170 / size[0], top - h + 105 / size[1], 1 - 260 / size[0],
                           h - 135 / size[1]))  # fmt: skip
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=vmax,
                       aspect="auto", interpolation="nearest")  # fmt: skip
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
        ax.set_title(f"{label}: relative output error per layer (calibration)", fontsize=9)
        if grid.size <= 600:
            for (r, c), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    color = "white" if v < 0.6 * vmax else "black"
                    ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=6, color=color)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
        top -= h
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return size
