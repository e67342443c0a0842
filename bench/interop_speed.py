"""Conversion speed and memory at FLUX.1-dev size: ``convert --to nunchaku`` (and back).

``python -m dcgen_quant.bench.interop_speed [--format int4|nvfp4] [--out bench/results]
[--keep DIR]`` writes, in a temporary directory, a dcgen_quant checkpoint with the full FLUX.1-dev
geometry (19 double + 38 single blocks, hidden 3072, rank 32; about 6.5 GB in INT4) whose codes,
scales, smoothing and low-rank factors are random but valid (fused q/k/v groups share their
smoothing and down projection, adaLN codes avoid -8, as ``quantize --nunchaku-compatible``
writes them), streaming it tensor by tensor. It then runs ``python -m dcgen_quant convert IN OUT
--to nunchaku`` in a subprocess and records its wall time and peak resident memory; if the
importer exists (``dcgen_quant.interop.nunchaku.importer``), it converts the result back with
``--to dcgen_quant`` the same way. The target (issue 11): under 2 minutes on 2 CPU cores, peak
memory about one block plus the 16-bit top-level tensors.

Writes ``OUT/interop_speed-<fmt>-cpu-<date>.md`` and ``.json`` (CPU model, cores, load average
before and after: the machine may be shared, which inflates the times) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NAME = "interop_speed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _random_tensor(key: str, dtype: torch.dtype, shape, g: torch.Generator) -> torch.Tensor:
    """A valid random value for checkpoint tensor ``key``."""
    suffix = key.rsplit(".", 1)[-1]
    n = 1
    for s in shape:
        n *= s
    if suffix == "qweight":
        return torch.randint(0, 256, tuple(shape), generator=g, dtype=torch.uint8)
    if dtype == torch.float8_e4m3fn:
        return (torch.rand(tuple(shape), generator=g) * 60 + 1).to(dtype)
    if suffix == "wtscale":
        return torch.rand((), generator=g) * 1e-3 + 1e-4
    if suffix in ("wscales", "smooth_factor"):
        scale = 1e-3 if suffix == "wscales" else 1.0
        return ((torch.rand(tuple(shape), generator=g) + 0.5) * scale).to(dtype)
    return (torch.randn(tuple(shape), generator=g) * 0.02).to(dtype)


def _no_code_minus_8(packed: torch.Tensor) -> torch.Tensor:
    # nibble 8 is INT4 code -8, which Nunchaku's AWQ zero point 7 cannot hold: make it -7 (9)
    lo, hi = packed & 15, packed >> 4
    lo = torch.where(lo == 8, 9, lo)
    hi = torch.where(hi == 8, 9, hi)
    return (lo | (hi << 4)).to(torch.uint8)


TINY = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1}  # --tiny (smoke test)


def make_checkpoint(path: Path, fmt: str, seed: int = 0, **overrides) -> dict:
    """Stream a random full-size FLUX.1-dev dcgen_quant checkpoint to ``path`` (``overrides``:
    config entries, for a smoke test)."""
    from dcgen_quant import __version__
    from dcgen_quant.bench.configs import build_transformer
    from dcgen_quant.bench.w4a4 import convert_to_w4a4
    from dcgen_quant.checkpoint import (
        FORMAT_NAME,
        _crc32,
        _model_description,
        format_version_for,
        quantized_layers,
    )
    from dcgen_quant.interop.safetensors_stream import StreamingWriter
    from dcgen_quant.models.flux import FLUX
    from dcgen_quant.quantize.config import QuantConfig

    model = build_transformer("flux", device="meta", **overrides)
    convert_to_w4a4(model, fmt, rank=32, fuse=False)
    layers = quantized_layers(model)
    for info in layers.values():  # adaLN as quantize --nunchaku-compatible writes it
        if info["kind"] == "w4a16":
            info["fmt"] = "int4"
    state = model.state_dict()
    specs = []
    for key, t in state.items():
        name, suffix = key.rsplit(".", 1)
        dtype, shape = t.dtype, tuple(t.shape)
        if layers.get(name, {}).get("kind") == "w4a16" and suffix in ("wscales", "wtscale"):
            if suffix == "wtscale":
                continue
            k = layers[name]["in_features"]
            dtype, shape = torch.bfloat16, (k // 64, layers[name]["out_features"])
        elif layers.get(name, {}).get("kind") == "w4a16" and suffix == "qweight":
            shape = (layers[name]["out_features"], layers[name]["in_features"] // 2)
        specs.append((key, dtype, shape))
    # fused groups share their input side (smooth, proj_down, NVFP4 tensor scale)
    shared = {}  # tensor key -> (block, group index, suffix)
    for block_name, _ in FLUX.blocks(model):
        for gi, group in enumerate(FLUX.fused):
            for m in group:
                for suffix in ("smooth_factor", "proj_down", "wtscale"):
                    shared[f"{block_name}.{m}.{suffix}"] = (block_name, gi, suffix)
    g = torch.Generator().manual_seed(seed)
    checksums, cache = {}, {}
    writer = StreamingWriter(path, specs, header_reserve=8 << 20)
    try:
        for key, dtype, shape in specs:
            group = shared.get(key)
            if group is not None and group in cache:
                t = cache[group]
            else:
                t = _random_tensor(key, dtype, shape, g)
                name = key.rsplit(".", 1)[0]
                if layers.get(name, {}).get("kind") == "w4a16" and key.endswith(".qweight"):
                    t = _no_code_minus_8(t)
                if group is not None:
                    cache = {k: v for k, v in cache.items() if k[0] == group[0]}  # this block
                    cache[group] = t
            writer.write(key, t)
            checksums[key] = _crc32(t)
        config = QuantConfig(format=fmt, nunchaku_compatible=True).to_dict()
        config["method"] = "svdquant"
        meta = {
            "format": FORMAT_NAME,
            "format_version": format_version_for(layers),
            "tool_version": __version__,
            "quantization_config": config,
            "model": _model_description(model),
            "layers": layers,
            "calibration": {},
            "checksums": checksums,
        }
        writer.close({k: v if k == "format" else json.dumps(v) for k, v in meta.items()})
    except BaseException:
        writer.abort()
        raise
    return {"tensors": len(specs), "bytes": path.stat().st_size}


def _timed(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and the child's peak RSS (MiB)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kib, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime - cpu_before
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    # ru_maxrss of children is the maximum over all children so far: only meaningful if it grew
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak_kib / 1024,
            "grew": peak_kib > before}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgen_quant.bench.interop_speed")
    parser.add_argument("--format", choices=("int4", "nvfp4"), default="int4")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    parser.add_argument("--tiny", action="store_true", help="1 + 1 blocks, hidden 128 (smoke test)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    work = args.keep or Path(tempfile.mkdtemp(prefix="interop_speed-"))
    work.mkdir(parents=True, exist_ok=True)
    src, nk, back = (work / n for n in ("ours.safetensors", "nunchaku.safetensors",
                                        "back.safetensors"))  # fmt: skip
    try:
        start = time.perf_counter()
        made = make_checkpoint(src, args.format, **(TINY if args.tiny else {}))
        make_seconds = time.perf_counter() - start
        py = [sys.executable, "-m", "dcgen_quant", "convert"]
        export = _timed([*py, str(src), str(nk), "--to", "nunchaku", "--json"])
        rows = [
            {
                "direction": "dcgen_quant -> nunchaku",
                **export,
                "input_gib": made["bytes"] / 1024**3,
                "output_gib": nk.stat().st_size / 1024**3,
            }
        ]
        if importlib.util.find_spec("dcgen_quant.interop.nunchaku.importer") is not None:
            imp = _timed([*py, str(nk), str(back), "--to", "dcgen_quant", "--json"])
            rows.append({"direction": "nunchaku -> dcgen_quant", **imp,
                         "input_gib": nk.stat().st_size / 1024**3,
                         "output_gib": back.stat().st_size / 1024**3})  # fmt: skip
    finally:
        if args.keep is None:
            for p in (src, nk, back):
                p.unlink(missing_ok=True)
            work.rmdir()
    record = {
        "benchmark": NAME,
        "format": args.format,
        "geometry": "tiny (smoke test)"
        if args.tiny
        else "FLUX.1-dev (19 double + 38 single blocks, hidden 3072, rank 32)",
        "tensors": made["tensors"],
        "make_checkpoint_seconds": make_seconds,
        "rows": rows,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
        "note": "peak RSS: the conversion subprocess's maximum resident set (input read with "
        "plain reads, not memory-mapped). CPU seconds: its user + system time (all threads), "
        "less sensitive to a shared machine than the wall time, which is an upper bound there.",
    }
    lines = [
        f"# Conversion speed, {record['geometry']}, {args.format} ({record['date']})",
        "",
        f"CPU: {record['cpu']} ({record['cores']} cores); load average before "
        f"{load_before[0]:.1f}, after {record['load_average_after'][0]:.1f}; torch "
        f"{record['torch']}. Re-run: `python -m dcgen_quant.bench.interop_speed --format "
        f"{args.format}`.",
        "",
        "| direction | input GiB | output GiB | wall seconds | CPU seconds | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['direction']} | {r['input_gib']:.2f} | {r['output_gib']:.2f} | "
            f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += ["", record["note"], ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{NAME}-{args.format}-cpu-{record['date']}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
