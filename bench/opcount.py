"""Count the FLOPs and bytes of every op of a real forward pass (on the meta device).

:func:`trace` runs a callable under two torch modes and returns one :class:`Op` per GPU kernel
that eager PyTorch would launch:

* a ``TorchFunctionMode`` catches ``F.scaled_dot_product_attention`` and records it as ONE fused
  attention op (FLOPs from ``torch.utils.flop_counter``'s SDPA formula, bytes = q + k + v + o,
  which is what a flash-attention kernel moves), then returns an empty output without running
  the math decomposition (whose N^2 score matrix a fused kernel never writes);
* a ``TorchDispatchMode`` sees every other aten op. Matrix ops take their FLOPs from
  ``torch.utils.flop_counter.flop_registry`` (the same formulas as ``FlopCounterMode``). Bytes
  are those of every tensor read and written, each counted at most at its storage size (an
  expanded broadcast operand is read once). Views, aliases and allocations move nothing and
  launch nothing, so they are dropped. The dcgen_quant custom ops (``quantize_act``,
  ``gemm_w4a4``, ``gemm_w4a16``) are recorded with their own FLOP / byte counts.

Each op is classified by what it is and by the innermost module that ran it: ``attention``
(fused SDPA, or matrix products inside an attention module that are not its projections, e.g.
SANA's and DC-AE's linear attention), ``linear`` (matrix products and convolutions, 4-bit GEMMs,
activation quantization), ``other`` (everything memory-bound: norms, activations, RoPE,
modulation, copies). The latency model (:mod:`dcgen_quant.bench.latency`) maps them on a GPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Op", "trace", "expand", "summarize"]

# Tile edge used to count output tiles of GEMMs and query blocks of attention (wave model).
TILE = 128

_aten = torch.ops.aten
# Ops that allocate or re-view memory: no kernel, no traffic. (Views with an alias annotation
# in their schema are recognized by _is_view; _unsafe_view has none but is a view.)
_FREE = {
    _aten.empty.memory_format, _aten.empty_like.default, _aten.empty_strided.default,
    _aten.new_empty.default, _aten.new_empty_strided.default, _aten.lift_fresh.default,
    _aten.detach.default, _aten._local_scalar_dense.default, _aten.set_.source_Storage,
    _aten.resize_.default, _aten._unsafe_view.default,
}  # fmt: skip
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"}
_CONV = {"convolution", "_convolution", "cudnn_convolution", "convolution_overrideable"}


@dataclass
class Op:
    """One kernel of the traced forward.

    ``kind``: ``"mm"`` (16-bit matrix product / convolution), ``"attn"`` (fused attention),
    ``"w4a4"`` (4-bit GEMM; ``flops_aux`` = its 16-bit low-rank branch), ``"w4a16"``,
    ``"quant"`` (activation quantization; ``flops_aux`` = its low-rank down projection),
    ``"mem"`` (memory-bound). ``component``: ``"attention"`` | ``"linear"`` | ``"other"``.
    ``tiles``: output tiles (GEMM, 128x128) or query blocks (attention, 128 rows), for the wave
    model. ``dtype``: dtype of the first tensor input.
    """

    name: str
    kind: str
    component: str
    flops: float
    bytes: float
    tiles: int = 0
    flops_aux: float = 0.0
    dtype: str = "bfloat16"
    fmt: str = ""
    segment: str = ""  # tag of the repeated block this op ran in ("" outside blocks)


def _nbytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    n = t.numel() * t.element_size()
    with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without storage
        n = min(n, t.untyped_storage().nbytes())
    return n


def _tensors(tree) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (id(t.untyped_storage()) if t.device.type != "meta" else id(t), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += _nbytes(t)
    return total


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _gemm_tiles(out: torch.Tensor) -> int:
    if out.dim() < 2:
        return 1
    batch = math.prod(out.shape[:-2])
    return batch * math.ceil(out.shape[-2] / TILE) * math.ceil(out.shape[-1] / TILE)


def _conv_tiles(out: torch.Tensor) -> int:
    # implicit GEMM: M = N*H*W output pixels, N = output channels
    m = out.shape[0] * math.prod(out.shape[2:])
    return math.ceil(m / TILE) * math.ceil(out.shape[1] / TILE)


class _Scope:
    """Stack of the modules currently running (global forward hooks)."""

    def __init__(self, segments: dict[torch.nn.Module, str] | None = None):
        self.stack: list[torch.nn.Module] = []
        self.segments = segments or {}

    def __enter__(self):
        self._pre = register_module_forward_pre_hook(self._enter)
        self._post = register_module_forward_hook(self._leave, always_call=True)
        return self

    # hooks must return None: a forward hook's return value would replace the module's output
    def _enter(self, module, args) -> None:
        self.stack.append(module)

    def _leave(self, module, args, output) -> None:
        if self.stack:
            self.stack.pop()

    def __exit__(self, *exc):
        self._pre.remove()
        self._post.remove()

    def segment(self) -> str:
        for m in self.stack:
            if m in self.segments:
                return self.segments[m]
        return ""

    def in_attention_core(self) -> bool:
        """True inside an attention module but not inside one of its Linear / Conv layers."""
        inner = self.stack[-1] if self.stack else None
        if inner is None or isinstance(inner, (torch.nn.Linear, torch.nn.Conv2d)):
            return False
        return any("Attention" in type(m).__name__ or "MLA" in type(m).__name__ for m in self.stack)


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list[Op], scope: _Scope):
        super().__init__()
        self.ops, self.scope = ops, scope

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FREE or _is_view(func):
            return out
        n = len(self.ops)
        self._record(func, args, kwargs, out)
        for op in self.ops[n:]:
            op.segment = self.scope.segment()
        return out

    def _record(self, func, args, kwargs, out) -> None:
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        if not ins and not outs:
            return
        if any(t.device.type == "cpu" for t in ins + outs) and not all(
            t.device.type == "cpu" for t in ins + outs
        ):
            return  # host scalars mixed in: not a device kernel of its own
        packet = func._overloadpacket
        name = packet.__name__
        dtype = str(ins[0].dtype if ins else outs[0].dtype).replace("torch.", "")
        nbytes = float(_unique_bytes(ins) + _unique_bytes(outs))
        namespace = getattr(func, "namespace", "aten")
        if namespace == "dcgen_quant":
            self.ops.append(_custom_op(name, args, kwargs, out, nbytes))
        elif name in _MATMUL or name in _CONV:
            flops = float(flop_counter.flop_registry[packet](*args, **kwargs, out_val=out))
            tiles = _conv_tiles(outs[0]) if name in _CONV else _gemm_tiles(outs[0])
            comp = "attention" if self.scope.in_attention_core() else "linear"
            self.ops.append(Op(name, "mm", comp, flops, nbytes, tiles, dtype=dtype))
        elif packet in flop_counter.flop_registry:  # sdpa variants reached below the function mode
            flops = float(flop_counter.flop_registry[packet](*args, **kwargs, out_val=out))
            self.ops.append(Op(name, "attn", "attention", flops, nbytes, 1, dtype=dtype))
        else:
            self.ops.append(Op(name, "mem", "other", 0.0, nbytes, dtype=dtype))


def _custom_op(name, args, kwargs, out, nbytes) -> Op:
    """FLOPs of the dcgen_quant ops (see dcgen_quant/ops.py for their shapes)."""
    if name == "gemm_w4a4":
        q, qweight, lora_act, fmt = args[0], args[2], args[4], args[8]
        m, k, n = q.shape[0], q.shape[1] * 2, qweight.shape[0]
        r = 0 if lora_act is None else lora_act.shape[1]
        return Op(name, "w4a4", "linear", 2.0 * m * n * k, nbytes, _gemm_tiles(out),
                  flops_aux=2.0 * m * n * r, fmt=fmt)  # fmt: skip
    if name == "gemm_w4a16":
        x, qweight, fmt = args[0], args[1], args[5]
        m, k, n = x.shape[0], x.shape[1], qweight.shape[0]
        return Op(name, "w4a16", "linear", 2.0 * m * n * k, nbytes, _gemm_tiles(out), fmt=fmt)
    if name == "quantize_act":
        x, lora_down, fmt = args[0], args[2], args[3]
        r = 0 if lora_down is None else lora_down.shape[1]
        return Op(name, "quant", "linear", 0.0, nbytes, flops_aux=2.0 * x.shape[0] * x.shape[1] * r,
                  fmt=fmt)  # fmt: skip
    if name == "attention":
        q, k = args[0], args[1]
        flops = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        blocks = q.shape[0] * q.shape[1] * math.ceil(q.shape[2] / TILE)
        return Op(name, "attn", "attention", flops, nbytes, blocks)
    return Op(name, "mem", "other", 0.0, nbytes)


class _SDPA(TorchFunctionMode):
    """Records F.scaled_dot_product_attention as one fused kernel and skips its math."""

    def __init__(self, ops: list[Op], scope: _Scope):
        super().__init__()
        self.ops, self.scope = ops, scope

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value"), args))
            q, k, v = (named.get(n, kwargs.get(n)) for n in ("query", "key", "value"))
            flops = flop_counter.sdpa_flop_count(tuple(q.shape), tuple(k.shape), tuple(v.shape))
            out_shape = (*q.shape[:-1], v.shape[-1])
            nbytes = 2 * _nbytes(q) + _nbytes(k) + _nbytes(v)  # q and o have the same size
            blocks = math.prod(q.shape[:-2]) * math.ceil(q.shape[-2] / TILE)
            dtype = str(q.dtype).replace("torch.", "")
            self.ops.append(
                Op("sdpa", "attn", "attention", float(flops), float(nbytes), blocks, dtype=dtype,
                   segment=self.scope.segment())
            )  # fmt: skip
            with torch._C.DisableTorchFunction():
                return q.new_empty(out_shape)
        return func(*args, **kwargs)


def trace(fn: Callable[[], object], segments: dict[torch.nn.Module, str] | None = None) -> list[Op]:
    """Run ``fn()`` (typically a forward on meta tensors) and return its kernels in order.

    ``segments`` maps modules (e.g. transformer blocks) to a tag stored in ``Op.segment`` for
    every op that runs inside them (see :func:`expand`).
    """
    ops: list[Op] = []
    with _Scope(segments) as scope, _SDPA(ops, scope), _Recorder(ops, scope), torch.no_grad():
        fn()
    return ops


def expand(ops: list[Op], repeats: dict[str, int]) -> list[Op]:
    """Replicate each contiguous run of ops tagged ``tag`` ``repeats[tag]`` times (0 drops it).

    A model with N identical blocks runs, between its prologue and epilogue, the same kernels N
    times with the same shapes; tracing it with one block per kind and expanding is exact and
    N times cheaper (tests/bench/test_flops.py checks it against the full-depth model).
    """
    out: list[Op] = []
    i = 0
    while i < len(ops):
        tag = ops[i].segment
        j = i
        while j < len(ops) and ops[j].segment == tag:
            j += 1
        out.extend(ops[i:j] * repeats.get(tag, 1))
        i = j
    return out


def summarize(ops: list[Op]) -> dict[str, dict[str, float]]:
    """Totals per component: ``{component: {"flops", "bytes", "ops"}}`` plus ``"total"``."""
    out: dict[str, dict[str, float]] = {}
    for op in ops:
        for key in (op.component, "total"):
            d = out.setdefault(key, {"flops": 0.0, "bytes": 0.0, "ops": 0})
            d["flops"] += op.flops + op.flops_aux
            d["bytes"] += op.bytes
            d["ops"] += 1
    return out
