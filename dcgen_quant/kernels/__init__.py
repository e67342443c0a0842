"""Triton backend of dcgen_quant (installed as ``dcgen_quant.kernels``).

The backend module that :mod:`dcgen_quant.ops` dispatches to with ``backend="triton"``: one
function per op with exactly the op's signature, plus :func:`unavailable_reason` and
:func:`preferred_layout`. The functions run the kernels on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (how the tests drive them). A call they cannot serve raises
:class:`dcgen_quant.ops.BackendUnsupported`; ops.py has already checked shapes and dtypes.

Kernel files (one family each; docs/KERNELS.md, "Triton kernels"):

==================  ==========================================================================
act_quant.py        smoothing + per-group 4-bit quantization + packing + x @ lora_down
gemm_int4.py        W4A4 INT4: int8 tensor-core dots per 64-group, fused low-rank epilogue
gemm_nvfp4.py       W4A4 NVFP4: dot_scaled (sm_100/120) or exact bf16 upcast
gemm_weight_only.py 4-bit weights x 16-bit activations
flash_attn.py       flash attention forward, 16-bit
flash_attn_8bit.py  INT8 Q.K^T + FP8 P.V attention (:func:`attention_8bit`)
numerics.py         exact rounding and 4-bit decoding helpers
gemm_epilogue.py    tile mapping and the fused epilogue of the GEMMs
tuning.py           autotune configurations (sm_90, sm_120), pruning, interpreter tiles
aot.py              ahead-of-time compilation for a GPU that is not present (PTX checks)
==================  ==========================================================================

Kernel files are named apart from the op functions (a submodule import would otherwise shadow
the function of the same name on this package). Importing this package does not import triton:
the kernel files are imported on first use, so ``unavailable_reason()`` can explain what is
missing on a machine without triton.
"""

from __future__ import annotations

import importlib
import sys

import torch

from dcgen_quant import capabilities
from dcgen_quant.formats import check_unsigned, get_format
from dcgen_quant.formats.layouts import CANONICAL

__all__ = [
    "attention",
    "attention_8bit",
    "gemm_w4a4",
    "gemm_w4a16",
    "preferred_layout",
    "quantize_act",
    "unavailable_reason",
]

LAYOUTS = (CANONICAL, "split_halves")
MAX_HEAD_DIM = 128  # any D up to this; non-powers of two are padded (e.g. SANA's 112)
MAX_RANK = 256


def _mode_mismatch() -> str | None:
    """Triton fixes interpreter vs compiled mode when ``triton.language`` is first imported (its
    own ``@triton.jit`` helpers are built then); a later change of TRITON_INTERPRET cannot
    take effect in this process."""
    language = sys.modules.get("triton.language")
    if language is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    built_interpreted = isinstance(language.standard.zeros, InterpretedFunction)
    if built_interpreted != capabilities.triton_interpret():
        now = "set" if capabilities.triton_interpret() else "unset"
        return (
            f"TRITON_INTERPRET is {now} now but was not when triton was first imported in this "
            "process; set it before anything imports triton"
        )
    return None


def unavailable_reason() -> str | None:
    """None if the Triton kernels can run here, else a sentence saying what is missing."""
    if reason := capabilities.triton_unavailable():
        return reason
    if reason := _mode_mismatch():
        return reason
    if capabilities.triton_interpret():
        return None
    if reason := capabilities.cuda_unavailable():
        return (
            f"the Triton kernels need a CUDA GPU ({reason}); set TRITON_INTERPRET=1 to run them "
            "on CPU tensors in the Triton interpreter instead (slow; for tests)"
        )
    return None


def preferred_layout(fmt: str) -> str:
    """The nibble layout this backend's kernels read best (docs/KERNELS.md, "Triton kernels").

    ``int4``: ``split_halves`` (quantize_act loads the two nibble halves of a group as two
    contiguous runs; the GEMM is layout-agnostic). ``nvfp4``: ``canonical`` (what
    ``tl.dot_scaled`` reads on sm_100 / sm_120).
    """
    return "split_halves" if get_format(fmt).name == "int4" else CANONICAL


