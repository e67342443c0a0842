"""``torchrun --nproc-per-node 2`` (gloo, CPU) against one process, on the tiny FLUX chain.

The same global batch must give the same optimization with 1 or 2 processes (and with gradient
accumulation), all three stages; a checkpoint written by 2 processes resumes in 1 and the other
way. Tolerance: rtol 1e-5, atol 1e-6 on every trained parameter and loss, the one the
single-process interrupt/resume test uses. Why it is not 0: with 2 processes each rank runs
the model on 2 of the 4 rows, and batched matmuls over 2 rows sum in another order than over 4
(and with --grad-accum 2, over 1 row); the rank gradients are then summed by the all-reduce.
Measured on one backward of this model: 5e-6 of the largest gradient element at most (float32
eps 1.2e-7, through four blocks and attention). AdamW turns such gradients into updates of
about lr = 1e-3 times a relative error of that size, far below the tolerance after 4 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcgen_quant.adapt.distributed import Dist

from .helpers import chain_args, run_cli

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_cli.py")
COMMON = ("--stage", "all", "--steps", "4", "--ckpt-every", "2", "--ema", "0.9", "--no-report")
TOL = {"rtol": 1e-5, "atol": 1e-6}


def torchrun(argv: list[str], nproc: int = 2, stop_at: str | None = None):
    """Run ``python -m dcgen_quant`` in ``nproc`` processes started by torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", str(WORKER)]
    cmd += ["--stop-at", stop_at] if stop_at else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [*cmd, *argv], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT
    )


def assert_same_stage(a: Path, b: Path, stage: str) -> None:
    pa = load_file(str(a / stage / "params.safetensors"))
    pb = load_file(str(b / stage / "params.safetensors"))
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], **TOL, msg=f"{stage}: {k}")
    sa = json.loads((a / "adapt.json").read_text())["stages"][stage]
    sb = json.loads((b / "adapt.json").read_text())["stages"][stage]
    for key in ("first_loss", "final_loss"):
        assert sb[key] == pytest.approx(sa[key], rel=TOL["rtol"]), (stage, key)


def assert_same_model(a: Path, b: Path) -> None:
    (fa,) = (a / "model").glob("*.safetensors")
    (fb,) = (b / "model").glob("*.safetensors")
    ta, tb = load_file(str(fa)), load_file(str(fb))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], **TOL, msg=k)


def test_rows_split_the_global_batch():
    for world in (1, 2, 4):
        parts = [Dist(rank=r, world=world).rows(8) for r in range(world)]
        assert torch.equal(torch.cat(parts), torch.arange(8))
        assert {len(p) for p in parts} == {8 // world}
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        Dist(rank=0, world=3).rows(8)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_across_process_counts(
    flux_inputs, tmp_path, capsys, step_hooks
):
    ref = tmp_path / "ref"
    code, _, err = run_cli(chain_args(flux_inputs, ref, *COMMON), capsys)
    assert code == 0, err

    # 2 processes, interrupted (on both ranks) after step 3 of stage 3: stages 1 and 2 are done,
    # stage 3 keeps its periodic checkpoint of step 2, written by the 2 processes
    run = tmp_path / "run"
    res = torchrun(chain_args(flux_inputs, run, *COMMON), stop_at="lora:3")
    assert res.returncode != 0 and "interrupted" in res.stderr, res.stderr[-3000:]
    meta = json.loads((run / "lora" / "ckpt" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["world_size"] == 2
    state = json.loads((run / "adapt.json").read_text())
    assert state["stages"]["head"]["processes"] == 2
    assert state["stages"]["head"]["micro_batch"] == 2  # 4 rows split over 2
    for stage in ("align", "head"):
        assert_same_stage(ref, run, stage)

    # resumed by 1 process, which is interrupted after step 3 (and checkpoints that step) ...
    def hook(name, done):
        if (name, done) == ("lora", 3):
            raise KeyboardInterrupt("injected")

    step_hooks.append(hook)
    code, _, _ = run_cli(chain_args(flux_inputs, run, *COMMON, "--resume"), capsys)
    assert code == 130
    step_hooks.clear()
    meta = json.loads((run / "lora" / "ckpt" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 1

    # ... and finished by 2 processes with 2 micro-batches each (one row per micro-batch) and
    # activation checkpointing (recomputed blocks under FSDP: still the same gradients)
    argv = chain_args(flux_inputs, run, *COMMON, "--resume", "--grad-accum", "2", "--json")
    argv.append("--grad-checkpoint")
    res = torchrun(argv)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"model":') == 1  # rank 0 alone prints (and writes)
    lora = json.loads((run / "adapt.json").read_text())["stages"]["lora"]
    assert lora["resumed_from"] == 3 and lora["processes"] == 2 and lora["micro_batch"] == 1
    assert_same_stage(ref, run, "lora")
    assert_same_model(ref, run)
