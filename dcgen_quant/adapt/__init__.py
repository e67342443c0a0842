"""DC-Gen post-training: move a pretrained FLUX / SANA transformer into a deeply compressed
autoencoder's latent space (surgery, embedding alignment, output-head alignment, LoRA, merge).

Public API: :func:`surgery`, :func:`align`, :func:`align_head`, :func:`finetune_lora`,
:func:`merge` (plus :class:`TrainConfig`, :class:`FlowObjective`, :class:`LatentSet`). Names are
imported on first use so that ``python -m dcgen_quant adapt --help`` stays fast. See
docs/ADAPT.md for the method and the CLI.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "surgery": "dcgen_quant.adapt.surgery",
    "save_adapted": "dcgen_quant.adapt.surgery",
    "load_adapted": "dcgen_quant.adapt.surgery",
    "align": "dcgen_quant.adapt.stages",
    "align_head": "dcgen_quant.adapt.stages",
    "finetune_lora": "dcgen_quant.adapt.stages",
    "merge": "dcgen_quant.adapt.stages",
    "reconcile": "dcgen_quant.adapt.stages",
    "lstsq_embedder": "dcgen_quant.adapt.stages",
    "TrainConfig": "dcgen_quant.adapt.train",
    "FlowObjective": "dcgen_quant.adapt.flow",
    "LatentSet": "dcgen_quant.adapt.data",
    "TextBatch": "dcgen_quant.adapt.family",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dcgen_quant.adapt' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
