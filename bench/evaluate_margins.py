"""SVDQuant against plain round-to-nearest W4A4, measured in the image (``evaluate``'s PSNR).

    python -m bench.evaluate_margins [--family flux sana] [--seeds 0 1 2 3 4] [--out DIR]

For each family, on CPU in about a minute: a tiny model saved as a diffusers pipeline (tiny text
encoders and autoencoder, :mod:`dcgen_quant.models.tiny_pipeline`); calibration inputs captured
by running that pipeline on two prompts that are not evaluated; an SVDQuant INT4 checkpoint
(``QuantConfig(format="int4")`` with the quick search settings of the tests) and a plain RTN
W4A4 checkpoint (``rank=0, smooth=False, gptq=False, clip=False``) from the same calibration; then
``evaluate`` of both against the 16-bit pipeline, one run per seed, two prompts each. Prints
per seed the set PSNR of both and the margin. The tests (tests/evaluate) use the same builders
at seed 0.

Models: SANA is the embedded tiny SANA. FLUX is the embedded tiny FLUX with its input embedder
(``x_embedder``, kept in 16 bits) scaled by 1/8: in the embedded one the random blocks add only
~7% to the velocity (the embedder's output dominates the residual stream; measured as the
change of the output when the blocks are removed), so its images hardly depend on the 4-bit
layers at all (both checkpoints ~56 dB); scaled, the blocks carry the output as in a trained
FLUX.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import torch

QUICK = {"smooth_grid": 2, "lowrank_iters": 1, "calib_tokens": 512, "search_tokens": 256}
FLUX_EMBEDDER_SCALE = 0.125
CALIB_PROMPTS = ("a photo of a red fox in fresh snow", "an isometric city on an island")
EVAL_PROMPTS = ("a lighthouse at night", "a bowl of ramen on a table")
RESOLUTION, STEPS, CALIB_STEPS = 32, 4, 2
GUIDANCE = {"flux": 3.5, "sana": 4.5}


def tiny_pipeline(family: str, dtype: torch.dtype = torch.float32):
    """The family's tiny pipeline; FLUX with the input embedder scaled (module docstring)."""
    from dcgen_quant.models.tiny_pipeline import tiny_flux_pipeline, tiny_sana_pipeline

    if family == "sana":
        return tiny_sana_pipeline(seed=0, dtype=dtype)
    pipe = tiny_flux_pipeline(seed=0)
    with torch.no_grad():
        pipe.transformer.x_embedder.weight.mul_(FLUX_EMBEDDER_SCALE)
        pipe.transformer.x_embedder.bias.mul_(FLUX_EMBEDDER_SCALE)
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        getattr(pipe, part).to(dtype)
    return pipe


def pipeline_calibration(pipe, family: str) -> list[dict]:
    """Transformer inputs of the pipeline drawing CALIB_PROMPTS (what ``quantize --prompts``
    captures for a pipeline)."""
    from dcgen_quant.models.calibration import capture_pipeline_calibration

    pipe.set_progress_bar_config(disable=True)
    kwargs = {"height": RESOLUTION, "width": RESOLUTION, "max_sequence_length": 32,
              "guidance_scale": GUIDANCE[family]}  # fmt: skip
    if family == "sana":
        kwargs.update(complex_human_instruction=None, use_resolution_binning=False)
    return capture_pipeline_calibration(pipe, list(CALIB_PROMPTS), CALIB_STEPS, **kwargs)


def build(family: str, root: str | Path) -> dict[str, Path]:
    """Write ``root/pipeline`` (16-bit, float32), ``root/svdquant.safetensors`` and
    ``root/rtn.safetensors`` (bfloat16 16-bit parts); returns the three paths."""
    import copy

    from dcgen_quant.checkpoint import save_quantized
    from dcgen_quant.quantize import QuantConfig, quantize_model

    root = Path(root)
    tiny_pipeline(family).save_pretrained(root / "pipeline")
    pipe = tiny_pipeline(family, torch.bfloat16)
    calib = pipeline_calibration(pipe, family)
    out = {"pipeline": root / "pipeline"}
    rtn = QuantConfig(format="int4", rank=0, smooth=False, gptq=False, clip=False)
    configs = {"svdquant": QuantConfig(format="int4", **QUICK), "rtn": rtn}
    for name, config in configs.items():
        model = copy.deepcopy(pipe.transformer)
        report = quantize_model(model, calib, config, progress=False)
        out[name] = save_quantized(model, root / f"{name}.safetensors", config, report)
    return out


def write_prompts(path: Path) -> Path:
    path.write_text("\n".join(EVAL_PROMPTS) + "\n")
    return path


def evaluate(paths: dict[str, Path], prompts: Path, out: Path, seed: int) -> dict:
    """``evaluate --json`` of both checkpoints against the pipeline; the JSON document."""
    from dcgen_quant.cli import main

    argv = ["evaluate", "--model", str(paths["svdquant"]), "--model", str(paths["rtn"]),
            "--reference", str(paths["pipeline"]), "--prompts", str(prompts), "--steps",
            str(STEPS), "--resolution", str(RESOLUTION), "--seed", str(seed), "--out", str(out),
            "--threads", "1", "--json"]  # fmt: skip
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"evaluate failed (exit {code})")
    return json.loads(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", nargs="+", default=["flux", "sana"], choices=["flux", "sana"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        prompts = write_prompts(root / "prompts.txt")
        for family in args.family:
            paths = build(family, root / family)
            print(f"{family}: set PSNR (mean of {len(EVAL_PROMPTS)} prompts), dB")
            print("seed  svdquant     rtn  margin  per-prompt margins")
            for seed in args.seeds:
                doc = evaluate(paths, prompts, root / family / "eval", seed)
                t = {row["model"]: row["psnr"] for row in doc["totals"]}
                per = {r["model"]: [] for r in doc["rows"]}
                for r in doc["rows"]:
                    per[r["model"]].append(r["psnr"])
                s, r = t["svdquant"], t["rtn"]
                margins = ", ".join(f"{a - b:+.2f}" for a, b in zip(per["svdquant"], per["rtn"]))
                print(f"{seed:4d}  {s:8.2f}  {r:6.2f}  {s - r:+6.2f}  {margins}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
