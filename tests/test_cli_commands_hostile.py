"""Issue 13 for the commands added beside quantize / inspect / generate: ``convert`` reads our
checkpoints through the same checks as ``load_quantized`` (header checksum, values, upper-case
CRCs) and refuses bad flags and outputs before any work; ``evaluate`` and ``bench`` refuse bad
flags, devices and output locations with one line before any work."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from dcgen_quant.cli import main

from .cli_errors import one_line_error
from .fuzz.mutate import Checkpoint, copy

DATA = Path(__file__).resolve().parent / "data"
TO_Q = "transformer_blocks.0.attn.to_q"


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permissions; sysfs refuses new files to root too
        if not Path("/sys").is_dir():
            pytest.skip("no unwritable location for root here")
        return Path("/sys/dcgen-quant-test")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A checkpoint of this version (with its header checksum): the INT4 fixture saved again."""
    from dcgen_quant.checkpoint import load_quantized, save_quantized

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture predates the header checksum
        model = load_quantized(DATA / "legacy_v2_int4.safetensors", layout="canonical")
    return save_quantized(model, tmp_path_factory.mktemp("ours") / "m.safetensors")


def _convert(src, out, *extra) -> int:
    torch.set_num_threads(1)
    return main(["convert", str(src), str(out), "--to", "nunchaku", "--requantize", *extra])


# --------------------------------------------------------------------------------------------
# convert


def test_convert_accepts_upper_case_checksums(ours, tmp_path, capsys):
    ck = Checkpoint(copy(ours, tmp_path / "in.safetensors"))
    ck.map_meta("checksums", lambda c: {k: v.upper() for k, v in c.items()})
    ck.reseal()
    assert _convert(ck.path, tmp_path / "nk.safetensors") == 0, capsys.readouterr().err
    assert (tmp_path / "nk.safetensors").is_file()


@pytest.mark.parametrize(
    "edit,fragments",
    [
        # a metadata edit without the header checksum recomputed
        (lambda ck: ck.edit_meta("layers", lambda m: m[TO_Q].update(rank=3)),
         (f"layers.{TO_Q}", "edited")),
        # written wrong: a NaN scale under a matching CRC
        ("nan", (f"{TO_Q}.wscales", "not finite")),
    ],
)  # fmt: skip
def test_convert_reads_our_checkpoints_through_every_check(ours, tmp_path, capsys, edit,
                                                           fragments):  # fmt: skip
    ck = Checkpoint(copy(ours, tmp_path / "in.safetensors"))
    if edit == "nan":
        t = ck.read(f"{TO_Q}.wscales")
        t.reshape(-1)[5] = float("nan")
        ck.write(f"{TO_Q}.wscales", t)
        ck.reseal()
    else:
        edit(ck)
    out = tmp_path / "nk.safetensors"
    assert _convert(ck.path, out) == 2
    one_line_error(capsys, *fragments)
    assert not out.exists()


def test_convert_refuses_bad_flags_and_outputs_before_any_work(ours, tmp_path, capsys,
                                                               monkeypatch):  # fmt: skip
    def no_work(*a, **k):
        raise AssertionError("the conversion started before the flags and output were checked")

    monkeypatch.setattr("dcgen_quant.interop.nunchaku.exporter.plan_export", no_work)
    assert _convert(ours, tmp_path / "nk.safetensors", "--latent-patch-size", "0") == 2
    one_line_error(capsys, "--latent-patch-size", ">= 1")
    assert _convert(ours, _unwritable(tmp_path) / "nk.safetensors") == 2
    one_line_error(capsys, "not writable")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for target in ("nunchaku", "dcgen_quant"):  # never opened (it would block)
        assert main(["convert", str(fifo), str(tmp_path / "x.safetensors"), "--to", target]) == 2
        one_line_error(capsys, "pipe.safetensors")


# --------------------------------------------------------------------------------------------
# evaluate, bench


@pytest.mark.parametrize(
    "extra,fragment",
    [(["--guidance", "nan"], "--guidance"), (["--text-length", "0"], "--text-length"),
     (["--device", "tpu:7"], "--device 'tpu:7'"), (["--device", "cuda"], "--device cuda")],
)  # fmt: skip
def test_evaluate_refuses_bad_flags_before_any_work(tmp_path, capsys, monkeypatch, extra,
                                                    fragment):  # fmt: skip
    from dcgen_quant.capabilities import cuda_unavailable

    if extra == ["--device", "cuda"] and cuda_unavailable() is None:
        pytest.skip("this machine has CUDA")

    def no_work(*a, **k):
        raise AssertionError("evaluate started before its flags were checked")

    monkeypatch.setattr("dcgen_quant.evaluate.sources.describe_source", no_work)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = ["evaluate", "--model", "tiny-flux", "--prompts", str(prompts),
            "--out", str(tmp_path / "ev"), *extra]  # fmt: skip
    assert main(argv) == 2
    one_line_error(capsys, fragment)


def test_bench_measured_checks_its_output_before_measuring(tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("measuring started before the output location was checked")

    monkeypatch.setattr("dcgen_quant.bench.measured.measure", no_work)
    argv = ["bench", "table", "--measured", "--tiny", "--out", str(_unwritable(tmp_path))]
    assert main(argv) == 2
    one_line_error(capsys, "not writable")
    assert main(["bench", "table", "--measured", "--tiny", "--budget-s", "-1"]) == 2
    one_line_error(capsys, "--budget-s")


@pytest.mark.parametrize(
    "extra,fragment",
    [(["--steps", "-3"], "--steps: got -3"), (["--batch-size", "0"], "--batch-size: got 0"),
     (["--ckpt-every", "0"], "--ckpt-every: got 0"), (["--lr", "nan"], "--lr: got nan"),
     (["--lr=-1e-4"], "--lr: got -0.0001"), (["--ema", "1.5"], "--ema: got 1.5"),
     (["--rank", "0"], "--rank: got 0"), (["--alpha", "inf"], "--alpha")],
)  # fmt: skip
def test_adapt_refuses_numbers_out_of_range_before_any_work(tmp_path, capsys, monkeypatch, extra,
                                                            fragment):  # fmt: skip
    def no_work(*a, **k):
        raise AssertionError("adapt started before its flags were checked")

    monkeypatch.setattr("dcgen_quant.adapt.cli._run_demo", no_work)
    assert main(["adapt", "--demo", "--out", str(tmp_path / "a"), *extra]) == 2
    one_line_error(capsys, fragment)
    assert not (tmp_path / "a").exists()
