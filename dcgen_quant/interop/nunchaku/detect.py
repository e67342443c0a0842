"""Which foreign format a path holds (cheap: file names and the safetensors header only).

``load_quantized`` calls :func:`foreign_kind` first and hands a foreign path to
:func:`dcgen_quant.interop.nunchaku.importer.load_foreign`.
"""

from __future__ import annotations

from pathlib import Path

from ..safetensors_io import ForeignFormatError, read_header

LEGACY_BLOCKS = "transformer_blocks.safetensors"
# family-A layer names only Nunchaku FLUX / SANA files use (ours use diffusers names)
_MARKERS = (".qkv_proj.", ".mlp_fc1.", ".mlp_fc2.", ".out_proj.", ".inverted_conv.", ".point_conv.")


def foreign_kind(path: str | Path, strict: bool = False) -> str | None:
    """``"nunchaku"`` (v1.0 single file), ``"nunchaku-legacy"`` (folder), ``"deepcompressor"``
    (raw output folder), or None (a dcgen_quant checkpoint, or not recognized).

    ``strict``: raise the header's ForeignFormatError (e.g. truncation) instead of returning
    None for a ``.safetensors`` file that cannot be parsed.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model.pt").is_file() and (path / "scale.pt").is_file():
            return "deepcompressor"
        if (path / LEGACY_BLOCKS).is_file():
            return "nunchaku-legacy"
        return None
    if not path.is_file():
        return None
    try:
        header = read_header(path)
    except ForeignFormatError:
        if strict:
            raise
        return None
    if header.metadata.get("format") == "dcgen_quant":
        return None
    if any(m in key for key in header.tensors for m in _MARKERS):
        return "nunchaku"
    return None
