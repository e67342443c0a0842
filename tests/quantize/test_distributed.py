"""``torchrun --nproc-per-node 2 -m dcgen_quant quantize`` on the CPU (gloo): the checkpoint of one
process bit for bit, on tiny FLUX and tiny SANA; a rank killed mid-run and the run resumed gives
the same bits again. One CPU thread per process everywhere (the bits of a CPU matmul may depend
on the thread count, not on the number of processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcgen_quant.cli import main

from .test_streaming import assert_same_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--rank", "4", "--smooth-grid", "1", "--lowrank-iters", "0", "--calib-tokens", "32",
        "--threads", "1", "--steps", "1", "--calib-samples", "3"]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "dcgen_quant", "quantize", *args]  # fmt: skip


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the launcher's children (by its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0") if ppid == launcher else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process checkpoint of each tiny model (3 samples: rank 0 gets 2, rank 1 one)."""
    made: dict[str, Path] = {}

    def checkpoint(model: str) -> Path:
        if model not in made:
            out = tmp_path_factory.mktemp("one") / f"{model}.safetensors"
            assert main(["quantize", "--model", model, *FAST, "--out", str(out)]) == 0
            made[model] = out
        return made[model]

    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sana"])
def test_two_ranks_write_the_one_process_checkpoint(tmp_path, model, one_process):
    out = tmp_path / "two.safetensors"
    done = subprocess.run(_torchrun("--model", model, *FAST, "--out", str(out), "--json"),
                          env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout)["rows"][0]  # rank 0 alone prints the summary
    assert row["ranks"] == 2 and row["model"] == model
    assert done.stderr.count("plan: ") == 1
    assert_same_checkpoint(one_process(model), out)
    assert not out.with_name(out.name + ".partial").exists()


@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_same_bits(tmp_path, one_process):
    out = tmp_path / "two.safetensors"
    progress = out.with_name(out.name + ".partial") / "progress.json"
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        launcher = subprocess.Popen(_torchrun("--model", "tiny-flux", *FAST, "--out", str(out)),
                                    env=_env(), stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            victim, deadline = None, time.monotonic() + 300
            while victim is None and time.monotonic() < deadline and launcher.poll() is None:
                if progress.is_file() and json.loads(progress.read_text())["next_block"] >= 1:
                    victim = _rank_pid(launcher.pid, 1)
                time.sleep(0.02)
            assert victim is not None, "the run ended or stalled before block 0 was saved"
            os.kill(victim, signal.SIGKILL)  # rank 1 dies in the middle of a later block
            launcher.wait(timeout=300)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    assert launcher.returncode != 0 and not out.exists(), log.read_text()[-2000:]
    finished = json.loads(progress.read_text())["next_block"]
    assert 1 <= finished < 4

    # rerun with --resume under torchrun again: the finished blocks are kept, each rank
    # recomputes the next block's inputs of its own samples through them (rank 0 has 2 of 3)
    done = subprocess.run(_torchrun("--model", "tiny-flux", *FAST, "--out", str(out), "--resume"),
                          env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resume: recomputing block {finished}'s inputs of 2 samples" in done.stderr
    assert_same_checkpoint(one_process("tiny-flux"), out)
    assert not out.with_name(out.name + ".partial").exists()
