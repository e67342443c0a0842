"""dcgen_quant: DC-Gen post-training, SVDQuant 4-bit quantization and 4-bit kernels for
text-to-image diffusion transformers (FLUX, SANA).

Public API (stable; see DESIGN.md): ``QuantConfig``, ``quantize_linear``, ``quantize_model``,
``save_quantized``, ``load_quantized``, ``SVDQLinear``, ``W4A16Linear``, ``set_backend``,
``get_backend`` and the ``adapt`` functions (``surgery``, ``align``, ``align_head``,
``finetune_lora``, ``merge``). Names are imported on first use, so ``import dcgen_quant`` is
cheap (it does not import torch).

The custom ops (``torch.ops.dcgen_quant.*``) are registered as soon as both this package and
torch are imported, in either order: at once if torch is already imported, otherwise right
after torch's own import finishes (a one-shot import hook), so that code reaching the ops
through ``torch.ops`` (other runtimes, torch.compile users) needs no side import.
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

# The repository keeps bench/ at its top and installs it as dcgen_quant.bench (setup.py). When
# this package is imported from a source checkout instead of an installation (e.g.
# `python -m dcgen_quant` run in the repository root, where the checkout shadows the installed
# copy), search the repository root for that subpackage too.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_ROOT, "setup.py")) and os.path.isfile(
    os.path.join(_ROOT, "bench", "__init__.py")
):
    __path__.append(_ROOT)  # noqa: F821 (the package's own __path__)

_PUBLIC = {
    "QuantConfig": "dcgen_quant.quantize.config",
    "quantize_linear": "dcgen_quant.quantize",
    "quantize_model": "dcgen_quant.quantize",
    "save_quantized": "dcgen_quant.checkpoint",
    "load_quantized": "dcgen_quant.checkpoint",
    "SVDQLinear": "dcgen_quant.nn",
    "W4A16Linear": "dcgen_quant.nn",
    "set_backend": "dcgen_quant.ops",
    "get_backend": "dcgen_quant.ops",
    "surgery": "dcgen_quant.adapt",
    "align": "dcgen_quant.adapt",
    "align_head": "dcgen_quant.adapt",
    "finetune_lora": "dcgen_quant.adapt",
    "merge": "dcgen_quant.adapt",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dcgen_quant' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


def _register_ops() -> None:
    try:
        importlib.import_module("dcgen_quant.ops")
    except Exception as exc:  # never break the import of torch or of this package
        import warnings

        warnings.warn(f"dcgen_quant ops not registered: {exc}", stacklevel=2)


class _RegisterOpsAfterTorch:
    """A meta path finder that registers the ops once ``import torch`` has finished, then
    leaves sys.meta_path. (No importlib.abc base: importing it costs more than this package.)"""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec("torch")  # the real finders, this one being gone
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, original = spec.loader, spec.loader.exec_module

        def exec_module(module):
            original(module)
            del loader.exec_module  # back to the loader's own method
            _register_ops()

        loader.exec_module = exec_module  # this loader instance serves torch alone
        return spec


if "torch" in sys.modules:
    _register_ops()
elif not any(isinstance(f, _RegisterOpsAfterTorch) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOpsAfterTorch())
