"""``python -m dcgen_quant convert IN OUT --to nunchaku|dcgen_quant``.

``--to nunchaku``: our FLUX checkpoint -> Nunchaku's v1.0 single ``.safetensors`` file
(:func:`dcgen_quant.interop.nunchaku.exporter.convert_to_nunchaku`). ``--to dcgen_quant``: a
Nunchaku file / legacy folder / DeepCompressor raw folder -> our checkpoint
(``dcgen_quant.interop.nunchaku.importer.convert_to_dcgen_quant``). docs/INTEROP.md has the
details; every change a conversion has to make is printed with its count.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

HELP = "convert a 4-bit checkpoint to or from Nunchaku's format (FLUX)"
TARGETS = ("nunchaku", "dcgen_quant")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="checkpoint to convert (file or directory)")
    parser.add_argument("output", type=Path, help="file (or directory) to write")
    parser.add_argument("--to", required=True, choices=TARGETS, help="target format")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float16"), default="bfloat16",
        help="--to nunchaku: 16-bit dtype of the file (bfloat16, as Nunchaku's published files)",
    )  # fmt: skip
    parser.add_argument(
        "--requantize", action="store_true",
        help="--to nunchaku: allow the changes Nunchaku's format forces (re-quantize adaLN "
        "layers that are not INT4 W4A16 with codes -7..7, fold the GELU shift into the bias of "
        "--signed-gelu layers, cast 16-bit tensors to --dtype); each is printed with its count. "
        "Without it such a layer is an error naming it",
    )  # fmt: skip
    parser.add_argument(
        "--latent-patch-size", type=int, default=None,
        help="--to nunchaku: ComfyUI patch size in comfy_config (default: 2 for FLUX.1's 64 "
        "output channels, else 1, e.g. a DC-Gen-adapted FLUX)",
    )  # fmt: skip
    parser.add_argument("--no-verify", action="store_true", help="skip input checksum checks")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _import_side():
    """``convert_to_dcgen_quant`` of the importer, or ValueError if it is not built yet."""
    try:
        module = importlib.import_module("dcgen_quant.interop.nunchaku.importer")
        return module.convert_to_dcgen_quant
    except (ImportError, AttributeError):
        raise ValueError(
            "--to dcgen_quant is not available in this build (the Nunchaku importer, "
            "dcgen_quant.interop.nunchaku.importer.convert_to_dcgen_quant, is missing)"
        ) from None


def run(args: argparse.Namespace) -> int:
    from ..tables import emit

    if args.to == "dcgen_quant":
        result = _import_side()(args.input, args.output)
        if isinstance(result, dict):
            emit([result], [(k, k, None) for k in result], args.json, title=f"wrote {args.output}")
        return 0
    from .nunchaku.exporter import convert_to_nunchaku

    result = convert_to_nunchaku(
        args.input, args.output, dtype=args.dtype, requantize=args.requantize,
        latent_patch_size=args.latent_patch_size, verify=not args.no_verify, progress=True,
    )  # fmt: skip
    row = {k: result[k] for k in ("format", "rank", "dtype", "tensors", "bytes", "seconds")}
    row["mib"] = row.pop("bytes") / 1024**2
    columns = [
        ("format", "format", None), ("rank", "rank", None), ("dtype", "dtype", None),
        ("tensors", "tensors", None), ("mib", "MiB", ".1f"), ("seconds", "seconds", ".1f"),
    ]  # fmt: skip
    changes = [
        {"change": c["what"], "lossy": "yes" if c["lossy"] else "no (format)",
         "layers": c["layers"], "values": c["values_changed"],
         "of": c["values_in_those_layers"], "first": c["first"]}
        for c in result["changes"]
    ]  # fmt: skip
    if args.json:
        import json

        print(json.dumps({**row, "output": result["output"], "changes": result["changes"]}))
        return 0
    emit([row], columns, False, title=f"wrote {result['output']} (Nunchaku v1.0 FLUX)")
    if changes:
        cols = [(k, k, None) for k in ("change", "lossy", "layers", "values", "of", "first")]
        emit(changes, cols, False, title="values changed")
    else:
        print("no value changed")
    return 0
