"""RunState: which state directories a run accepts (the resume itself: test_model.py)."""

import json

import pytest
import torch

from dcgen_quant.quantize.state import RunState, fingerprint, replace_module

FP = {"model": "m", "weights": "w", "quant_config": "q", "calibration": "c"}


def test_new_and_foreign_state_dirs(tmp_path):
    assert RunState(tmp_path / "missing", FP).load() is None
    d = tmp_path / "state"
    d.mkdir()
    # leftovers of a run killed during its first block do not block a new run
    (d / ".block-0000.safetensors.tmp-abc").write_bytes(b"partial")
    (d / "block-0000.safetensors").write_bytes(b"stale")
    assert RunState(d, FP).load() is None
    (d / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"no progress.json but other files \(notes.txt\)"):
        RunState(d, FP).load()


def test_progress_checks(tmp_path):
    from dcgen_quant.quantize.state import VERSION, progress_sha256

    def write(progress, seal=True):
        if seal:
            progress = {**progress, "sha256": progress_sha256(progress)}
        (tmp_path / "progress.json").write_text(json.dumps(progress))

    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match="progress.json is unreadable.*without --resume"):
        RunState(tmp_path, FP).load()
    write({"version": 99, "fingerprint": FP})
    with pytest.raises(ValueError, match=f"progress.json has version 99 .*writes {VERSION}"):
        RunState(tmp_path, FP).load()
    write({"version": VERSION, "fingerprint": FP}, seal=False)
    with pytest.raises(ValueError, match="progress.json does not match its SHA-256"):
        RunState(tmp_path, FP).load()
    write({"version": VERSION, "fingerprint": FP})
    assert RunState(tmp_path, FP).load()["fingerprint"] == FP
    other = {**FP, "calibration": "x", "weights": "y"}
    with pytest.raises(ValueError, match=r"different run \(weights, calibration differ\)"):
        RunState(tmp_path, other).load()


def test_fingerprint_sees_weights_config_and_calibration():
    from dcgen_quant.quantize import QuantConfig

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    calib = [{"x": torch.ones(2)}]
    base = fingerprint(model, calib, QuantConfig())
    assert fingerprint(model, calib, QuantConfig()) == base
    assert fingerprint(model, calib, QuantConfig(rank=8))["quant_config"] != base["quant_config"]
    assert (
        fingerprint(model, [{"x": torch.zeros(2)}], QuantConfig())["calibration"]
        != base["calibration"]
    )
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    assert fingerprint(model, calib, QuantConfig())["weights"] != base["weights"]


def test_replace_module_in_module_lists():
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2))])
    new = torch.nn.Identity()
    replace_module(root, "blocks.0.0", new)
    assert root.get_submodule("blocks.0.0") is new
