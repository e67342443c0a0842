"""Hostile foreign checkpoints: the importers of docs/INTEROP.md under the fuzz of issue 13.

    python -m tests.fuzz.foreign [--seed N] [--timeout S] [--json] [--show]

Builds malformed inputs from a real tiny Nunchaku v1.0 file (DeepCompressor's converter on a
small FLUX, INT4; tests/interop/helpers.py), its legacy two-file folder and a DeepCompressor raw
output folder: truncations, header byte edits, tensor-table and metadata edits, bit flips in
tensor data, foreign files in their place (empty, random bytes, a torch pickle, JSON), and for
the ``.pt`` files missing or retyped entries, non-dict pickles and NaN values. Each case is
loaded (``load_quantized``, or ``load_foreign`` with the config for a DeepCompressor folder,
whose tiny head dim needs one) and converted (``convert_to_dcgen_quant``), under a time bound.

Outcomes: ``refused`` (both raise the same one-line CheckpointError), ``loaded, equal`` (the
forward pass equals the pristine input's), ``loaded, other values`` (these formats carry no
checksum, so an edit of a value that stays valid cannot be seen; counted, not a defect); defects:
``traceback`` (any other exception), ``hang``, ``disagree`` (load and convert differ),
``vague error`` (multi-line, or a Python-internal phrase), ``non-finite output``, ``late
failure`` (loads, then the forward pass raises). Exits 1 on any defect.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import random
import shutil
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import VAGUE, _Timeout, time_bound
from .report import report

GOOD = ("refused", "loaded, equal", "loaded, other values")
OUTCOMES = ("refused", "loaded, equal", "loaded, other values", "traceback", "hang", "disagree",
            "vague error", "non-finite output", "late failure")  # fmt: skip


@dataclass
class Base:
    name: str  # "nunchaku-int4" | "nunchaku-legacy" | "deepcompressor"
    path: Path
    config: dict | None  # passed to load_foreign / convert (None: the file's own)
    reference: torch.Tensor


@dataclass
class Case:
    cls: str
    name: str
    base: str
    edit: Callable[[Path], None]


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# the pristine inputs


def _inputs(config: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img, txt = 16, 8
    return {
        "hidden_states": torch.randn(1, img, config["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(1, txt, config["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.randint(0, 8, (img, 3), generator=g).float(),
        "txt_ids": torch.zeros(txt, 3),
        "guidance": torch.tensor([3.5]),
    }


def forward(model, config: dict) -> torch.Tensor:
    model = model.float()
    with torch.no_grad():
        return model(**_inputs(config)).sample


def make_bases(root: Path) -> dict[str, Base]:
    from dcgen_quant.interop.nunchaku.importer import load_foreign

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.interop.helpers import small_known

    kn = small_known("int4")
    config = dict(kn.config)
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "nunchaku-int4": (kn.save_nunchaku(root / "nunchaku.safetensors"), None),
        "nunchaku-legacy": (kn.save_legacy(root / "legacy"), None),
        "deepcompressor": (kn.save_deepcompressor(root / "dc"), config),
    }
    bases = {}
    for name, (path, cfg) in paths.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_foreign(path, config=cfg)
        bases[name] = Base(name, path, cfg, forward(model, config))
    return bases


# --------------------------------------------------------------------------------------------
# edits (each gets the copied input: a file, or a folder)


def _files(target: Path) -> list[Path]:
    return sorted(p for p in target.iterdir() if p.is_file()) if target.is_dir() else [target]


def _pick(target: Path, r: float, suffix: str | None = None) -> Path:
    files = [f for f in _files(target) if suffix is None or f.suffix == suffix]
    return files[int(r * len(files))]


def _truncate(r: float, frac: float | None, at: int | None = None):
    def edit(target: Path) -> None:
        file = _pick(target, r)
        blob = file.read_bytes()
        file.write_bytes(blob[: at if at is not None else int(len(blob) * frac)])

    return edit


def _set_byte(r: float, where: float, value: int, header_only: bool):
    def edit(target: Path) -> None:
        file = _pick(target, r, ".safetensors" if header_only else None)
        blob = bytearray(file.read_bytes())
        if header_only:
            (n,) = struct.unpack("<Q", blob[:8])
            lo, hi = 8, 8 + n
        else:
            lo, hi = 0, len(blob)
        blob[lo + int(where * (hi - lo))] = value
        file.write_bytes(bytes(blob))

    return edit


def _flip_data(r: float, where: float, bit: int):
    """Flip one bit inside the tensor data of a safetensors file (past the header)."""

    def edit(target: Path) -> None:
        file = _pick(target, r, ".safetensors")
        blob = bytearray(file.read_bytes())
        (n,) = struct.unpack("<Q", blob[:8])
        lo = 8 + n
        blob[lo + int(where * (len(blob) - lo))] ^= 1 << bit
        file.write_bytes(bytes(blob))

    return edit


def _header_edit(fn: Callable[[dict], None], r: float = 0.0):
    """Edit the decoded header JSON (``__metadata__`` included) of a safetensors file."""

    def edit(target: Path) -> None:
        file = _pick(target, r, ".safetensors")
        blob = file.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
        fn(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        file.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])

    return edit


def _replace_file(content: Callable[[], bytes], r: float, suffix: str | None = None):
    def edit(target: Path) -> None:
        _pick(target, r, suffix).write_bytes(content())

    return edit


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _edit_pt(name: str, fn: Callable[[dict], object]):
    """Replace DeepCompressor's ``name`` dict by ``fn(dict)`` (fn may return another object)."""

    def edit(target: Path) -> None:
        file = target / name
        d = torch.load(file, weights_only=True)
        out = fn(d)
        torch.save(d if out is None else out, file)

    return edit