def _kernel_module(name: str):
    """Import kernels/<name>.py; its kernels must be built for the current mode.

    ``@triton.jit`` decides at decoration time whether a kernel runs compiled or interpreted.
    """
    from dcgen_quant.ops import BackendUnsupported

    if reason := unavailable_reason():
        raise BackendUnsupported(reason)
    module = importlib.import_module(f"{__name__}.{name}")
    if capabilities.triton_interpret() != module.INTERPRETED:
        raise BackendUnsupported(
            f"dcgen_quant/kernels/{name}.py was imported with TRITON_INTERPRET "
            f"{'set' if module.INTERPRETED else 'unset'}; it cannot change within a process"
        )
    return module


def _check_devices(op: str, *tensors) -> bool:
    """Raise BackendUnsupported unless the tensors can run here; return interpreter mode."""
    from dcgen_quant.ops import BackendUnsupported

    interpret = capabilities.triton_interpret()
    devices = {t.device.type for t in tensors if t is not None}
    if interpret and devices != {"cpu"}:
        raise BackendUnsupported(
            f"{op}: TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors only, got "
            f"tensors on {sorted(devices)}"
        )
    if not interpret and devices != {"cuda"}:
        raise BackendUnsupported(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
            f"got tensors on {sorted(devices)}"
        )
    return interpret


def _check_layout(op: str, layout: str) -> None:
    from dcgen_quant.ops import BackendUnsupported

    if layout not in LAYOUTS:
        raise BackendUnsupported(
            f"{op}: layout {layout!r} is not read by the Triton kernels; expected one of {LAYOUTS}"
        )


def _check_rank(op: str, r: int) -> None:
    from dcgen_quant.ops import BackendUnsupported

    if r > MAX_RANK:
        raise BackendUnsupported(f"{op}: rank r={r} exceeds the Triton kernels' limit {MAX_RANK}")


def quantize_act(x, smooth, lora_down, fmt, layout=CANONICAL, act_unsigned=False):
    """Triton ``dcgen_quant::quantize_act``: see :func:`dcgen_quant.ops.quantize_act`.

    Parameters
    ----------
    x : Tensor [M, K] bfloat16 / float16 / float32; smooth : Tensor [K] or None;
    lora_down : Tensor [K, r] or None; fmt : "int4" | "nvfp4"; layout : nibble order of q;
    act_unsigned : bool (INT4 only), see the op

    Returns
    -------
    q : Tensor [M, K/2] uint8; scales : Tensor [M, K/G]; lora_act : Tensor [M, r] float32
    """
    interpret = _check_devices("quantize_act", x, smooth, lora_down)
    _check_layout("quantize_act", layout)
    check_unsigned(fmt, act_unsigned)  # ValueError for NVFP4, as in ops (direct callers)
    if lora_down is not None:
        _check_rank("quantize_act", lora_down.shape[1])
    module = _kernel_module("act_quant")
    return module.quantize_act(
        x, smooth, lora_down, get_format(fmt).name, layout, interpret, act_unsigned
    )


def gemm_w4a4(
    q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, fmt, out_dtype,
    layout=CANONICAL, act_unsigned=False,
):  # fmt: skip
    """Triton ``dcgen_quant::gemm_w4a4``: see :func:`dcgen_quant.ops.gemm_w4a4`.

    Parameters
    ----------
    q : Tensor [M, K/2] uint8; scales : Tensor [M, K/G]; qweight : Tensor [N, K/2] uint8;
    wscales : Tensor [K/G, N]; lora_act : Tensor [M, r] float32 or None; proj_up : Tensor [N, r]
    or None; bias : Tensor [N] or None; wtscale : Tensor [] float32 (NVFP4) or None;
    fmt : "int4" | "nvfp4"; out_dtype : torch.dtype; layout : nibble order of q and qweight;
    act_unsigned : bool (INT4 only), q holds codes 0..15

    Returns
    -------
    y : Tensor [M, N], ``out_dtype``
    """
    interpret = _check_devices(
        "gemm_w4a4", q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale
    )
    _check_layout("gemm_w4a4", layout)
    check_unsigned(fmt, act_unsigned)
    if lora_act is not None:
        _check_rank("gemm_w4a4", lora_act.shape[1])
    if get_format(fmt).name == "int4":
        module = _kernel_module("gemm_int4")
        return module.gemm_w4a4_int4(
            q, scales, qweight, wscales, lora_act, proj_up, bias, out_dtype, interpret, act_unsigned
        )
    module = _kernel_module("gemm_nvfp4")
    return module.gemm_w4a4_nvfp4(
        q, scales, qweight, wscales, lora_act, proj_up, bias, wtscale, out_dtype, layout, interpret
    )


