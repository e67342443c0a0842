"""What this machine can do: the single place that answers it.

Both code paths (backend selection in :mod:`dcgen_quant.ops`) and the test suite's skip markers
(tests/conftest.py) ask these functions, so a missing capability is reported the same way
everywhere. Functions named ``*_unavailable`` return ``None`` when the capability is present,
else a sentence saying what is missing and how to get it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil

import torch


def cuda_unavailable() -> str | None:
    """None if a CUDA GPU is usable by torch, else why not."""
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch "
            "(https://pytorch.org/get-started/locally/) to run on a GPU"
        )
    if not torch.cuda.is_available():
        return (
            "torch has CUDA support but no CUDA GPU is visible "
            "(check the driver and CUDA_VISIBLE_DEVICES)"
        )
    return None


def check_device(spec: str, flag: str = "device") -> torch.device:
    """``torch.device(spec)`` for a CPU or a usable CUDA GPU; ValueError naming ``flag`` and what
    is missing otherwise (a CPU-only torch build, no GPU visible, a GPU index out of range)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {spec!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"{flag} {spec!r}: only cpu and cuda devices are supported")
    if reason := cuda_unavailable():
        raise ValueError(f"{flag} {spec}: {reason}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def cuda_capability(device: torch.device | int | None = None) -> tuple[int, int] | None:
    """(major, minor) compute capability of ``device``, or None without a GPU."""
    if cuda_unavailable() is not None:
        return None
    return torch.cuda.get_device_capability(device)


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_unavailable() -> str | None:
    """None if the ``triton`` package is importable, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed; `pip install triton` (Linux) to use it"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # import errors from a broken install are reported, not hidden
        return f"triton is installed but failed to import: {exc}"
    return None


def nvcc_path() -> str | None:
    """Path of nvcc (``$CUDA_HOME/bin/nvcc`` or on PATH), or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_unavailable() -> str | None:
    """None if nvcc can be found, else why not."""
    if nvcc_path() is None:
        return "nvcc not found on PATH or under $CUDA_HOME/bin; install the CUDA toolkit"
    return None