FOREIGN_FILES: list[tuple[str, Callable[[], bytes]]] = [
    ("empty file", lambda: b""),
    ("random bytes", lambda: random.Random(1).randbytes(4096)),
    ("a JSON document", lambda: b'{"__metadata__": {}, "x": 1}'),
    ("a torch pickle", lambda: _torch_bytes({"x": torch.ones(3)})),
    ("a plain pickle with a global", lambda: pickle.dumps(print)),
    ("huge header length", lambda: struct.pack("<Q", 1 << 62) + b"{}"),
    ("header not an object", lambda: struct.pack("<Q", 8) + b"[1,2,3] "),
]


def _safetensors_cases(base: Base, rng: random.Random) -> Iterator[Case]:
    n = base.name
    for frac in (0.0, 0.3, 0.6, 0.9, 0.999):
        yield Case("truncated file", f"{n}: at {frac:.0%}", n, _truncate(rng.random(), frac))
    for at in (4, 8, 12):
        yield Case("truncated file", f"{n}: at byte {at}", n, _truncate(rng.random(), None, at))
    for _ in range(12):
        r, w, v = rng.random(), rng.random(), rng.randrange(256)
        yield Case("header byte edit", f"{n}: @{w:.3f} = {v}", n, _set_byte(r, w, v, True))
    for _ in range(6):
        r, w, b = rng.random(), rng.random(), rng.randrange(8)
        yield Case("bit flip in tensor data", f"{n}: @{w:.3f} bit {b}", n, _flip_data(r, w, b))
    for label, content in FOREIGN_FILES:
        yield Case("foreign file", f"{n}: {label}", n, _replace_file(content, rng.random()))

    def entry(fn):
        def on_header(h):
            keys = sorted(k for k in h if k != "__metadata__")
            fn(h[keys[int(r * len(keys))]])

        return on_header

    table = [
        ("dtype F32", lambda e: e.update(dtype="F32")),
        ("dtype I8", lambda e: e.update(dtype="I8")),
        ("dtype unknown", lambda e: e.update(dtype="F4")),
        ("shape huge", lambda e: e.update(shape=[1 << 40, 1 << 30])),
        ("shape negative", lambda e: e.update(shape=[-4, 2])),
        ("shape not a list", lambda e: e.update(shape="3")),
        ("offsets reversed", lambda e: e.update(data_offsets=e["data_offsets"][::-1])),
        ("offsets negative", lambda e: e.update(data_offsets=[-8, 0])),
        ("offsets shifted", lambda e: e.update(data_offsets=[o + 2 for o in e["data_offsets"]])),
        ("entry a string", None),
        ("key deleted", None),
    ]
    for label, fn in table:
        r = rng.random()
        if label == "entry a string":
            fn = None

            def on_header(h, r=r):
                keys = sorted(k for k in h if k != "__metadata__")
                h[keys[int(r * len(keys))]] = "x"
        elif label == "key deleted":

            def on_header(h, r=r):
                keys = sorted(k for k in h if k != "__metadata__")
                del h[keys[int(r * len(keys))]]
        else:
            on_header = entry(fn)
        yield Case("tensor table edit", f"{n}: {label}", n, _header_edit(on_header, rng.random()))
    if n == "nunchaku-int4":
        meta_edits = [
            ("config not JSON", lambda m: m.update(config="{")),
            ("config a list", lambda m: m.update(config="[]")),
            ("num_layers 1e6", lambda m: m.update(config=_cfg(m, num_layers=10**6))),
            ("head dim 0", lambda m: m.update(config=_cfg(m, attention_head_dim=0))),
            ("rope axes permuted", lambda m: m.update(config=_cfg(m, axes_dims_rope=[24, 16, 24]))),
            ("rope axes wrong sum", lambda m: m.update(config=_cfg(m, axes_dims_rope=[8, 8, 8]))),
            ("quantization_config garbage", lambda m: m.update(quantization_config="[1]")),
            (
                "quantization_config nvfp4",
                lambda m: m.update(
                    quantization_config=json.dumps(
                        {"method": "svdquant", "weight": {"dtype": "fp4_e2m1_all"}}
                    )
                ),
            ),  # fmt: skip
            ("metadata a list", None),
        ]
        for label, fn in meta_edits:
            if fn is None:

                def on_header(h):
                    h["__metadata__"] = ["x"]
            else:

                def on_header(h, fn=fn):
                    fn(h["__metadata__"])

            yield Case("metadata edit", f"{n}: {label}", n, _header_edit(on_header))


