"""``python -m dcgen_quant inspect CHECKPOINT``: what a 4-bit checkpoint holds.

Prints the model, the quantization config, sizes against the 16-bit model, the layers by kind
and the calibration error summary; ``--layers`` adds one row per quantized layer; ``--json``
prints one JSON document instead. The checkpoint goes through every check ``load_quantized``
runs (header checksum, metadata schema, the structure of the model it describes; with
``--no-verify`` the tensors' CRCs and values are not read), so the two agree on every file.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

HELP = "show what a 4-bit checkpoint holds (model, config, sizes, per-layer errors)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint file or sharded directory")
    parser.add_argument("--layers", action="store_true", help="one row per quantized layer")
    parser.add_argument(
        "--no-verify", action="store_true",
        help="skip reading the tensors (their checksums and values); the header, metadata and "
        "structure are still checked",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def summarize(path: Path, verify: bool = True) -> dict[str, Any]:
    """Everything ``inspect`` prints, as a dict. The checkpoint goes through the checks that
    ``load_quantized`` runs (header checksum, metadata schema, structure of the model it
    describes, and with ``verify`` every tensor's CRC-32 and values), so that the two always
    agree on whether a file is sound."""
    from .checkpoint import open_checkpoint, read_tensors

    opened = open_checkpoint(path)
    if verify:
        read_tensors(opened, verify=True, keep=False)
    meta, layers, layer_keys = opened.meta, opened.meta["layers"], opened.specs
    tensors = {k: (e.shape, e.dtype_name, e.end - e.start) for k, e in opened.files.tensors.items()}

    sizes = {"codes_4bit": 0, "scales": 0, "low_rank_and_smooth": 0, "other": 0}
    for key, (_, _, nbytes) in tensors.items():
        suffix = key.rsplit(".", 1)[-1]
        if key in layer_keys and suffix == "qweight":
            sizes["codes_4bit"] += nbytes
        elif key in layer_keys and suffix in ("wscales", "wtscale"):
            sizes["scales"] += nbytes
        elif key in layer_keys and suffix in ("proj_down", "proj_up", "smooth_factor"):
            sizes["low_rank_and_smooth"] += nbytes
        else:
            sizes["other"] += nbytes
    # The same model in 16 bits: each quantized layer's N x K weight (+ bias) at 2 bytes per
    # element (a split layer counted once, not again through its parts), every other tensor at
    # 2 bytes per element.
    bf16 = sum(
        2 * info["out_features"] * (info["in_features"] + bool(info["bias"]))
        for info in layers.values()
        if "part_of" not in info
    )
    bf16 += sum(
        2 * math.prod(shape) for key, (shape, _, _) in tensors.items() if key not in layer_keys
    )
    total = sum(sizes.values())
    kinds: dict[str, int] = {}
    for info in layers.values():
        if "part_of" not in info:  # parts are counted through their split layer
            kinds[info["kind"]] = kinds.get(info["kind"], 0) + 1
    return {
        "path": str(path),
        "format_version": meta["format_version"],
        "tool_version": meta.get("tool_version"),
        "model_class": meta["model"].get("class"),
        "model_config": meta["model"].get("config", {}),
        "quantization_config": meta["quantization_config"],
        "layers_by_kind": kinds,
        "bytes": {**sizes, "total": total, "bf16_equivalent": bf16},
        "size_vs_bf16": total / bf16 if bf16 else None,
        "calibration": meta.get("calibration") or {},
        "layers": layers,
        "verified": verify,
        "header_authenticated": opened.authenticated,
    }


def _layer_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    calib = {row.get("name"): row for row in summary["calibration"].get("layers", [])}
    rows = []
    for name, info in summary["layers"].items():
        row = {"name": name, **info}
        if info["kind"].startswith("w4a16"):
            row["acts"] = "16-bit"
        elif info["kind"] == "svdq_split":
            row["acts"] = "split"
        else:
            row["acts"] = "unsigned" if info.get("act_unsigned") else "signed"
        stats = calib.get(name, {})
        for key in ("err_rtn", "err_smooth", "err_svdq", "err_heldout", "seconds"):
            row[key] = stats.get(key)
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    import json

    from .tables import format_table

    summary = summarize(args.checkpoint, verify=not args.no_verify)
    if args.json:
        doc = {k: v for k, v in summary.items() if k != "layers"}
        doc["layers"] = _layer_rows(summary)
        print(json.dumps(doc, indent=2, default=str))
        return 0
    q = summary["quantization_config"]
    cfg = summary["model_config"]
    print(f"checkpoint   {summary['path']}  (format v{summary['format_version']}, "
          f"written by dcgen_quant {summary['tool_version']})")  # fmt: skip
    shape = ", ".join(f"{k}={cfg[k]}" for k in ("num_layers", "num_single_layers") if k in cfg)
    print(f"model        {summary['model_class']}  {shape}")
    print(
        f"quantization {q.get('method', 'svdquant')} {q.get('format')} group {q.get('group_size')} "
        f"rank {q.get('rank')} smooth={q.get('smooth')} gptq={q.get('gptq')} "
        f"dtype={q.get('dtype')}"
    )
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["layers_by_kind"].items()))
    layers = summary["layers"].values()
    unsigned = sum(bool(i.get("act_unsigned")) and "part_of" not in i for i in layers)
    split = summary["layers_by_kind"].get("svdq_split", 0)
    notes = [f"{unsigned} with unsigned activation codes"] if unsigned else []
    notes += [f"{split} split into signed + unsigned parts"] if split else []
    if notes:
        kinds += f" ({'; '.join(notes)})"
    print(f"layers       {kinds}")
    b = summary["bytes"]
    mib = 1024**2
    print(
        f"size         {b['total'] / mib:.2f} MiB = {summary['size_vs_bf16']:.3f}x the 16-bit "
        f"model ({b['bf16_equivalent'] / mib:.2f} MiB): 4-bit codes {b['codes_4bit'] / mib:.2f}, "
        f"scales {b['scales'] / mib:.2f}, low-rank+smooth {b['low_rank_and_smooth'] / mib:.2f}, "
        f"16-bit rest {b['other'] / mib:.2f}"
    )
    rows = _layer_rows(summary)
    errs = [r["err_svdq"] for r in rows if r["err_svdq"] is not None]
    if errs:
        print(
            f"calibration  relative output error: mean {sum(errs) / len(errs):.4f}, "
            f"max {max(errs):.4f} over {len(errs)} layers"
        )
    held = [r["err_heldout"] for r in rows if r["err_heldout"] is not None]
    if held:
        print(
            f"held-out     relative output error: mean {sum(held) / len(held):.4f}, "
            f"max {max(held):.4f} over {len(held)} layers (calibration tokens no choice was "
            "fitted on)"
        )
    header = (
        "authenticated (metadata and tensor table match their SHA-256)"
        if summary["header_authenticated"]
        else "not authenticated (no header checksum: written by dcgen_quant 0.1.0 or earlier)"
    )
    print(f"header       {header}")
    checked = "verified (CRC-32 and values)" if summary["verified"] else "not checked (--no-verify)"
    print(f"tensors      {checked}")
    if args.layers:
        columns = [
            ("name", "layer", None), ("kind", "kind", None), ("acts", "acts", None),
            ("in_features", "K", None), ("out_features", "N", None), ("rank", "r", None),
            ("err_rtn", "err RTN", ".4f"),
            ("err_smooth", "err smooth", ".4f"), ("err_svdq", "err SVDQ", ".4f"),
            ("err_heldout", "held-out", ".4f"),
        ]  # fmt: skip
        print()
        print(format_table(rows, columns))
    return 0
