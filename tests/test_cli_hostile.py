"""Issue 13's defects of the commands, one test each: a damaged resume state, flags out of range,
bad --model directories, --device cuda without CUDA, an unwritable or full output location,
images from a NaN model, a closed stdout, file modes."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcgen_quant.quantize.streaming as streaming_module
from dcgen_quant.cli import main
from dcgen_quant.models.tiny import tiny_flux, tiny_sana

from .cli_errors import one_line_error
from .quantized_models import CHEAP_CLI as CHEAP

SPILL = ["--calib-cache", "disk"]
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# quantize --resume with a damaged state


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The state directory of a `quantize` run (calibration inputs spilled to disk) interrupted
    in its second block."""
    root = tmp_path_factory.mktemp("interrupted")
    out = root / "q.safetensors"
    calls = {"n": 0}
    original = streaming_module.quantize_block

    def interrupt_in_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # block 0 is saved, block 1 is not
            raise KeyboardInterrupt
        return original(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streaming_module, "quantize_block", interrupt_in_second_block)
        assert main(["quantize", *CHEAP, *SPILL, "--out", str(out)]) == 130
    partial = out.with_name(out.name + ".partial")
    assert (partial / "block-0000.safetensors").is_file()
    assert (partial / "calib" / "gen-0001" / "dyn-000000.pt").is_file()
    return partial


def _flip(path: Path, at: float = 0.5) -> None:
    blob = bytearray(path.read_bytes())
    blob[int(len(blob) * at)] ^= 0x10
    path.write_bytes(bytes(blob))


def _edit_progress(path: Path) -> None:
    progress = json.loads(path.read_text())
    progress["next_block"] = progress["next_block"] + 1  # valid JSON, a lie
    path.write_text(json.dumps(progress))


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage,file",
    [
        (lambda d: _flip(d / "block-0000.safetensors", 0.9), "block-0000.safetensors"),
        (lambda d: (d / "block-0000.safetensors").write_bytes(
            (d / "block-0000.safetensors").read_bytes()[:1000]), "block-0000.safetensors"),
        (lambda d: (d / "progress.json").write_text("{trunc"), "progress.json"),
        (lambda d: _edit_progress(d / "progress.json"), "progress.json"),
        (lambda d: _flip(d / "calib" / "gen-0001" / "dyn-000000.pt", 0.7),
         "calib/gen-0001/dyn-000000.pt"),
        (lambda d: _flip(d / "calib" / "static-000000.pt", 0.7), "calib/static-000000.pt"),
    ],
)  # fmt: skip
def test_damaged_resume_state_is_named_and_never_becomes_a_checkpoint(
    interrupted, tmp_path, capsys, damage, file
):
    out = tmp_path / "q.safetensors"
    partial = out.with_name(out.name + ".partial")
    shutil.copytree(interrupted, partial)
    damage(partial)
    assert main(["quantize", *CHEAP, *SPILL, "--out", str(out), "--resume"]) == 2
    one_line_error(capsys, file, "without --resume")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# flags out of range, devices, bad --model directories


def test_rank_above_what_the_layers_hold_is_refused_not_clamped(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert main(["quantize", *CHEAP, "--rank", "100000", "--out", str(out)]) == 2
    one_line_error(capsys, "--rank 100000", "min(N, K) = 256")
    assert not out.exists()


@pytest.mark.parametrize("argv", [["quantize", *CHEAP], ["generate", "--model", "x", "--prompt",
                                                         "p", "--out", "o"]])  # fmt: skip
def test_device_cuda_without_cuda_isone_line_error(tmp_path, capsys, argv):
    from dcgen_quant.capabilities import cuda_unavailable

    if cuda_unavailable() is None:
        pytest.skip("this machine has CUDA")
    argv = [a if a not in ("x", "o") else str(tmp_path / a) for a in argv]
    if argv[0] == "generate":
        (tmp_path / "x").mkdir()
    assert main([*argv, "--device", "cuda"]) == 2
    one_line_error(capsys, "--device cuda", "CPU-only")
    assert main([*argv, "--device", "tpu:7"]) == 2
    one_line_error(capsys, "--device 'tpu:7'")


def _weights(path: Path) -> Path:
    return next(path.glob("*.safetensors"))


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda p: (p / "config.json").write_text("[]"), "config.json holds a JSON list"),
        (lambda p: (p / "config.json").write_text('{"_class_name": '), "config.json is not valid"),
        (lambda p: _weights(p).unlink(), "cannot load SanaTransformer2DModel"),
        (lambda p: _weights(p).write_bytes(_weights(p).read_bytes()[:5000]),
         "cannot load SanaTransformer2DModel"),
        (lambda p: (p / "model_index.json").write_text("{,"), "model_index.json is not valid"),
        (lambda p: (p / "model_index.json").write_text('{"transformer": 3}'),
         "the pipeline has no transformer"),
    ],
)  # fmt: skip
def test_bad_model_directories_areone_line_error(tmp_path, capsys, make, fragment):
    model_dir = tmp_path / "m"
    tiny_sana().save_pretrained(model_dir)
    make(model_dir)
    out = tmp_path / "q.safetensors"
    assert main(["quantize", *CHEAP, "--model", str(model_dir), "--out", str(out)]) == 2
    one_line_error(capsys, f"--model {str(model_dir)!r}", fragment)


