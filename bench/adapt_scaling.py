"""Data-parallel speed of ``adapt``: the same stage with 1 process and with torchrun's 2.

``python -m dcgen_quant.bench.adapt_scaling [--out DIR] [--steps N] [--batch-size B]
[--resolution R] [--stage head|lora] [--json]``

Builds small inputs (scikit-image crops, the demo's tiny FLUX and tiny autoencoders, random
weights) and trains one stage twice with ``python -m dcgen_quant adapt``: once in one process,
once under ``torchrun --standalone --nproc-per-node 2``; every process single-threaded
(``OMP_NUM_THREADS=1``), so two ranks use two cores where one process used one. The global
batch is the same, so both runs take the same steps (their final weights are compared); each
rank computes half of every batch. A control runs two independent single processes at once, each
with half the batch and no communication: what the machine lets two processes do. Reported: the
stage's training time (``seconds`` in ``adapt.json``: model build to gathered parameters, no
process start-up or data encoding), the whole command's wall time, and the ratios 2 processes /
1 process (ideal 0.5) and control / 1 process (0.5 on an idle 2-core machine).

Timings need an otherwise idle machine with at least 2 cores; the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NAME = "adapt_scaling"


def build_inputs(root: Path) -> dict[str, str]:
    """Training / held-out images and tiny models (random weights) under ``root``."""
    from dcgen_quant.adapt.demo import DEMO_FLUX, tiny_dc, tiny_kl, write_images
    from dcgen_quant.models.tiny import tiny_flux

    images = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "camera": "a camera"}
    write_images(root / "data", images, 8, 160, seed=0)
    write_images(root / "heldout", {"rocket": "a rocket"}, 2, 160, seed=1)
    tiny_kl(0).save_pretrained(root / "base_ae")
    tiny_dc(1, 32, 5).save_pretrained(root / "target_ae")
    tiny_flux(**DEMO_FLUX).save_pretrained(root / "base")
    return {k: str(root / k) for k in ("data", "heldout", "base_ae", "target_ae", "base")}


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return env


def _run_all(cmds: list[tuple[list[str], Path]]) -> list[dict]:
    """Start the commands at once, wait for all; (wall seconds, adapt.json) of each."""
    t0 = time.perf_counter()
    procs = []
    for cmd, path in cmds:
        path.mkdir(parents=True, exist_ok=True)
        log = open(path.with_suffix(".log"), "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=log, env=_env()), log))
    out = []
    for (cmd, path), (proc, log) in zip(cmds, procs):
        proc.wait()
        log.close()
        if proc.returncode != 0:
            tail = path.with_suffix(".log").read_text()[-2000:]
            raise RuntimeError(f"{' '.join(cmd[:6])}... failed:\n{tail}")
        state = json.loads((path / "adapt.json").read_text())
        out.append({"wall_s": round(time.perf_counter() - t0, 2), "state": state})
    return out


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from dcgen_quant.atomic import atomic_write_text
    from dcgen_quant.tables import format_table

    ap = argparse.ArgumentParser(prog="python -m dcgen_quant.bench.adapt_scaling")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--stage", choices=("head", "lora"), default="lora")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="adapt-scaling-") as tmp:
        tmp = Path(tmp)
        inputs = build_inputs(tmp / "inputs")
        common = ["adapt", "--base", inputs["base"], "--base-ae", inputs["base_ae"]]
        common += ["--target-ae", inputs["target_ae"], "--data", inputs["data"]]
        common += ["--heldout", inputs["heldout"], "--stage", args.stage, "--no-report"]
        common += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        common += ["--resolution", str(args.resolution), "--rank", "16", "--text-length", "16"]
        common += ["--ckpt-every", str(10 * args.steps)]
        launchers = {
            1: [sys.executable, "-m", "dcgen_quant"],
            2: [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + ["--nproc-per-node=2", "-m", "dcgen_quant"],
        }
        for n, launcher in launchers.items():
            out = tmp / f"run{n}"
            (results[n],) = _run_all([([*launcher, *common, "--out", str(out)], out)])
            results[n]["params"] = load_file(str(out / args.stage / "params.safetensors"))
        # control: two independent single processes at once, half the batch each (what the
        # machine allows two processes to do with no communication at all)
        half = [a if a != str(args.batch_size) else str(args.batch_size // 2) for a in common]
        pair = [([*launchers[1], *half, "--out", str(tmp / f"half{i}")], tmp / f"half{i}")
                for i in range(2)]  # fmt: skip
        control = _run_all(pair)
    a, b = results[1]["params"], results[2]["params"]
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    rows = []
    for n in (1, 2):
        st = results[n]["state"]["stages"][args.stage]
        rows.append(
            {
                "processes": n,
                "threads": 1,
                "rows_per_process": args.batch_size // n,
                "stage_s": st["seconds"],
                "wall_s": results[n]["wall_s"],
            }
        )
    rows.append(
        {
            "processes": "2 independent",
            "threads": 1,
            "rows_per_process": args.batch_size // 2,
            "stage_s": max(c["state"]["stages"][args.stage]["seconds"] for c in control),
            "wall_s": max(c["wall_s"] for c in control),
        }
    )
    ratio = rows[1]["stage_s"] / rows[0]["stage_s"]
    ideal = rows[2]["stage_s"] / rows[0]["stage_s"]
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
    }
    doc = {
        "environment": env,
        "settings": vars(args),
        "runs": rows,
        "ratio_2_over_1": round(ratio, 3),
        "ratio_independent_over_1": round(ideal, 3),
        "max_abs_weight_difference": max_diff,
    }
    title = (
        f"stage {args.stage}, {args.steps} steps of batch {args.batch_size} at "
        f"{args.resolution} px, tiny FLUX; 2 processes / 1 process = {ratio:.3f} (two "
        f"independent half-batch processes at once / 1 process = {ideal:.3f})"
    )
    cols = [
        ("processes", "processes", None),
        ("threads", "threads each", None),
        ("rows_per_process", "rows/step each", None),
        ("stage_s", "stage s", ".2f"),
        ("wall_s", "command s", ".2f"),
    ]
    text = format_table(rows, cols, title=title)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{NAME}-cpu-{env['date'][:10]}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
    atomic_write_text(
        stem.with_suffix(".md"),
        f"# adapt data-parallel speed ({env['date']}, load average "
        f"{env['load_average_1min']:.2f} on {env['cpu_count']} cores)\n\n"
        f"`python -m dcgen_quant.bench.adapt_scaling`\n\n```\n{text}\n```\n"
        f"final weights, 2 vs 1 process: max abs difference {max_diff:.2e}\n",
    )
    print(json.dumps(doc, indent=1) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
