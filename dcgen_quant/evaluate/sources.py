"""What ``evaluate`` compares: each ``--model`` / ``--reference`` resolved into a :class:`Source`.

A source is described from its files alone (class, config, fingerprint, autoencoder, text
encoders), so that images already in the cache are reused without loading any weights; the
transformer is loaded (through ``generate``'s loader) only when an image is missing.

Kinds:

- ``embedded``: ``tiny-flux`` / ``tiny-sana``, the tiny pipelines of
  :mod:`dcgen_quant.models.tiny_pipeline` (transformer, text encoders and autoencoder built in
  code from seed 0: the model ``quantize`` uses by default);
- ``checkpoint``: a 4-bit checkpoint (file or sharded directory); runs in its own dtypes;
- ``pipeline``: a FluxPipeline / SanaPipeline directory (its transformer, vae, text encoders);
- ``transformer``: a diffusers transformer directory (an adapted model's ``dcgen_adapt.json``
  names its autoencoder).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED = ("tiny-flux", "tiny-sana")
FAMILY = {"FluxTransformer2DModel": "flux", "SanaTransformer2DModel": "sana"}


@dataclass
class Source:
    """One model to generate images with (nothing loaded yet)."""

    spec: str
    """As given on the command line."""
    kind: str
    """``embedded``, ``checkpoint``, ``pipeline`` or ``transformer``."""
    model_class: str
    config: dict[str, Any]
    """The transformer's diffusers config."""
    fingerprint: str
    """Identifies the transformer's weights (part of every image's cache key)."""
    path: Path | None = None
    ae_dir: Path | None = None
    """The source's own autoencoder (pipeline ``vae``, adapted model's record), if any."""
    text_dir: Path | None = None
    """A pipeline directory with text encoders, if the source is one."""
    quant_dtype: str | None = None
    """A checkpoint's 16-bit dtype (``quantization_config.dtype``)."""
    calibration: dict | None = None
    """A checkpoint's per-layer calibration report (for layers.png)."""
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return FAMILY[self.model_class]

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (the --json output and metrics.json)."""
        return {
            "label": self.label,
            "spec": self.spec,
            "kind": self.kind,
            "model_class": self.model_class,
            "quant_dtype": self.quant_dtype,
            "quantization": self.extra.get("quantization"),
            "fingerprint": self.fingerprint,
        }


def _sha1(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def library_versions() -> str:
    """Versions that decide what the embedded models' seeded weights are."""
    import diffusers
    import torch
    import transformers

    from .. import __version__

    return f"dcgen_quant {__version__}, diffusers {diffusers.__version__}, " \
        f"transformers {transformers.__version__}, torch {torch.__version__}"  # fmt: skip


def _read_config(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from None


def describe_source(spec: str, what: str) -> Source:
    """A :class:`Source` for ``spec`` (``what`` names the argument in error messages)."""
    from ..adapt import data as D
    from ..adapt.runner import PIPELINES, TRANSFORMERS, _class_of
    from ..checkpoint import CheckpointError, is_checkpoint, read_metadata

    if spec in EMBEDDED:
        from ..models.tiny import TINY_FLUX_CONFIG, TINY_SANA_CONFIG

        cls = "FluxTransformer2DModel" if spec == "tiny-flux" else "SanaTransformer2DModel"
        config = dict(TINY_FLUX_CONFIG if spec == "tiny-flux" else TINY_SANA_CONFIG)
        return Source(spec, "embedded", cls, config, _sha1(spec, "seed 0", library_versions()))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{what} {spec!r}: no such file or directory (and not one of {', '.join(EMBEDDED)})"
        )
    if is_checkpoint(path):
        try:
            meta = read_metadata(path)  # validates the format; tensors are checked when loading
        except CheckpointError as exc:
            return _foreign_checkpoint(spec, path, what, exc)
        model = meta["model"] if isinstance(meta.get("model"), dict) else {}
        cls = str(model.get("class"))
        if cls not in FAMILY:
            raise ValueError(f"{what} {spec!r}: a checkpoint of a {cls}; expected {TRANSFORMERS}")
        qconfig = meta.get("quantization_config") or {}
        calibration = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else None
        fingerprint = _sha1("checkpoint", meta["checksums"], model, qconfig)
        source = Source(spec, "checkpoint", cls, dict(model.get("config") or {}), fingerprint,
                        path=path, quant_dtype=str(qconfig.get("dtype", "bfloat16")),
                        calibration=calibration)  # fmt: skip
        keys = ("format", "rank", "smooth", "gptq")
        source.extra["quantization"] = {k: qconfig.get(k) for k in keys}
        source.extra["layers"] = sorted(meta["layers"]) if isinstance(meta["layers"], dict) else []
        return source
    kind, cls = _class_of(path, what)
    if kind == "pipeline":
        if cls not in PIPELINES:
            raise ValueError(f"{what} {spec!r}: a {cls}; expected one of {tuple(PIPELINES)}")
        config = _read_config(path / "transformer" / "config.json", what)
        vae = path / "vae"
        has_text = (path / "text_encoder").is_dir()
        return Source(spec, "pipeline", str(config.get("_class_name")), config,
                      _sha1("dir", D.dir_fingerprint(path / "transformer")), path=path,
                      ae_dir=vae if vae.is_dir() else None,
                      text_dir=path if has_text else None)  # fmt: skip
    if cls not in TRANSFORMERS:
        raise ValueError(f"{what} {spec!r}: a {cls}; expected one of {TRANSFORMERS} or a pipeline")
    config = _read_config(path / "config.json", what)
    record = path / "dcgen_adapt.json"
    ae_dir = None
    if record.is_file():
        recorded = _read_config(record, what).get("autoencoder")
        ae_dir = Path(recorded) if recorded else None
    return Source(spec, "transformer", cls, config, _sha1("dir", D.dir_fingerprint(path)),
                  path=path, ae_dir=ae_dir)  # fmt: skip


