"""Issue 13's defects of checkpoint loading, one test each (the fuzz suite, tests/fuzz/, covers
the classes at large): silent wrong loads, raw exceptions, inspect disagreeing with
load_quantized, a hang, paths outside the checkpoint, late failures, unbounded allocations."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcgen_quant.checkpoint import CheckpointError, load_quantized, save_quantized
from dcgen_quant.cli import main

from .fuzz.mutate import Checkpoint

DATA = Path(__file__).resolve().parent / "data"
FF2 = "transformer_blocks.0.ff.net.2"
TO_Q = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def models():
    """The small really-quantized FLUX of tests/data (INT4: unsigned and split layers; NVFP4)."""
    out = {}
    for fmt, name in (("int4", "legacy_v2_int4"), ("nvfp4", "legacy_v1_nvfp4")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_quantized(DATA / f"{name}.safetensors", layout="canonical")
        saved = load_file(str(DATA / f"{name}.outputs.safetensors"))
        inputs = {k.removeprefix("input."): v for k, v in saved.items() if k != "output"}
        out[fmt] = (model, inputs)
    return out


def _save(models, fmt, path, **kwargs) -> Checkpoint:
    return Checkpoint(save_quantized(models[fmt][0], path, **kwargs))


def _inspect(path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["inspect", str(path)])
    return rc, err.getvalue().strip()


def _refused(path, *fragments):
    """load_quantized and inspect both refuse ``path`` with one line naming ``fragments``."""
    with pytest.raises(CheckpointError) as info:
        load_quantized(path)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    rc, err = _inspect(path)
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


# --------------------------------------------------------------------------------------------
# silent wrong loads: metadata edits (no checksum covered the metadata)


def test_flipping_act_unsigned_in_the_metadata_is_named(tmp_path, models):
    ck = _save(models, "int4", tmp_path / "m.safetensors")
    ck.edit_meta("layers", lambda layers: layers[FF2].update(act_unsigned=False))
    _refused(ck.path, f"layers.{FF2}", "edited")


def test_permuted_rope_axes_are_named(tmp_path, models):
    ck = _save(models, "nvfp4", tmp_path / "m", max_shard_bytes=100_000)
    ck.edit_meta("model", lambda m: m["config"].update(axes_dims_rope=[24, 16, 24]))
    _refused(ck.path, "model.config.axes_dims_rope", "edited")


@pytest.mark.parametrize(
    "fmt,tensor,value,fragment",
    [
        ("int4", f"{TO_Q}.wscales", float("nan"), "not finite"),
        ("int4", f"{TO_Q}.smooth_factor", 0.0, "> 0"),
        ("int4", f"{TO_Q}.smooth_factor", float("inf"), "> 0"),
        ("int4", f"{TO_Q}.proj_up", float("nan"), "not finite"),
        ("int4", f"{TO_Q}.bias", float("-inf"), "not finite"),
        ("nvfp4", f"{TO_Q}.wtscale", float("nan"), "> 0"),
        ("nvfp4", f"{TO_Q}.wscales", "e4m3 NaN", "not finite"),
        ("int4", "x_embedder.weight", float("nan"), "not finite"),
    ],
)
def test_non_finite_or_non_positive_values_are_refused(tmp_path, models, fmt, tensor, value,
                                                       fragment):  # fmt: skip
    """Written wrong (the CRCs match the wrong values): the value checks see it."""
    ck = _save(models, fmt, tmp_path / "m.safetensors")
    t = ck.read(tensor)
    i = min(3, t.numel() - 1)
    if value == "e4m3 NaN":
        t.reshape(-1).view(torch.uint8)[i] = 0x7F
    else:
        t.reshape(-1)[i] = value
    ck.write(tensor, t)
    ck.reseal()
    _refused(ck.path, tensor, fragment)
    loaded = load_quantized(ck.path, verify=False)  # trusted files skip the value pass
    assert loaded is not None


# --------------------------------------------------------------------------------------------
# raw exceptions: metadata of the wrong JSON type, missing keys


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda ck: ck.set_meta("layers", []), "'layers' is []"),
        (lambda ck: ck.edit_meta("layers", lambda m: m.update({TO_Q: "svdq"})), f"layers.{TO_Q}"),
        (lambda ck: ck.edit_meta("layers", lambda m: m[TO_Q].pop("fmt")), "lacks 'fmt'"),
        (lambda ck: ck.edit_meta("layers", lambda m: m[TO_Q].pop("rank")), "lacks 'rank'"),
        (lambda ck: ck.edit_meta("layers", lambda m: m[TO_Q].pop("dtype")), "lacks 'dtype'"),
        (lambda ck: ck.edit_meta("layers", lambda m: m[TO_Q].pop("bias")), "lacks 'bias'"),
        (lambda ck: ck.edit_meta("layers", lambda m: m[TO_Q].update(rank=2.5)), f"{TO_Q}.rank"),
        (lambda ck: ck.edit_meta("quantization_config", lambda q: q.update(format="fp3")),
         "quantization_config.format"),
        (lambda ck: ck.set_meta("model", ["flux"]), "'model'"),
    ],
)  # fmt: skip
def test_metadata_of_the_wrong_type_is_a_named_error(tmp_path, models, edit, fragment):
    ck = _save(models, "int4", tmp_path / "m.safetensors")
    edit(ck)
    ck.reseal()  # as a wrong writer would have written it: the schema must name it
    _refused(ck.path, fragment)


def test_truncated_shard_is_one_line_in_inspect(tmp_path, models):
    ck = _save(models, "int4", tmp_path / "m", max_shard_bytes=100_000)
    shard = ck.files()[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _refused(ck.path, "truncated", shard.name)


def test_upper_case_checksums_are_accepted(tmp_path, models):
    ck = _save(models, "int4", tmp_path / "m.safetensors")
    ck.map_meta("checksums", lambda c: {k: v.upper() for k, v in c.items()})
    ck.reseal()
    model, inputs = models["int4"]
    with torch.no_grad():
        assert torch.equal(load_quantized(ck.path)(**inputs).sample, model(**inputs).sample)
    assert _inspect(ck.path)[0] == 0


# --------------------------------------------------------------------------------------------
# inspect agrees with load_quantized


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda ck: ck.edit_header("x_embedder.weight", lambda e: e.update(dtype="F16")),
         "x_embedder.weight"),
        (lambda ck: ck.edit_meta("layers", lambda m: m.pop("transformer_blocks.0.norm1.linear")),
         "transformer_blocks.0.norm1.linear"),
    ],
)  # fmt: skip
def test_inspect_refuses_what_load_refuses(tmp_path, models, edit, fragment):
    ck = _save(models, "int4", tmp_path / "m.safetensors")
    edit(ck)
    ck.reseal()
    _refused(ck.path, fragment)


# --------------------------------------------------------------------------------------------
# resources are bounded by the file: no hang, no huge allocation


@contextlib.contextmanager
def _at_most(seconds):
    def alarm(signum, frame):
        raise TimeoutError(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("reseal", [False, True])
def test_a_million_layers_in_the_config_fail_at_once(tmp_path, models, reseal):
    ck = _save(models, "int4", tmp_path / "m.safetensors")
    ck.edit_meta("model", lambda m: m["config"].update(num_layers=10**6))
    if reseal:
        ck.reseal()
    start = time.perf_counter()
    with _at_most(30):
        _refused(ck.path, "model.config.num_layers")
    assert time.perf_counter() - start < 30


def test_a_huge_rank_never_reaches_the_allocator(tmp_path, models):
    ck = _save(models, "int4", tmp_path / "m.safetensors")
    ck.edit_meta("layers", lambda m: m[TO_Q].update(rank=10**12))
    ck.reseal()
    with _at_most(30):
        _refused(ck.path, f"{TO_Q}.rank")


# --------------------------------------------------------------------------------------------
# a shard index names plain files inside its directory only


@pytest.mark.parametrize(
    "target,fragment",
    [("/dev/zero", "plain"), ("../outside.safetensors", "plain"), (".", "plain"),
     ("fifo", "FIFO"), ("link", "outside the checkpoint directory")],
)  # fmt: skip
def test_shard_paths_outside_the_directory_are_refused(tmp_path, models, target, fragment):
    ck = _save(models, "int4", tmp_path / "m", max_shard_bytes=100_000)
    index = ck.index()
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "outside.safetensors").write_bytes((ck.path / shard).read_bytes())
    if target == "fifo":
        os.mkfifo(ck.path / "pipe.safetensors")
        target = "pipe.safetensors"
    elif target == "link":
        (ck.path / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
        target = "link.safetensors"
    index["weight_map"] = {k: target if v == shard else v for k, v in index["weight_map"].items()}
    ck.write_index(index)
    with _at_most(30):
        _refused(ck.path, fragment)


# --------------------------------------------------------------------------------------------
# late failures become early ones


def test_16_bit_dtype_edited_in_the_header_is_refused_before_any_forward(tmp_path, models):
    ck = _save(models, "int4", tmp_path / "m.safetensors")
    ck.edit_header("norm_out.linear.weight", lambda e: e.update(dtype="F16"))
    ck.reseal()  # even with every checksum recomputed
    _refused(ck.path, "norm_out.linear.weight")
