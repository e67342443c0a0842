"""``python -m dcgen_quant evaluate``: does a 4-bit (or DC-Gen) model still draw the reference's
images? (docs/EVALUATE.md)

One entry point, :mod:`dcgen_quant.evaluate.cli`. Modules:

- :mod:`.sources`: what ``--model`` / ``--reference`` name (checkpoint, pipeline, transformer,
  embedded tiny model), described from their files; the default reference; compatibility checks
- :mod:`.images`: prompts, the image cache and generation with identical seeds and text
- :mod:`.metrics`: PSNR, SSIM, MS-SSIM and the per-prompt / per-set tables
- :mod:`.learned`: LPIPS, CLIP score, ImageReward, FID where local weights exist
- :mod:`.lpips`: the LPIPS network (AlexNet layout, loads the published weights)
- :mod:`.pictures`: grid.png and layers.png
"""