def _file_fingerprint(path: Path) -> str:
    """Path, size, mtime and the safetensors header (names, dtypes, shapes, offsets) of a file."""
    st = path.stat()
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = fh.read(min(n, 1 << 26))
    return _sha1("file", str(path.resolve()), st.st_size, st.st_mtime_ns,
                 hashlib.sha1(header).hexdigest())  # fmt: skip


def _foreign_checkpoint(spec: str, path: Path, what: str, error: Exception) -> Source:
    """A ``.safetensors`` file without our metadata: whatever :func:`load_quantized` imports
    (another engine's 4-bit format), described from the loaded model; else ``error``."""
    from ..checkpoint import load_quantized

    try:
        model = load_quantized(path, device="cpu")
    except (ValueError, KeyError, TypeError, OSError):
        raise error from None  # not importable either: our format's own message
    cls = type(model).__name__
    if cls not in FAMILY:
        raise ValueError(f"{what} {spec!r}: a checkpoint of a {cls}; expected a FLUX / SANA model")
    qconfig = getattr(model, "dcgen_quant_config", None)
    dtype = str(getattr(qconfig, "dtype", "torch.bfloat16")).replace("torch.", "")
    report = getattr(model, "dcgen_quant_report", None)
    source = Source(spec, "checkpoint", cls, dict(model.config), _file_fingerprint(path),
                    path=path, quant_dtype=dtype,
                    calibration=report if isinstance(report, dict) else None)  # fmt: skip
    source.extra["quantization"] = {"format": getattr(qconfig, "format", None), "imported": True}
    return source


def assign_labels(sources: list[Source]) -> None:
    """Short unique labels (file / directory names) for tables, folders and the grid."""
    seen: dict[str, int] = {}
    for s in sources:
        base = s.spec if s.kind == "embedded" else (s.path.stem or s.path.name)
        if s.path is not None and s.path.name == "model" and s.path.parent.name:
            base = s.path.parent.name  # adapt's OUT/model: the run's name says more
        base = re.sub(r"[^A-Za-z0-9._+-]+", "_", base).strip("._") or "model"
        n = seen.get(base, 0)
        seen[base] = n + 1
        s.label = base if n == 0 else f"{base}-{n + 1}"


# --------------------------------------------------------------------------------------------
# the default reference


def _tiny_state(name: str) -> dict:
    from ..models.tiny import tiny_flux, tiny_sana

    model = (tiny_flux if name == "tiny-flux" else tiny_sana)(seed=0)
    return model.state_dict()