def gemm_w4a16(x, qweight, wscales, bias, wtscale, fmt, layout=CANONICAL):
    """Triton ``dcgen_quant::gemm_w4a16``: see :func:`dcgen_quant.ops.gemm_w4a16`.

    Parameters
    ----------
    x : Tensor [M, K] bfloat16 / float16 / float32; qweight : Tensor [N, K/2] uint8;
    wscales : Tensor [K/G, N]; bias : Tensor [N] or None; wtscale : Tensor [] float32 (NVFP4) or
    None; fmt : "int4" | "nvfp4"; layout : nibble order of qweight

    Returns
    -------
    y : Tensor [M, N], x.dtype
    """
    interpret = _check_devices("gemm_w4a16", x, qweight, wscales, bias, wtscale)
    _check_layout("gemm_w4a16", layout)
    module = _kernel_module("gemm_weight_only")
    return module.gemm_w4a16(
        x, qweight, wscales, bias, wtscale, get_format(fmt).name, layout, interpret
    )


def _check_attention(op: str, q) -> bool:
    from dcgen_quant.ops import BackendUnsupported

    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise BackendUnsupported(
            f"{op}: head dim D={q.shape[-1]} is not supported; expected 1 <= D <= {MAX_HEAD_DIM}"
        )
    return True


def attention(q, k, v, scale):
    """Triton ``dcgen_quant::attention``: see :func:`dcgen_quant.ops.attention`.

    Parameters
    ----------
    q : Tensor [B, H, S_q, D]; k, v : Tensor [B, H, S_kv, D]; bfloat16 / float16 / float32;
    D <= 128 (64 and 128 are the tuned cases; others are padded to a power of two);
    scale : float or None (1/sqrt(D))

    Returns
    -------
    o : Tensor [B, H, S_q, D], q.dtype
    """
    interpret = _check_devices("attention", q, k, v)
    _check_attention("attention", q)
    return _kernel_module("flash_attn").attention(q, k, v, scale, interpret)


def attention_8bit(q, k, v, scale=None):
    """8-bit attention: INT8 Q.K^T (per-token scales, K mean-centred) and FP8 E4M3 P.V.

    Not a custom op; a faster, less exact alternative to :func:`attention` with the same
    arguments (kernels/flash_attn_8bit.py documents the quantization and its accuracy).

    Parameters
    ----------
    q : Tensor [B, H, S_q, D]; k, v : Tensor [B, H, S_kv, D]; bfloat16 / float16; D in 64, 128
    scale : float or None (1/sqrt(D))

    Returns
    -------
    o : Tensor [B, H, S_q, D], q.dtype
    """
    from dcgen_quant.ops import BackendUnsupported
    from dcgen_quant.ops import _check_attention as check_args

    check_args(q, k, v)
    interpret = _check_devices("attention_8bit", q, k, v)
    if q.shape[-1] not in (64, 128):
        raise BackendUnsupported(f"attention_8bit: head dim D={q.shape[-1]} is not 64 or 128")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise BackendUnsupported(f"attention_8bit: dtype {q.dtype} is not bfloat16 / float16")
    return _kernel_module("flash_attn_8bit").attention_8bit(q, k, v, scale, interpret)