def _cfg(meta: dict, **changes) -> str:
    cfg = json.loads(meta["config"])
    cfg.update(changes)
    return json.dumps(cfg)


def _deepcompressor_cases(base: Base, rng: random.Random) -> Iterator[Case]:
    n = base.name
    pts = ("model.pt", "scale.pt", "smooth.pt", "branch.pt")
    for name in pts:
        for frac in (0.0, 0.5, 0.98):

            def edit(target, name=name, frac=frac):
                file = target / name
                blob = file.read_bytes()
                file.write_bytes(blob[: int(len(blob) * frac)])

            yield Case("truncated file", f"{n}: {name} at {frac:.0%}", n, edit)
        for label, content in FOREIGN_FILES:

            def edit(target, name=name, content=content):
                (target / name).write_bytes(content())

            yield Case("foreign file", f"{n}: {name} := {label}", n, edit)

        def delete(target, name=name):
            (target / name).unlink()

        yield Case("missing file", f"{n}: {name} deleted", n, delete)
        for label, fn in (("a list", lambda d: [1, 2]), ("a tensor", lambda d: torch.ones(2))):
            yield Case("pickle content", f"{n}: {name} holds {label}", n, _edit_pt(name, fn))

    def with_key(fn, r):
        def on(d):
            keys = sorted(d)
            key = keys[int(r * len(keys))]
            fn(d, key)

        return on

    entry_edits = [
        ("deleted", lambda d, k: d.pop(k)),
        ("an int", lambda d, k: d.update({k: 3})),
        ("a string", lambda d, k: d.update({k: "x"})),
        ("int8", lambda d, k: d.update({k: _retype(d[k], torch.int8)})),
        ("float64", lambda d, k: d.update({k: _retype(d[k], torch.float64)})),
        ("one dim more", lambda d, k: d.update({k: _unsqueeze(d[k])})),
        ("NaN", lambda d, k: d.update({k: _poison(d[k], float("nan"))})),
        ("Inf", lambda d, k: d.update({k: _poison(d[k], float("inf"))})),
    ]
    for name in ("model.pt", "scale.pt", "branch.pt", "smooth.pt"):
        for label, fn in entry_edits:
            r = rng.random()
            edit = _edit_pt(name, with_key(fn, r))
            yield Case("entry edit", f"{n}: {name} entry {label}", n, edit)
    extra = _edit_pt("model.pt", lambda d: d.update({"junk.weight": torch.ones(2)}))
    yield Case("entry edit", f"{n}: model.pt extra key", n, extra)


