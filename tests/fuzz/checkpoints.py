"""Hostile checkpoints: the fuzz suite of issue 13 (docs/FORMAT.md, "Hostile files").

    python -m tests.fuzz.checkpoints [--seed N] [--classes A,B] [--timeout S] [--json]

Builds several hundred malformed checkpoints from real tiny checkpoints (a FLUX transformer
quantized by ``quantize_model``, INT4 with unsigned and split layers, and NVFP4; each as one file
and as a sharded directory): truncations, bit flips in tensor data and in the header, edits of
the tensor table and of the metadata (unsealed, as a hand edit leaves them, and resealed with
recomputed checksums, as a buggy writer would write them), NaN/Inf/zero/negative values, broken
shard indexes. Each case is loaded with ``load_quantized`` (then run forward) and inspected with
``python -m dcgen_quant inspect``, under a time bound. The outcome of a case is one of

``refused``        both refuse it with a one-line CheckpointError naming the problem;
``loaded, equal``  both accept it and the loaded model's outputs equal the original's;

or a defect: ``silent wrong load`` (accepted, other outputs), ``traceback`` (any other
exception), ``hang`` (over the time bound), ``disagree`` (inspect and load_quantized differ),
``vague error`` (the message does not name what the case broke), ``late failure`` (loads, then
the forward pass raises). Prints cases and outcomes per class; exits 1 on any defect.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .mutate import Checkpoint, copy
from .report import report

DATA = Path(__file__).resolve().parents[1] / "data"
GOOD = ("refused", "loaded, equal")
# phrases of Python-internal errors: a message holding one does not name the problem
VAGUE = (
    "Traceback",
    "object has no attribute",
    "unhashable",
    "not subscriptable",
    "NoneType",
    "KeyError",
    "IndexError",
    "positional argument",
    "unsupported operand",
    "SafetensorError",
    "invalid literal",
)


class _Timeout(BaseException):
    """Raised by the per-case alarm (a BaseException, so no library handler converts it)."""


@dataclass
class Base:
    """A pristine checkpoint, the inputs of a forward pass and its outputs."""

    name: str  # e.g. "int4-single"
    path: Path
    inputs: dict[str, torch.Tensor]
    reference: torch.Tensor

    @property
    def fmt(self) -> str:
        return self.name.split("-")[0]

    @property
    def sharded(self) -> bool:
        return self.name.endswith("sharded")


@dataclass
class Case:
    cls: str
    name: str
    base: str  # Base.name
    edit: Callable[[Checkpoint], None]
    expect: tuple[str, ...] = ()  # an error must name one of these (case-insensitive)


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str = ""
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# the pristine checkpoints


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def make_bases(root: Path) -> dict[str, Base]:
    """INT4 and NVFP4 tiny FLUX checkpoints (from the committed fixtures, written again by this
    version's writer), single file and sharded."""
    from dcgen_quant.checkpoint import load_quantized, save_quantized

    bases = {}
    for fmt, fixture in (("int4", "legacy_v2_int4"), ("nvfp4", "legacy_v1_nvfp4")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_quantized(DATA / f"{fixture}.safetensors", layout="canonical")
        saved = load_file(str(DATA / f"{fixture}.outputs.safetensors"))
        inputs = {k.removeprefix("input."): v for k, v in saved.items() if k != "output"}
        for kind in ("single", "sharded"):
            path = root / (f"{fmt}.safetensors" if kind == "single" else f"{fmt}-sharded")
            save_quantized(model, path, max_shard_bytes=120_000 if kind == "sharded" else 1 << 30)
            loaded = load_quantized(path)
            bases[f"{fmt}-{kind}"] = Base(f"{fmt}-{kind}", path, inputs, forward(loaded, inputs))
    return bases


# --------------------------------------------------------------------------------------------
# the cases


def _set(key_path: list, value, reseal: bool = False):
    """An edit setting metadata ``key_path[0]`` -> ... -> last to ``value``."""

    def edit(ck: Checkpoint) -> None:
        def fn(root):
            node = root
            for k in key_path[1:-1]:
                node = node[k]
            if value is _DELETE:
                del node[key_path[-1]]
            else:
                node[key_path[-1]] = value(node[key_path[-1]]) if callable(value) else value

        if len(key_path) == 1:
            meta = ck.raw_meta()
            if value is _DELETE:
                del meta[key_path[0]]
            else:
                meta[key_path[0]] = json.dumps(value)
            ck.set_raw_meta(meta)
        else:
            ck.edit_meta(key_path[0], fn)
        if reseal:
            ck.reseal()

    return edit


_DELETE = object()
TO_Q = "transformer_blocks.0.attn.to_q"
FF2 = "transformer_blocks.0.ff.net.2"
ADANORM = "transformer_blocks.0.norm1.linear"
SPLIT = "single_transformer_blocks.0.proj_out"


def _truncations(bases: dict[str, Base], rng: random.Random) -> Iterator[Case]:
    points = (
        ("empty", lambda n, size: 0),
        ("in the length", lambda n, size: 5),
        ("in the header", lambda n, size: 8 + n // 2),
        ("after the header", lambda n, size: 8 + n),
        ("mid data", lambda n, size: (8 + n + size) // 2),
        ("last byte", lambda n, size: size - 1),
    )
    for base in bases.values():
        for label, where in points:
            pick = rng.random()

            def edit(ck, where=where, pick=pick):
                files = ck.files()  # a sharded checkpoint: one of its shards
                file = files[int(pick * len(files))]
                blob = file.read_bytes()
                n = int.from_bytes(blob[:8], "little")
                file.write_bytes(blob[: where(n, len(blob))])

            yield Case("truncated file", f"{base.name}: {label}", base.name, edit,
                       ("truncated", "not a valid safetensors"))  # fmt: skip


def _data_flips(bases: dict[str, Base], rng: random.Random) -> Iterator[Case]:
    for base in bases.values():
        names = Checkpoint(base.path).tensor_names()
        for name in rng.sample(names, 8):
            r, bit = rng.random(), rng.randrange(8)

            def edit(ck, name=name, r=r, bit=bit):
                file, entry = ck.file_of(name), ck.header(name)
                start, end = entry["data_offsets"]
                if end == start:
                    return
                n = int.from_bytes(file.read_bytes()[:8], "little")
                ck.flip_bit(file, 8 + n + start + int(r * (end - start)), bit)

            yield Case("bit flip in tensor data", f"{base.name}: {name}", base.name, edit,
                       (name, "checksum"))  # fmt: skip


def _header_flips(bases: dict[str, Base], rng: random.Random) -> Iterator[Case]:
    for base in bases.values():
        for i in range(8):
            r, bit, which = rng.random(), rng.randrange(7), rng.random()

            def edit(ck, r=r, bit=bit, which=which):
                files = ck.files() + ([ck.path / "dcgen_quant.index.json"] if ck.sharded else [])
                file = files[int(which * len(files))]
                if file.suffix == ".json":
                    lo, hi = 0, file.stat().st_size
                else:
                    lo, hi = 8, 8 + int.from_bytes(file.read_bytes()[:8], "little")
                ck.flip_bit(file, lo + int(r * (hi - lo)), bit)

            yield Case("bit flip in header / index", f"{base.name}: #{i}", base.name, edit)


def _tensor_table(bases: dict[str, Base], rng: random.Random) -> Iterator[Case]:
    def dtype_to(new):
        return lambda e: e.update(dtype=new)

    edits = [
        ("16-bit weight BF16 -> F16", "x_embedder.weight", dtype_to("F16")),
        ("scale dtype -> F16", f"{TO_Q}.wscales", dtype_to("F16")),
        ("smooth BF16 -> F16", f"{TO_Q}.smooth_factor", dtype_to("F16")),
        ("qweight U8 -> I8", f"{TO_Q}.qweight", dtype_to("I8")),
        ("shape transposed", f"{TO_Q}.qweight", lambda e: e.update(shape=e["shape"][::-1])),
        ("offsets shifted", "x_embedder.weight",
         lambda e: e.update(data_offsets=[o + 2 for o in e["data_offsets"]])),
        ("unknown dtype", "x_embedder.weight", dtype_to("F4")),
        ("shape negative", "x_embedder.weight", lambda e: e.update(shape=[-64, -64])),
    ]  # fmt: skip
    for base in bases.values():
        for label, name, fn in edits:
            for reseal in (False, True):

                def edit(ck, name=name, fn=fn, reseal=reseal):
                    ck.edit_header(name, fn)
                    if reseal:
                        ck.reseal()

                mode = "resealed" if reseal else "unsealed"
                yield Case("tensor table edit", f"{base.name}: {label} ({mode})", base.name,
                           edit, (name, "tensor table", "header"))  # fmt: skip


def _metadata_unsealed(bases: dict[str, Base], rng: random.Random) -> Iterator[Case]:
    """Hand edits that leave the file well-formed: only the header checksum can see them."""
    for base in bases.values():
        q = f"layers.{TO_Q}"
        edits = [
            ("permute axes_dims_rope", ["model", "config", "axes_dims_rope"], [24, 16, 24],
             "model.config.axes_dims_rope"),
            ("num_layers 1e6", ["model", "config", "num_layers"], 10**6, "model.config.num_layers"),
            ("heads x head_dim swapped", ["model", "config", "num_attention_heads"], 2,
             "model.config"),
            ("rank + 1", ["layers", TO_Q, "rank"], lambda r: r + 1, q),
            ("rank 1e12", ["layers", TO_Q, "rank"], 10**12, q),
            ("bias flipped", ["layers", TO_Q, "bias"], False, q),
            ("format renamed", ["quantization_config", "format"], "int8", "quantization_config"),
            ("tool_version", ["tool_version"], "9.9.9", "tool_version"),
            ("calibration error", ["calibration", "layers", 0, "err_svdq"], 0.0, "calibration"),
            ("checksum replaced", ["checksums", f"{TO_Q}.qweight"], "0badc0de", "checksums"),
            ("layer removed", ["layers", ADANORM], _DELETE, ADANORM),
            ("integrity digest edited", ["integrity", "sha256"], "0" * 64, "integrity"),
        ]  # fmt: skip
        if base.fmt == "int4":
            edits += [
                ("act_unsigned flipped", ["layers", FF2, "act_unsigned"], False, FF2),
                ("act_unsigned removed", ["layers", FF2, "act_unsigned"], _DELETE, FF2),
                ("split moved", ["layers", SPLIT, "splits"], [128, 192], SPLIT),
            ]
        for label, path, value, named in edits:
            yield Case("metadata edit (unsealed)", f"{base.name}: {label}", base.name,
                       _set(path, value), (named,))  # fmt: skip
        # no header checksum at all: read as a file of an earlier version (loads, outputs equal)
        yield Case("metadata edit (unsealed)", f"{base.name}: integrity removed", base.name,
                   _set(["integrity"], _DELETE))  # fmt: skip


def _metadata_resealed(bases: dict[str, Base], rng: random.Random) -> Iterator[Case]:
    """Metadata a buggy writer could produce, checksums recomputed: the schema must see it.
    (The metadata does not depend on the file layout: one single-file and one sharded base.)"""
    for base in (b for b in bases.values() if b.name in ("int4-single", "nvfp4-sharded")):
        edits = [
            ("layers is a list", ["layers"], [], "layers"),
            ("layer entry is a string", ["layers", TO_Q], "svdq", TO_Q),
            ("fmt missing", ["layers", TO_Q, "fmt"], _DELETE, "fmt"),
            ("rank missing", ["layers", TO_Q, "rank"], _DELETE, "rank"),
            ("dtype missing", ["layers", TO_Q, "dtype"], _DELETE, "dtype"),
            ("bias missing", ["layers", TO_Q, "bias"], _DELETE, "bias"),
            ("rank 2.5", ["layers", TO_Q, "rank"], 2.5, "rank"),
            ("rank '4'", ["layers", TO_Q, "rank"], "4", "rank"),
            ("rank 1e12", ["layers", TO_Q, "rank"], 10**12, "rank"),
            ("rank -1", ["layers", TO_Q, "rank"], -1, "rank"),
            ("in_features 0", ["layers", TO_Q, "in_features"], 0, "in_features"),
            ("in_features 2^40", ["layers", TO_Q, "in_features"], 1 << 40, "in_features"),
            ("unknown kind", ["layers", TO_Q, "kind"], "svdq9", "kind"),
            ("unknown fmt", ["layers", TO_Q, "fmt"], "int3", "fmt"),
            ("unknown dtype", ["layers", TO_Q, "dtype"], "float64", "dtype"),
            ("unknown layer key", ["layers", TO_Q, "colour"], "red", "colour"),
            ("layer that does not exist", ["layers", "nowhere.proj"],
             {"kind": "w4a16", "in_features": 64, "out_features": 64, "rank": 0,
              "fmt": base.fmt, "bias": False, "dtype": "bfloat16"}, "nowhere.proj"),
            ("quantization_config.format unknown", ["quantization_config", "format"], "fp3",
             "quantization_config.format"),
            ("quantization_config a list", ["quantization_config"], [1], "quantization_config"),
            ("quantization_config.rank a string", ["quantization_config", "rank"], "x",
             "quantization_config.rank"),
            ("model a string", ["model"], "flux", "model"),
            ("model.class os.system", ["model", "class"], "os.system", "model.class"),
            ("model.config a list", ["model", "config"], [], "model.config"),
            ("num_layers 1e6", ["model", "config", "num_layers"], 10**6, "num_layers"),
            ("num_layers -1", ["model", "config", "num_layers"], -1, "num_layers"),
            ("num_single_layers 0", ["model", "config", "num_single_layers"], 0,
             "num_single_layers"),
            ("axes_dims_rope sum wrong", ["model", "config", "axes_dims_rope"], [16, 24, 32],
             "axes_dims_rope"),
            ("axes_dims_rope 4 axes", ["model", "config", "axes_dims_rope"], [8, 8, 24, 24],
             "axes_dims_rope"),
            ("attention_head_dim 32", ["model", "config", "attention_head_dim"], 32,
             "attention_head_dim"),
            ("in_channels 16", ["model", "config", "in_channels"], 16, "in_channels"),
            ("guidance_embeds false", ["model", "config", "guidance_embeds"], False,
             "guidance_embeds"),
            ("format_version 3", ["format_version"], 3, "format_version"),
            ("format_version '1'", ["format_version"], "1", "format_version"),
            ("checksums a list", ["checksums"], [], "checksums"),
            ("checksum not hex", ["checksums", f"{TO_Q}.qweight"], "xyz", "checksums"),
            ("checksum entry removed", ["checksums", f"{TO_Q}.qweight"], _DELETE, "checksums"),
            ("calibration rows not a list", ["calibration", "layers"], {"a": 1}, "calibration"),
            ("calibration error a string", ["calibration", "layers", 0, "err_svdq"], "low",
             "calibration"),
            ("tool_version a number", ["tool_version"], 1, "tool_version"),
        ]  # fmt: skip
        if base.fmt == "int4":
            edits += [
                ("act_unsigned 'yes'", ["layers", FF2, "act_unsigned"], "yes", "act_unsigned"),
                ("act_unsigned on a W4A16 layer", ["layers", ADANORM, "act_unsigned"], True,
                 "act_unsigned"),
                ("splits wrong sum", ["layers", SPLIT, "splits"], [64, 64], "splits"),
                ("part removed", ["layers", f"{SPLIT}.parts.1"], _DELETE, "parts.1"),
                ("part_of wrong", ["layers", f"{SPLIT}.parts.1", "part_of"], TO_Q, "parts.1"),
            ]  # fmt: skip
        else:
            edits += [("act_unsigned on nvfp4", ["layers", TO_Q, "act_unsigned"], True,
                       "unsigned")]  # fmt: skip
        for label, path, value, named in edits:
            yield Case("metadata written wrong (resealed)", f"{base.name}: {label}", base.name,
                       _set(path, value, reseal=True), (named,))  # fmt: skip
        # upper-case hex digits are the same checksum: loads, outputs equal
        yield Case("metadata written wrong (resealed)", f"{base.name}: upper-case CRCs",
                   base.name, _upper)  # fmt: skip


def _upper(ck: Checkpoint) -> None:
    ck.map_meta("checksums", lambda c: {k: v.upper() for k, v in c.items()})
    ck.reseal()


def _values(bases: dict[str, Base], rng: random.Random) -> Iterator[Case]:
    """Values a wrong writer could store (checksums recomputed)."""
    nan, inf = float("nan"), float("inf")
    for base in bases.values():
        edits = [
            ("NaN weight scale", f"{TO_Q}.wscales", nan),
            ("negative weight scale", f"{TO_Q}.wscales", -1.0),
            ("Inf smoothing factor", f"{TO_Q}.smooth_factor", inf),
            ("zero smoothing factor", f"{TO_Q}.smooth_factor", 0.0),
            ("negative smoothing factor", f"{TO_Q}.smooth_factor", -0.5),
            ("NaN proj_up", f"{TO_Q}.proj_up", nan),
            ("Inf proj_down", f"{TO_Q}.proj_down", -inf),
            ("NaN bias", f"{TO_Q}.bias", nan),
            ("NaN 16-bit weight", "x_embedder.weight", nan),
            ("Inf norm weight", "transformer_blocks.0.attn.norm_q.weight", inf),
            ("NaN W4A16 scale", f"{ADANORM}.wscales", nan),
        ]
        if base.fmt == "nvfp4":
            edits += [
                ("NaN wtscale", f"{TO_Q}.wtscale", nan),
                ("zero wtscale", f"{TO_Q}.wtscale", 0.0),
                ("E4M3 NaN block scale (0x7f)", f"{TO_Q}.wscales", "e4m3-nan"),
            ]
        for label, name, value in edits:
            r = rng.random()

            def edit(ck, name=name, value=value, r=r):
                t = ck.read(name)
                flat = t.reshape(-1)
                i = int(r * flat.numel())
                if value == "e4m3-nan":
                    flat.view(torch.uint8)[i] = 0x7F
                else:
                    flat[i] = value
                ck.write(name, t)
                ck.reseal()

            yield Case("bad values (resealed)", f"{base.name}: {label}", base.name, edit, (name,))


def _repoint(target_fn):
    """An edit pointing every tensor of the first shard to ``target_fn(ck, shard)``."""

    def edit(ck: Checkpoint) -> None:
        index = ck.index()
        shard = sorted(set(index["weight_map"].values()))[0]
        target = target_fn(ck, shard)
        index["weight_map"] = {
            k: (target if v == shard else v) for k, v in index["weight_map"].items()
        }
        ck.write_index(index)

    return edit


def _fifo(ck: Checkpoint, shard: str) -> str:
    os.mkfifo(ck.path / "pipe.safetensors")
    return "pipe.safetensors"


def _link_out(outside: Path):
    def target(ck: Checkpoint, shard: str) -> str:
        if not outside.exists():
            copy(ck.path / shard, outside)
        (ck.path / "link.safetensors").symlink_to(outside)
        return "link.safetensors"

    return target


def _link_in(ck: Checkpoint, shard: str) -> str:
    (ck.path / "alias.safetensors").symlink_to(ck.path / shard)
    return "alias.safetensors"


def _renamed(ck: Checkpoint, shard: str) -> str:
    (ck.path / shard).rename(ck.path / "renamed.safetensors")
    return "renamed.safetensors"


def _moved(ck: Checkpoint) -> None:
    index = ck.index()
    key = sorted(index["weight_map"])[0]
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    ck.write_index(index)


def _shard_index(bases: dict[str, Base], rng: random.Random, scratch: Path) -> Iterator[Case]:
    repointed = [
        ("/dev/zero", lambda ck, s: "/dev/zero", ("/dev/zero", "plain")),
        ("../ path", lambda ck, s: f"../{s}", ("..", "plain")),
        ("absolute path", lambda ck, s: str(ck.path / s), ("plain",)),
        ("the directory itself", lambda ck, s: ".", ("plain",)),
        ("empty name", lambda ck, s: "", ("plain",)),
        ("subdirectory", lambda ck, s: f"sub/{s}", ("plain",)),
        ("FIFO in the directory", _fifo, ("FIFO", "regular")),
        ("symlink out of the directory", _link_out(scratch / "outside.safetensors"),
         ("outside", "link")),
        ("missing shard", lambda ck, s: "model-99999-of-00009.safetensors", ("missing",)),
        ("non-string shard", lambda ck, s: 7, ("shard",)),
    ]  # fmt: skip
    index = "dcgen_quant.index.json"
    others = [
        ("index not JSON", lambda ck: (ck.path / index).write_text("{"), ("index",)),
        ("index is a list", lambda ck: ck.write_index([]), ("index",)),
        ("weight_map missing", lambda ck: ck.write_index({"metadata": ck.raw_meta()}),
         ("weight_map",)),
        ("metadata values not strings", lambda ck: ck.set_raw_meta({"format": 1}),
         ("metadata",)),
        ("tensor moved to another shard", _moved, ("shard",)),
        ("index removed", lambda ck: (ck.path / index).unlink(), (index,)),
    ]  # fmt: skip
    for base in bases.values():
        if not base.sharded:
            continue
        for label, fn, expect in repointed:
            yield Case("shard index", f"{base.name}: weight_map -> {label}", base.name,
                       _repoint(fn), expect)  # fmt: skip
        for label, edit, expect in others:
            yield Case("shard index", f"{base.name}: {label}", base.name, edit, expect)
        # links inside the directory, consistently renamed shards and unrelated files are fine
        for label, edit in (
            ("symlink inside the directory", _repoint(_link_in)),
            ("shard renamed consistently", _repoint(_renamed)),
            ("unrelated extra file",
             lambda ck: (ck.path / "notes.safetensors").write_bytes(b"not part of it")),
        ):  # fmt: skip
            yield Case("shard index", f"{base.name}: {label}", base.name, edit)


CLASSES = {
    "truncated file": _truncations,
    "bit flip in tensor data": _data_flips,
    "bit flip in header / index": _header_flips,
    "tensor table edit": _tensor_table,
    "metadata edit (unsealed)": _metadata_unsealed,
    "metadata written wrong (resealed)": _metadata_resealed,
    "bad values (resealed)": _values,
    "shard index": _shard_index,
}


def generate(bases: dict[str, Base], seed: int, scratch: Path, classes=None) -> list[Case]:
    cases = []
    for name, gen in CLASSES.items():
        if classes and name not in classes:
            continue
        rng = random.Random(f"{seed}:{name}")
        args = (bases, rng, scratch) if gen is _shard_index else (bases, rng)
        cases += list(gen(*args))
    return cases


# --------------------------------------------------------------------------------------------
# running a case


@contextlib.contextmanager
def time_bound(seconds: float):
    def alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _inspect(path: Path) -> tuple[int, str]:
    from dcgen_quant.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["inspect", str(path)])
    return rc, err.getvalue().strip()


def _names_it(message: str, expect: tuple[str, ...]) -> bool:
    if any(v.lower() in message.lower() for v in VAGUE):
        return False
    return not expect or any(e.lower() in message.lower() for e in expect)


def run_case(case: Case, base: Base, workdir: Path, timeout: float) -> Result:
    from dcgen_quant.checkpoint import CheckpointError, load_quantized

    start = time.perf_counter()
    target = copy(base.path, workdir / base.path.name)
    result = Result(case, "")
    try:
        with time_bound(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.edit(Checkpoint(target))
            try:
                model = load_quantized(target)
                load_error = None
            except CheckpointError as exc:
                model, load_error = None, str(exc)
            try:
                rc, message = _inspect(target)
            except SystemExit as exc:  # argparse or an explicit exit: not a clean error
                rc, message = -1, f"SystemExit {exc.code}"
            result.messages = [m for m in (load_error, message) if m]
            if (load_error is None) != (rc == 0):
                result.outcome = "disagree"
                result.detail = f"load: {load_error or 'ok'} | inspect rc {rc}: {message}"
            elif load_error is not None:
                one_line = message.startswith("error: ") and len(message.splitlines()) == 1
                named = _names_it(load_error, case.expect) and _names_it(message, case.expect)
                result.outcome = "refused" if one_line and named else "vague error"
                result.detail = load_error
            else:
                try:
                    y = forward(model, base.inputs)
                except Exception as exc:
                    result.outcome, result.detail = "late failure", f"{type(exc).__name__}: {exc}"
                else:
                    equal = torch.equal(y, base.reference)
                    result.outcome = "loaded, equal" if equal else "silent wrong load"
    except _Timeout:
        result.outcome, result.detail = "hang", f"over {timeout} s"
    except Exception as exc:
        result.outcome, result.detail = "traceback", f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def run(seed: int = 0, classes=None, timeout: float = 30.0) -> list[Result]:
    """Build the bases and every case of ``classes`` (default all), run them, return results."""
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="dcgen-fuzz-") as tmp:
        root = Path(tmp)
        bases = make_bases(root / "bases")
        (root / "scratch").mkdir()
        for i, case in enumerate(generate(bases, seed, root / "scratch", classes)):
            workdir = root / f"case-{i}"
            workdir.mkdir()
            results.append(run_case(case, bases[case.base], workdir, timeout))
    return results


OUTCOMES = ("refused", "loaded, equal", "silent wrong load", "traceback", "hang", "disagree",
            "vague error", "late failure")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.checkpoints", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", help="comma-separated class names (default: all)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", action="store_true", help="print every case's outcome")
    args = parser.parse_args(argv)
    classes = args.classes.split(",") if args.classes else None
    results = run(args.seed, classes, args.timeout)
    return report(
        results, OUTCOMES, GOOD, f"hostile checkpoints, seed {args.seed}", args.json, args.show
    )


if __name__ == "__main__":
    sys.exit(main())
