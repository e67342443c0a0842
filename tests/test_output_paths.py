"""`--out` never destroys what it did not write (issue 13's data-loss defect).

Before the fix, `quantize --out DIR` with an existing directory replaced the whole directory by
the checkpoint shards (exit 0), and a fresh run deleted any `<out>.partial` directory.
"""

import pytest
import torch
from safetensors.torch import save_file

from dcgen_quant.adapt.surgery import save_adapted
from dcgen_quant.atomic import TargetExistsError, atomic_path
from dcgen_quant.checkpoint import check_output, save_quantized
from dcgen_quant.cli import main
from dcgen_quant.models.tiny import tiny_flux

from .quantized_models import CHEAP_CLI as CHEAP
from .quantized_models import randomly_quantized_tiny_flux


def _quantize(out, *extra):
    return main(["quantize", *CHEAP, "--out", str(out), *extra])


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_quantize_into_an_existing_directory_keeps_its_files(tmp_path, capsys):
    users = tmp_path / "photos"
    users.mkdir()
    (users / "holiday.jpg").write_bytes(b"irreplaceable")
    assert _quantize(users) == 2
    _one_line_error(capsys, str(users), "refusing")
    assert (users / "holiday.jpg").read_bytes() == b"irreplaceable"
    assert sorted(p.name for p in users.iterdir()) == ["holiday.jpg"]


def test_quantize_over_a_foreign_safetensors_file_keeps_it(tmp_path, capsys):
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"w": torch.ones(3)}, str(weights))
    before = weights.read_bytes()
    assert _quantize(weights) == 2
    _one_line_error(capsys, "not a dcgen_quant checkpoint")
    assert weights.read_bytes() == before


def test_quantize_keeps_a_foreign_partial_directory(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    partial = tmp_path / "q.safetensors.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    assert _quantize(out) == 2
    _one_line_error(capsys, "notes.txt", "refusing")
    assert (partial / "notes.txt").read_text() == "mine" and not out.exists()


def test_a_checkpoint_may_be_overwritten_and_a_sharded_one_replaced(tmp_path):
    int4_model = randomly_quantized_tiny_flux("int4", dtype=torch.bfloat16)
    single = tmp_path / "m.safetensors"
    save_quantized(int4_model, single)
    save_quantized(int4_model, single)  # our own file: overwritten
    sharded = tmp_path / "m-sharded"
    save_quantized(int4_model, sharded, max_shard_bytes=1 << 20)
    save_quantized(int4_model, sharded, max_shard_bytes=1 << 20)  # our own directory: replaced
    (sharded / "README.txt").write_text("a file the user added")
    with pytest.raises(TargetExistsError, match="did not write"):
        save_quantized(int4_model, sharded, max_shard_bytes=1 << 20)
    assert (sharded / "README.txt").is_file()


def test_check_output_kinds(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(TargetExistsError, match="is a directory"):
        check_output(tmp_path / "d.safetensors")
    (tmp_path / "f").write_text("x")
    with pytest.raises(TargetExistsError, match="not a directory"):
        check_output(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty") == tmp_path / "empty"
    assert check_output(tmp_path / "new.safetensors") == tmp_path / "new.safetensors"


def test_atomic_directory_write_refuses_unknown_content(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep").write_text("1")
    with pytest.raises(TargetExistsError), atomic_path(target, directory=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temporary left behind
    assert (target / "keep").read_text() == "1"


def test_save_adapted_replaces_its_own_directory_only(tmp_path):
    model = tiny_flux()
    out = tmp_path / "model"
    save_adapted(model, out, {"stage": 1})
    save_adapted(model, out, {"stage": 2})  # its own output: replaced
    (out / "train.log").write_text("user file")
    with pytest.raises(TargetExistsError):
        save_adapted(model, out, {"stage": 3})
    assert (out / "train.log").is_file()