def _map(v, fn):
    if isinstance(v, torch.Tensor):
        return fn(v)
    if isinstance(v, dict):
        return {k: _map(x, fn) for k, x in v.items()}
    return v


def _retype(v, dtype):
    return _map(v, lambda t: t.to(dtype))


def _unsqueeze(v):
    return _map(v, lambda t: t.unsqueeze(0))


def _poison(v, value):
    def fn(t):
        if not t.is_floating_point() or t.numel() == 0:
            return t
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t

    return _map(v, fn)


def generate(bases: dict[str, Base], seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    for base in bases.values():
        if base.name == "deepcompressor":
            cases += _deepcompressor_cases(base, rng)
        else:
            cases += _safetensors_cases(base, rng)
    return cases


# --------------------------------------------------------------------------------------------
# running


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def _attempt(fn) -> tuple[object, str | None]:
    from dcgen_quant.checkpoint import CheckpointError

    try:
        return fn(), None
    except CheckpointError as exc:
        return None, str(exc)


def run_case(case: Case, base: Base, workdir: Path, timeout: float) -> Result:
    from dcgen_quant.checkpoint import load_quantized
    from dcgen_quant.interop.nunchaku.importer import convert_to_dcgen_quant, load_foreign

    start = time.perf_counter()
    target = _copy(base.path, workdir / base.path.name)
    result = Result(case, "")
    try:
        with time_bound(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.edit(target)
            if base.config is None:
                model, load_error = _attempt(lambda: load_quantized(target))
            else:
                model, load_error = _attempt(lambda: load_foreign(target, config=base.config))
            out = workdir / "out" / "converted.safetensors"
            _, convert_error = _attempt(
                lambda: convert_to_dcgen_quant(target, out, config=base.config, progress=False)
            )
            if (load_error is None) != (convert_error is None):
                result.outcome = "disagree"
                result.detail = f"load: {load_error or 'ok'} | convert: {convert_error or 'ok'}"
            elif load_error is not None:
                vague = any(v.lower() in load_error.lower() for v in VAGUE)
                one_line = "\n" not in load_error and "\n" not in (convert_error or "")
                result.outcome = "refused" if one_line and not vague else "vague error"
                result.detail = load_error
            else:
                config = json.loads(json.dumps(model.config))
                try:
                    y = forward(model, config)
                except Exception as exc:
                    result.outcome, result.detail = "late failure", f"{type(exc).__name__}: {exc}"
                else:
                    if not torch.isfinite(y).all():
                        result.outcome = "non-finite output"
                    elif torch.equal(y, base.reference):
                        result.outcome = "loaded, equal"
                    else:
                        result.outcome = "loaded, other values"
                        result.detail = f"max |diff| {(y - base.reference).abs().max():.3g}"
    except _Timeout:
        result.outcome, result.detail = "hang", f"over {timeout} s"
    except Exception as exc:
        result.outcome, result.detail = "traceback", f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def run(seed: int = 0, timeout: float = 30.0, sample: int | None = None) -> list[Result]:
    """Every case (or a seeded ``sample`` of them), run; the results."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dcgen-fuzz-foreign-") as tmp:
        root = Path(tmp)
        bases = make_bases(root / "bases")
        cases = generate(bases, seed)
        if sample is not None:
            cases = random.Random(seed).sample(cases, min(sample, len(cases)))
        results = []
        for i, case in enumerate(cases):
            workdir = root / f"case-{i}"
            workdir.mkdir()
            results.append(run_case(case, bases[case.base], workdir, timeout))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.foreign", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", action="store_true", help="print every case's outcome")
    args = parser.parse_args(argv)
    results = run(args.seed, args.timeout)
    return report(
        results,
        OUTCOMES,
        GOOD,
        f"hostile foreign checkpoints, seed {args.seed}",
        args.json,
        args.show,
    )


if __name__ == "__main__":
    sys.exit(main())