# --------------------------------------------------------------------------------------------
# output locations


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permissions; sysfs refuses new files to root too
        if not Path("/sys").is_dir():
            pytest.skip("no unwritable location for root here")
        return Path("/sys/dcgen-quant-test/q.safetensors")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "q.safetensors"


def test_unwritable_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("quantization started before the output location was checked")

    monkeypatch.setattr("dcgen_quant.quantize.cli._calibration", no_work)
    monkeypatch.setattr("dcgen_quant.quantize.streaming.quantize_streaming", no_work)
    out = _unwritable(tmp_path)
    assert main(["quantize", *CHEAP, "--out", str(out)]) == 2
    one_line_error(capsys, "not writable")


def test_full_disk_isone_line_error(tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError; the command says the disk is full."""
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")  # fmt: skip

    for name in ("dcgen_quant.checkpoint_files", "dcgen_quant.checkpoint"):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            if hasattr(module, "save_file"):  # whichever module writes the files
                monkeypatch.setattr(module, "save_file", full)
    out = tmp_path / "q.safetensors"
    assert main(["quantize", *CHEAP, "--out", str(out)]) == 2
    one_line_error(capsys, "no space left", str(out))
    assert not out.exists() and not list(tmp_path.glob(".q.safetensors.tmp-*"))


def _small_quantized_flux():
    """The small quantized FLUX of tests/data (loads in well under a second)."""
    import warnings

    from dcgen_quant.checkpoint import load_quantized

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a file of the previous version: no header checksum
        return load_quantized(ROOT / "tests" / "data" / "legacy_v1_nvfp4.safetensors")


def test_checkpoints_get_the_umask_mode(tmp_path):
    from dcgen_quant.checkpoint import save_quantized

    model = _small_quantized_flux()
    old = os.umask(0o022)
    try:
        single = save_quantized(model, tmp_path / "m.safetensors")
        sharded = save_quantized(model, tmp_path / "d", max_shard_bytes=100_000)
    finally:
        os.umask(old)
    assert stat.S_IMODE(single.stat().st_mode) == 0o644
    assert stat.S_IMODE(sharded.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in sharded.iterdir()} == {0o644}


# --------------------------------------------------------------------------------------------
# generate, inspect


def test_generate_refuses_to_write_images_from_a_nan_model(tmp_path, capsys):
    from dcgen_quant.adapt.demo import tiny_dc

    tiny_dc(0, 32, 4).save_pretrained(tmp_path / "ae")
    model = tiny_flux(seed=0, in_channels=32)
    with torch.no_grad():
        model.proj_out.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "flux")
    argv = ["generate", "--model", str(tmp_path / "flux"), "--ae", str(tmp_path / "ae"),
            "--prompt", "a cat", "--out", str(tmp_path / "img"), "--resolution", "64",
            "--steps", "2"]  # fmt: skip
    assert main(argv) == 2
    one_line_error(capsys, "NaN/Inf")
    assert not list(tmp_path.glob("img/*.png"))


def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path):
    from dcgen_quant.checkpoint import save_quantized

    path = save_quantized(_small_quantized_flux(), tmp_path / "m.safetensors")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcgen_quant", "inspect", "--json", "--layers", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    proc.stdout.close()  # as `| head` does once it has read enough
    err = proc.stderr.read().decode()
    proc.wait(timeout=600)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141
