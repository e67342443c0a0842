"""The ``cuda`` backend of the dcgen_quant ops: csrc/ through the pybind11 module ``_C``.

Each op has exactly the signature of :mod:`dcgen_quant.ops` (which has already checked shapes
and dtypes). This module only maps tensors onto the C ABI (csrc/include/dcgen_quant/
dcgen_quant.h): ``tensor.data_ptr()``, row strides, the current stream, outputs allocated with
torch. A call the library cannot serve (format, dtype, layout, rank, GPU architecture) raises
:class:`dcgen_quant.ops.BackendUnsupported` with the library's reason, so ``auto`` falls back.

``DCGEN_QUANT_CUDA_GEMM=auto|mma|wgmma`` picks the W4A4 GEMM kernel family where an architecture
has two (sm_90a: wgmma by default, mma.sync as the alternative).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from . import capabilities
from .formats import get_format
from .formats.layouts import CANONICAL

_HERE = Path(__file__).resolve().parent
_LAYOUTS = {"canonical": 0, "split_halves": 1}
# The W4A16 kernel is a CUDA-core GEMV (AdaLayerNorm layers: M = batch). Larger M re-reads the
# weights per 4 rows and runs without tensor cores; such calls go to the next backend.
W4A16_MAX_M = 64
_VARIANTS = {"auto": 0, "mma": 1, "wgmma": 2}


def _ops():
    from . import ops  # late: ops imports this module lazily, and vice versa

    return ops


def _installed_dir() -> Path | None:
    """Another ``dcgen_quant`` package directory on ``sys.path`` that holds a build record: the
    installed copy when this module is imported from a source checkout that shadows a
    (non-editable) installation. None if there is none."""
    for entry in sys.path:
        try:
            path = (Path(entry or ".") / "dcgen_quant").resolve()
        except OSError:
            continue
        if path != _HERE and (path / "_cuda_build.json").is_file():
            return path
    return None


def build_dir() -> Path | None:
    """The package directory that holds the CUDA build (_cuda_build.json, _C, the library).

    Normally this package's own directory. Run from a source checkout after a non-editable
    ``pip install .``, ``import dcgen_quant`` finds the checkout, which has no build, while the
    build went into site-packages; then the installed directory is used.
    """
    for path in (_HERE, _installed_dir()):
        if path is not None and (path / "_cuda_build.json").is_file():
            return path
    return None


@functools.cache
def build_info() -> dict | None:
    """The install-time build record (_cuda_build.json), or None if there is none."""
    path = build_dir()
    return None if path is None else json.loads((path / "_cuda_build.json").read_text())


@functools.cache
def _library():
    """The _C module, or a string saying why it is not usable."""
    info = build_info()
    if info is None:
        return (
            "the CUDA library was not built (no _cuda_build.json next to dcgen_quant: the "
            "package was installed without its build step); reinstall with nvcc on PATH"
        )
    if not info.get("built"):
        return f"the CUDA library was not built: {info.get('reason')}"
    path = build_dir()
    package = sys.modules[__package__]
    if path != _HERE and str(path) not in package.__path__:
        package.__path__.append(str(path))  # _C and libdcgen_quant.so live in the installed copy
    try:
        from . import _C
    except ImportError as exc:
        return f"the CUDA library was built but failed to load: {exc}"
    return _C


def unavailable_reason() -> str | None:
    """None if the CUDA library can run here, else what is missing and how to get it."""
    lib = _library()
    if isinstance(lib, str):
        return lib
    if reason := capabilities.cuda_unavailable():
        return reason
    major, minor = torch.cuda.get_device_capability()
    if lib.check_compute_capability(lib.OP_QUANTIZE_ACT, lib.FORMAT_INT4, major, minor):
        return lib.last_error_message()
    return None


def preferred_layout(fmt: str) -> str:
    """The kernels read the canonical nibble order natively (see docs/KERNELS.md)."""
    get_format(fmt)
    return CANONICAL


def _lib():
    lib = _library()
    if isinstance(lib, str):
        raise _ops().BackendUnsupported(lib)
    return lib


def _dtype_code(lib, dtype: torch.dtype) -> int:
    return {
        torch.float32: lib.DTYPE_FLOAT32,
        torch.float16: lib.DTYPE_FLOAT16,
        torch.bfloat16: lib.DTYPE_BFLOAT16,
        torch.float8_e4m3fn: lib.DTYPE_FLOAT8_E4M3,
    }[dtype]


def _fmt_code(lib, fmt: str) -> int:
    return lib.FORMAT_NVFP4 if get_format(fmt).name == "nvfp4" else lib.FORMAT_INT4


def _unsupported(message: str):
    return _ops().BackendUnsupported(message)


def _check_call(lib, op: int, fmt: str, layout: str, device: torch.device) -> int:
    """Device and layout checks shared by the ops; returns the layout code."""
    if device.type != "cuda":
        raise _unsupported(f"the CUDA library needs CUDA tensors, got device {device}")
    if layout not in _LAYOUTS:
        raise _unsupported(
            f"layout {layout!r} is not read by the CUDA kernels (they read {sorted(_LAYOUTS)})"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if lib.check_compute_capability(op, _fmt_code(lib, fmt), major, minor):
        raise _unsupported(lib.last_error_message())
    return _LAYOUTS[layout]


def _raise_for(lib, status: int, what: str) -> None:
    if status == lib.SUCCESS:
        return
    message = f"{what}: {lib.error_string(status)}: {lib.last_error_message()}"
    if status in (lib.ERROR_UNSUPPORTED, lib.ERROR_ARCH_NOT_BUILT, lib.ERROR_NO_DEVICE):
        raise _unsupported(message)
    if status in (lib.ERROR_INVALID_ARGUMENT, lib.ERROR_MISALIGNED):
        raise ValueError(message)
    raise RuntimeError(message)


def _rows(t: Tensor, elems: int = 1, align: int = 1) -> Tensor:
    """t with unit stride along its last dim, a row stride that is a multiple of `elems` and a
    data pointer aligned to `align` bytes (copied only when it is not already so)."""
    ok = t.stride(-1) == 1 or t.shape[-1] == 1
    if t.dim() == 2:
        ok = ok and (t.shape[0] <= 1 or t.stride(0) % elems == 0)
    if ok and t.data_ptr() % align == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _ld(t: Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def quantize_act(x, smooth, lora_down, fmt, layout=CANONICAL, act_unsigned=False):
    """Backend of ``dcgen_quant.ops.quantize_act`` (same arguments and results)."""
    lib = _lib()
    layout_code = _check_call(lib, lib.OP_QUANTIZE_ACT, fmt, layout, x.device)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise _unsupported(f"x has dtype {x.dtype}; the CUDA kernels take bfloat16 or float16")
    for name, t in (("smooth", smooth), ("lora_down", lora_down)):
        if t is not None and t.dtype != x.dtype:
            raise _unsupported(f"{name} has dtype {t.dtype}; the CUDA kernel needs x's {x.dtype}")
    rank = 0 if lora_down is None else lora_down.shape[1]
    if rank > 128:
        raise _unsupported(f"lora_down has rank {rank}; the CUDA quantize_act supports <= 128")
    spec = get_format(fmt)
    m, k = x.shape
    x = _rows(x, 8, 16)
    scale_dtype = torch.float8_e4m3fn if spec.name == "nvfp4" else x.dtype
    q = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((m, k // spec.group_size), dtype=scale_dtype, device=x.device)
    lora_act = torch.empty((m, rank), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales, lora_act
    smooth = None if smooth is None else _rows(smooth.reshape(-1), 1, 16)
    if lora_down is not None:
        lora_down = _rows(lora_down, 1, 2)
    with torch.cuda.device(x.device):
        status = lib.quantize_act(
            _stream(x.device),
            fmt=_fmt_code(lib, fmt),
            layout=layout_code,
            act_unsigned=int(act_unsigned),
            m=m,
            k=k,
            rank=rank,
            x_dtype=_dtype_code(lib, x.dtype),
            x=x.data_ptr(),
            ldx=_ld(x),
            smooth=None if smooth is None else smooth.data_ptr(),
            lora_down=None if lora_down is None else lora_down.data_ptr(),
            ld_lora_down=0 if lora_down is None else _ld(lora_down),
            q=q.data_ptr(),
            ldq=k // 2,
            scales=scales.data_ptr(),
            ld_scales=scales.shape[1],
            lora_act=lora_act.data_ptr() if rank else None,
            ld_lora_act=rank,
        )
    _raise_for(lib, status, "dcgen_quant cuda quantize_act")
    return q, scales, lora_act


def _one_dtype(tensors: dict, what: str) -> torch.dtype | None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise _unsupported(f"{what} must share one 16-bit dtype on the CUDA backend, got {dtypes}")
    dtype = next(iter(dtypes.values()), None)
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise _unsupported(f"{what} have dtype {dtype}; the CUDA kernels take bfloat16 / float16")
    return dtype


def gemm_w4a4(
    q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, fmt, out_dtype,
    layout=CANONICAL, act_unsigned=False,
):  # fmt: skip
    """Backend of ``dcgen_quant.ops.gemm_w4a4`` (same arguments and result)."""
    lib = _lib()
    layout_code = _check_call(lib, lib.OP_GEMM_W4A4, fmt, layout, q.device)
    spec = get_format(fmt)
    m, n, k = q.shape[0], qweight.shape[0], q.shape[1] * 2
    if spec.name == "int4":
        scale_dtype = _one_dtype({"scales": scales, "wscales": wscales}, "scales and wscales")
    else:
        scale_dtype = torch.float8_e4m3fn
    io_dtype = _one_dtype({"proj_up": proj_up, "bias": bias}, "proj_up and bias")
    io_dtype = io_dtype or (scale_dtype if spec.name == "int4" else torch.bfloat16)
    rank = 0 if lora_act is None else lora_act.shape[1]
    variant = os.environ.get("DCGEN_QUANT_CUDA_GEMM", "auto").strip().lower() or "auto"
    if variant not in _VARIANTS:
        raise ValueError(f"DCGEN_QUANT_CUDA_GEMM={variant!r}; expected auto, mma or wgmma")
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m == 0 or n == 0:
        return out
    q, qweight = _rows(q, 8, 8), _rows(qweight, 8, 8)  # 16-byte aligned rows use 16-byte copies
    scales, wscales = _rows(scales), _rows(wscales)
    if rank:
        lora_act = _rows(lora_act.to(torch.float32), 1, 4)
        proj_up = _rows(proj_up, 1, 2)
    if wtscale is not None:
        wtscale = wtscale.to(device=q.device, dtype=torch.float32).reshape(1).contiguous()
    bias = None if bias is None else _rows(bias.reshape(-1), 1, 2)
    with torch.cuda.device(q.device):
        status = lib.gemm_w4a4(
            _stream(q.device),
            fmt=_fmt_code(lib, fmt),
            layout=layout_code,
            act_unsigned=int(act_unsigned),
            variant=_VARIANTS[variant],
            m=m,
            n=n,
            k=k,
            rank=rank,
            scale_dtype=_dtype_code(lib, scale_dtype),
            io_dtype=_dtype_code(lib, io_dtype),
            out_dtype=_dtype_code(lib, out_dtype),
            q=q.data_ptr(),
            ldq=_ld(q),
            scales=scales.data_ptr(),
            ld_scales=_ld(scales),
            qweight=qweight.data_ptr(),
            ldqw=_ld(qweight),
            wscales=wscales.data_ptr(),
            ld_wscales=_ld(wscales),
            lora_act=lora_act.data_ptr() if rank else None,
            ld_lora_act=_ld(lora_act) if rank else 0,
            proj_up=proj_up.data_ptr() if rank else None,
            ld_proj_up=_ld(proj_up) if rank else 0,
            bias=None if bias is None else bias.data_ptr(),
            wtscale=None if wtscale is None else wtscale.data_ptr(),
            out=out.data_ptr(),
            ldo=n,
        )
    _raise_for(lib, status, "dcgen_quant cuda gemm_w4a4")
    return out


def gemm_w4a16(x, qweight, wscales, bias, wtscale, fmt, layout=CANONICAL):
    """Backend of ``dcgen_quant.ops.gemm_w4a16`` (same arguments and result)."""
    lib = _lib()
    layout_code = _check_call(lib, lib.OP_GEMM_W4A16, fmt, layout, x.device)
    spec = get_format(fmt)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise _unsupported(f"x has dtype {x.dtype}; the CUDA kernels take bfloat16 or float16")
    if spec.name == "int4" and wscales.dtype != x.dtype:
        raise _unsupported(f"INT4 wscales have dtype {wscales.dtype}; the kernel needs {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise _unsupported(f"bias has dtype {bias.dtype}; the kernel needs x's {x.dtype}")
    m, k = x.shape
    if m > W4A16_MAX_M:
        raise _unsupported(
            f"x has M={m} rows; the CUDA W4A16 kernel is a GEMV for M <= {W4A16_MAX_M} "
            "(larger M runs faster on the triton backend's tensor-core GEMM)"
        )
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    x, qweight, wscales = _rows(x, 8, 16), _rows(qweight, 8, 8), _rows(wscales)
    if wtscale is not None:
        wtscale = wtscale.to(device=x.device, dtype=torch.float32).reshape(1).contiguous()
    bias = None if bias is None else _rows(bias.reshape(-1), 1, 2)
    with torch.cuda.device(x.device):
        status = lib.gemm_w4a16(
            _stream(x.device),
            fmt=_fmt_code(lib, fmt),
            layout=layout_code,
            m=m,
            n=n,
            k=k,
            x_dtype=_dtype_code(lib, x.dtype),
            x=x.data_ptr(),
            ldx=_ld(x),
            qweight=qweight.data_ptr(),
            ldqw=_ld(qweight),
            wscales=wscales.data_ptr(),
            ld_wscales=_ld(wscales),
            bias=None if bias is None else bias.data_ptr(),
            wtscale=None if wtscale is None else wtscale.data_ptr(),
            out=out.data_ptr(),
            ldo=n,
        )
    _raise_for(lib, status, "dcgen_quant cuda gemm_w4a16")
    return out


def attention(q, k, v, scale):
    """The CUDA library has no attention kernel (the triton backend has one)."""
    raise _unsupported("the CUDA library has no attention kernel; the triton backend serves it")


def quantize_act_host(x, smooth, lora_down, fmt, layout=CANONICAL, act_unsigned=False):
    """quantize_act on the CPU with the CUDA kernels' own scalar arithmetic (csrc/kernels/
    quant_math.h); the bit-exact contract test runs this without a GPU.

    Same arguments and results as ``quantize_act`` for CPU tensors (x bfloat16 / float16).
    """
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(lib)
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be a bfloat16/float16 CPU tensor, got {x.dtype} on {x.device}")
    spec = get_format(fmt)
    m, k = x.shape
    rank = 0 if lora_down is None else lora_down.shape[1]
    x = x.contiguous()
    smooth = None if smooth is None else smooth.to(x.dtype).contiguous()
    lora_down = None if lora_down is None else lora_down.to(x.dtype).contiguous()
    scale_dtype = torch.float8_e4m3fn if spec.name == "nvfp4" else x.dtype
    q = torch.full((m, k // 2), 0xAB, dtype=torch.uint8)
    scales = torch.empty((m, k // spec.group_size), dtype=scale_dtype)
    lora_act = torch.full((m, rank), float("nan"), dtype=torch.float32)
    status = lib.quantize_act_host(
        fmt=_fmt_code(lib, fmt),
        layout=_LAYOUTS[layout],
        act_unsigned=int(act_unsigned),
        m=m,
        k=k,
        rank=rank,
        x_dtype=_dtype_code(lib, x.dtype),
        x=x.data_ptr(),
        ldx=k,
        smooth=None if smooth is None else smooth.data_ptr(),
        lora_down=None if lora_down is None else lora_down.data_ptr(),
        ld_lora_down=rank,
        q=q.data_ptr(),
        ldq=k // 2,
        scales=scales.data_ptr(),
        ld_scales=scales.shape[1],
        lora_act=lora_act.data_ptr() if rank else None,
        ld_lora_act=rank,
    )
    if status != lib.SUCCESS:
        raise ValueError(f"{lib.error_string(status)}: {lib.last_error_message()}")
    return q, scales, lora_act