def _stored_tensors(source: Source):
    """(key, tensor) of the source's stored 16-bit tensors (checkpoint or transformer dir)."""
    from safetensors import safe_open

    if source.kind == "checkpoint":
        from ..checkpoint import _Reader

        files = _Reader(source.path).files
    elif source.kind == "transformer":
        files = sorted(source.path.glob("*.safetensors"))
    else:
        files = sorted((source.path / "transformer").glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, handle.get_tensor(key)


def embedded_origin(source: Source) -> str | None:
    """``tiny-flux`` / ``tiny-sana`` when ``source`` holds that embedded model (or a 4-bit
    checkpoint made from it): its config is the embedded one and every stored tensor that the
    embedded model has under the same name and shape equals it (in the stored dtype)."""
    from ..models.tiny import TINY_FLUX_CONFIG, TINY_SANA_CONFIG

    if source.kind == "embedded":
        return source.spec
    name = "tiny-flux" if source.model_class == "FluxTransformer2DModel" else "tiny-sana"
    want = TINY_FLUX_CONFIG if name == "tiny-flux" else TINY_SANA_CONFIG
    for key, value in want.items():
        have = source.config.get(key)
        if (list(have) if isinstance(have, (list, tuple)) else have) != (
            list(value) if isinstance(value, (list, tuple)) else value
        ):
            return None
    state = _tiny_state(name)
    # a quantized layer's own tensors (its bias absorbs shifts) are not the 16-bit model's
    quantized = tuple(f"{layer}." for layer in source.extra.get("layers", []))
    compared = 0
    for key, tensor in _stored_tensors(source):
        ref = None if key.startswith(quantized) else state.get(key)
        if ref is None or tuple(ref.shape) != tuple(tensor.shape) or not tensor.is_floating_point():
            continue
        if not (ref.to(tensor.dtype) == tensor).all():
            return None
        compared += 1
    return name if compared else None


def default_reference(models: list[Source]) -> str:
    """The ``--reference`` to use when none is given (the embedded model the models come from)."""
    origins = {m.spec: embedded_origin(m) for m in models}
    names = set(origins.values())
    if len(names) == 1 and None not in names:
        return names.pop()
    bad = next((spec for spec, name in origins.items() if name is None), models[0].spec)
    raise ValueError(
        f"--reference: required; {bad} was not made from the embedded "
        f"{' / '.join(EMBEDDED)} model (give the 16-bit model it came from)"
    )


# --------------------------------------------------------------------------------------------
# compatibility checks


def text_dims(source: Source) -> tuple:
    """The text-embedding widths the transformer reads (FLUX: T5 and pooled CLIP; SANA)."""
    c = source.config
    if source.family == "flux":
        return ("joint_attention_dim", c.get("joint_attention_dim")), (
            "pooled_projection_dim", c.get("pooled_projection_dim"))  # fmt: skip
    return (("caption_channels", c.get("caption_channels")),)


def check_compatible(reference: Source, models: list[Source]) -> None:
    """One family for all, and the same text-embedding widths (the prompts are embedded once)."""
    for m in models:
        if m.model_class != reference.model_class:
            raise ValueError(
                f"--model {m.spec}: a {m.model_class} cannot be compared with the reference, a "
                f"{reference.model_class} (mismatched model families)"
            )
        if text_dims(m) != text_dims(reference):
            raise ValueError(
                f"--model {m.spec}: reads text embeddings {dict(text_dims(m))}, the reference "
                f"{dict(text_dims(reference))}; the prompts are embedded once for all models"
            )


def latent_geometry(source: Source, ae) -> tuple[int, int]:
    """(autoencoder downsampling f, latent patch size p) with which ``source`` reads ``ae``'s
    latent (the rule of :func:`dcgen_quant.adapt.family.latent_patch_size`, from the config)."""
    from ..adapt import data as D

    c = int(ae.config.latent_channels)
    cfg = source.config
    if source.family == "flux":
        in_ch = int(cfg.get("in_channels", 64))
        p = math.isqrt(in_ch // c) if c > 0 else 0
        if p < 1 or c * p * p != in_ch:
            raise ValueError(
                f"{source.spec}: a FLUX model with in_channels {in_ch} cannot read the "
                f"{c}-channel latent of its autoencoder (pass --ae)"
            )
    else:
        if int(cfg.get("in_channels", c)) != c:
            raise ValueError(
                f"{source.spec}: a SANA model with in_channels {cfg.get('in_channels')} cannot "
                f"read the {c}-channel latent of its autoencoder (pass --ae)"
            )
        p = int(cfg.get("patch_size", 1))
    return D.ae_downsample(ae), p


def check_resolution(source: Source, ae, resolution: int) -> None:
    """``resolution`` must be a multiple of f * p (whole latent pixels and whole patches)."""
    f, p = latent_geometry(source, ae)
    if resolution < f * p or resolution % (f * p):
        raise ValueError(
            f"--resolution {resolution}: {source.label or source.spec} needs a multiple of "
            f"{f * p} (autoencoder downsampling {f} x latent patch {p})"
        )
