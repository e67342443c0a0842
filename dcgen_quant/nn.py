"""Runtime modules: the layers a quantized model is made of.

* :class:`SVDQLinear`: W4A4 with a 16-bit low-rank branch (SVDQuant); forward = one
  ``quantize_act`` + one ``gemm_w4a4``.
* :class:`W4A16Linear`: 4-bit weights, 16-bit activations (AdaLayerNorm linears).
* :class:`SVDQConv1x1`, :class:`W4A16Conv1x1`: the same on NCHW tensors, standing in for 1x1
  convolutions (SANA's GLUMBConv).
* :class:`SVDQSplitLinear`: one linear whose input columns are quantized in parts, each an
  SVDQLinear, outputs summed (FLUX single blocks' ``proj_out``: its attention columns signed,
  its GELU(MLP) columns unsigned).

Buffer names are the checkpoint keys (docs/FORMAT.md). ``state_dict()`` always holds the canonical
nibble layout; :meth:`set_layout` re-lays ``qweight`` in memory for a kernel (once, at load
time). ``module.to(dtype)`` leaves packed codes, FP8 block scales and the FP32 tensor scale in
their own dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import ops
from .formats import QuantizedWeight, check_unsigned, dequantize_weight, get_format
from .formats.layouts import CANONICAL, from_layout, get_layout, to_layout

_SIXTEEN_BIT = (torch.bfloat16, torch.float16, torch.float32)
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _QuantizedWeightMixin(nn.Module):
    """Shared weight storage of the 4-bit layers: qweight, wscales, wtscale, bias."""

    in_features: int
    out_features: int
    fmt: str

    def _init_weight_buffers(self, in_features, out_features, fmt, bias, dtype, device):
        spec = get_format(fmt)
        if in_features % spec.group_size:
            raise ValueError(
                f"in_features={in_features} must be a multiple of the {fmt} group size "
                f"{spec.group_size}"
            )
        if dtype not in _SIXTEEN_BIT:
            raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.layout = CANONICAL
        groups = in_features // spec.group_size
        kw = {"device": device}
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw)
        )
        self.register_buffer(
            "wscales", torch.zeros(groups, out_features, dtype=spec.scale_dtype(dtype), **kw)
        )
        wtscale = torch.ones((), dtype=torch.float32, **kw) if spec.has_tensor_scale else None
        self.register_buffer("wtscale", wtscale)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @property
    def group_size(self) -> int:
        return get_format(self.fmt).group_size

    def _pinned_buffers(self) -> list[str]:
        """Buffers whose dtype is part of the format: never cast by ``module.to(dtype)``."""
        names = ["wtscale"] if self.wtscale is not None else []
        if self.wscales.dtype == torch.float8_e4m3fn:
            names.append("wscales")
        return names

    def _apply(self, fn, recurse=True):
        # Hide the pinned floating-point buffers behind integer views of the same width, so that
        # a dtype cast skips them while a device move still applies.
        pinned = {name: self._buffers[name].dtype for name in self._pinned_buffers()}
        for name, dtype in pinned.items():
            self._buffers[name] = self._buffers[name].view(_BITS_VIEW[dtype.itemsize])
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, dtype in pinned.items():
                self._buffers[name] = self._buffers[name].view(dtype)

    def set_layout(self, layout: str) -> None:
        """Re-lay ``qweight`` in memory for a kernel's nibble order (formats/layouts.py)."""
        get_layout(layout)
        if layout != self.layout:
            canonical = from_layout(self.qweight, self.layout, self.fmt)
            self.qweight = to_layout(canonical, layout, self.fmt).contiguous()
            self.layout = layout

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != CANONICAL:
            destination[prefix + "qweight"] = from_layout(self.qweight, self.layout, self.fmt)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # incoming tensors are canonical; re-lay them after loading, never mutating the input
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.layout != CANONICAL and prefix + "qweight" in state_dict:
            self.qweight = to_layout(self.qweight, self.layout, self.fmt).contiguous()

    def quantized_weight(self) -> QuantizedWeight:
        """The weight in the canonical layout."""
        qweight = from_layout(self.qweight, self.layout, self.fmt)
        return QuantizedWeight(qweight, self.wscales, self.wtscale, self.fmt)

    def dequantized_weight(self) -> torch.Tensor:
        """The 4-bit weight as float32 [N, K] (residual only for SVDQLinear; for inspection)."""
        return dequantize_weight(self.quantized_weight())

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: input has {x.shape[-1]} features, "
                f"expected {self.in_features}"
            )
        return x.reshape(-1, self.in_features)


class SVDQLinear(_QuantizedWeightMixin):
    """W4A4 linear layer with a 16-bit low-rank branch: ``y ~= x W^T + b``.

    In detail, with ``x_s = x / smooth_factor``:
    ``y = Q(x_s) R_q^T + (x @ proj_down) @ proj_up^T + bias``, where ``R_q`` is the 4-bit residual
    (``qweight``/``wscales``/``wtscale``) of the smoothed weight ``W * smooth_factor``, and
    ``proj_down`` already contains the division by ``smooth_factor``.

    With ``act_unsigned`` (INT4 only; layers whose input is a GELU output), ``Q`` quantizes
    ``(x + UNSIGNED_ACT_SHIFT) / smooth_factor`` to unsigned codes 0..15, and ``bias`` holds the
    original bias minus the shift's contribution ``UNSIGNED_ACT_SHIFT * sum_k R_q[n, k] /
    smooth_factor[k]`` (the quantizer folds it in), so that ``y`` still approximates ``x W^T + b``.

    Buffers
    -------
    qweight : [N, K/2] uint8          wscales : [K/G, N] dtype (INT4) / float8_e4m3fn (NVFP4)
    wtscale : [] float32 (NVFP4)      smooth_factor : [K] dtype
    proj_down : [K, r] dtype          proj_up : [N, r] dtype
    bias : [N] dtype, optional
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 32,
        fmt: str = "int4",
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        act_unsigned: bool = False,
    ):
        super().__init__()
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        check_unsigned(fmt, act_unsigned)
        self._init_weight_buffers(in_features, out_features, fmt, bias, dtype, device)
        self.rank = rank
        self.act_unsigned = bool(act_unsigned)
        self.register_buffer("smooth_factor", torch.ones(in_features, dtype=dtype, device=device))
        self.register_buffer(
            "proj_down", torch.zeros(in_features, rank, dtype=dtype, device=device)
        )
        self.register_buffer("proj_up", torch.zeros(out_features, rank, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.smooth_factor.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> y [..., N] (in x's dtype; computed in the layer's dtype)."""
        flat = self._flatten(x).to(self.dtype)
        q, scales, lora_act = ops.quantize_act(
            flat, self.smooth_factor, self.proj_down, self.fmt, self.layout, self.act_unsigned
        )
        y = ops.gemm_w4a4(
            q, scales, self.qweight, self.wscales, lora_act, self.proj_up, self.bias,
            self.wtscale, self.fmt, self.dtype, self.layout, self.act_unsigned,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @classmethod
    def concat(cls, layers: Sequence[SVDQLinear]) -> SVDQLinear:
        """One layer whose output is the outputs of ``layers`` side by side, [..., sum(N_i)].

        The layers must read the same input the same way: equal ``in_features``, format, rank,
        dtype, layout, device, ``smooth_factor``, ``proj_down`` and (NVFP4) ``wtscale``, which
        the quantizer guarantees for the members of a fused group; bias on all or none. Then the
        activations are quantized once and every output column is computed exactly as in its
        own layer. ValueError names the first mismatch.

        On the meta device tensors hold no values to compare: there the input-side tensors must
        be the *same* tensor objects (as :func:`dcgen_quant.bench.w4a4.share_group_inputs_`
        makes them), so that a shape-only model fuses exactly where a real one would.
        """
        layers = list(layers)
        if reason := cls.concat_mismatch(layers):
            raise ValueError(f"concat: {reason}")
        first = layers[0]
        out = cls(
            first.in_features,
            sum(m.out_features for m in layers),
            first.rank,
            first.fmt,
            first.bias is not None,
            first.dtype,
            "meta",  # every buffer is assigned below: allocate nothing twice
            first.act_unsigned,
        )
        out.layout = first.layout  # rows are output channels: any nibble layout concatenates
        out.qweight = torch.cat([m.qweight for m in layers], dim=0)
        out.wscales = torch.cat([m.wscales for m in layers], dim=1)
        out.proj_up = torch.cat([m.proj_up for m in layers], dim=0)
        out.smooth_factor = first.smooth_factor.clone()
        out.proj_down = first.proj_down.clone()
        if first.wtscale is not None:
            out.wtscale = first.wtscale.clone()
        if first.bias is not None:
            out.bias = torch.cat([m.bias for m in layers], dim=0)
        return out

    @staticmethod
    def concat_mismatch(layers: Sequence[SVDQLinear]) -> str | None:
        """Why ``layers`` cannot be concatenated (see :meth:`concat`), or None if they can."""
        layers = list(layers)
        if len(layers) < 2 or any(type(m) is not SVDQLinear for m in layers):
            return "needs two or more SVDQLinear layers"
        first = layers[0]
        for i, m in enumerate(layers[1:], 1):
            for attr in ("in_features", "fmt", "rank", "dtype", "layout", "act_unsigned"):
                if getattr(m, attr) != getattr(first, attr):
                    return (
                        f"layer {i} has {attr}={getattr(m, attr)!r}, layer 0 "
                        f"{getattr(first, attr)!r}"
                    )
            if m.qweight.device != first.qweight.device:
                return f"layer {i} is on {m.qweight.device}, layer 0 on {first.qweight.device}"
            for attr in ("smooth_factor", "proj_down", "wtscale"):
                a, b = getattr(first, attr), getattr(m, attr)
                if a is None or a is b:
                    continue
                if a.is_meta:
                    return f"layer {i} has its own {attr} on the meta device (no values to compare)"
                if not torch.equal(a, b):
                    return f"layer {i} has a different {attr} than layer 0"
            if (m.bias is None) != (first.bias is None):
                return f"layer {i} and layer 0 differ in having a bias"
        return None

    def split(self, sizes: Sequence[int]) -> list[SVDQLinear]:
        """The inverse of :meth:`concat`: layers of ``sizes`` output features (exact)."""
        sizes = [int(n) for n in sizes]
        if sum(sizes) != self.out_features or min(sizes) < 1:
            raise ValueError(f"split: sizes {sizes} do not partition {self.out_features} outputs")
        pieces = {
            "qweight": self.qweight.split(sizes, dim=0),
            "wscales": self.wscales.split(sizes, dim=1),
            "proj_up": self.proj_up.split(sizes, dim=0),
            "bias": self.bias.split(sizes, dim=0) if self.bias is not None else [None] * len(sizes),
        }
        out = []
        for i, n in enumerate(sizes):
            m = SVDQLinear(  # on meta: every buffer is assigned below
                self.in_features, n, self.rank, self.fmt, self.bias is not None, self.dtype, "meta",
                self.act_unsigned,
            )  # fmt: skip
            m.layout = self.layout
            for name, parts in pieces.items():
                if parts[i] is not None:
                    setattr(m, name, parts[i].contiguous().clone())
            m.smooth_factor = self.smooth_factor.clone()
            m.proj_down = self.proj_down.clone()
            if self.wtscale is not None:
                m.wtscale = self.wtscale.clone()
            out.append(m)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"fmt={self.fmt}, bias={self.bias is not None}, dtype={self.dtype}"
            + (", act_unsigned=True" if self.act_unsigned else "")
        )


class W4A16Linear(_QuantizedWeightMixin):
    """4-bit weights, 16-bit activations: ``y = x dequant(W)^T + b``.

    Buffers: qweight [N, K/2] uint8, wscales [K/G, N], wtscale [] float32 (NVFP4), bias [N].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str = "int4",
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self._init_weight_buffers(in_features, out_features, fmt, bias, dtype, device)
        # The layer's compute dtype (NVFP4 layers without bias have no other 16-bit tensor).
        self.register_buffer(
            "_dtype_marker", torch.empty(0, dtype=dtype, device=device), persistent=False
        )

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_marker.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> y [..., N] (in x's dtype; computed in the layer's dtype)."""
        flat = self._flatten(x).to(self.dtype)
        y = ops.gemm_w4a16(
            flat, self.qweight, self.wscales, self.bias, self.wtscale, self.fmt, self.layout
        )
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
            f"bias={self.bias is not None}, dtype={self.dtype}"
        )


class _Conv1x1Mixin:
    """Runs the layer on NCHW tensors, standing in for a 1x1 ``nn.Conv2d``.

    A 1x1 convolution with stride 1, no padding and groups=1 is a linear map over channels:
    ``[B, C, H, W] -> [B, H, W, C] -> linear -> [B, N, H, W]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, N, H, W]."""
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__}: expected NCHW input, got shape {tuple(x.shape)}"
            )
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SVDQConv1x1(_Conv1x1Mixin, SVDQLinear):
    """:class:`SVDQLinear` applied to NCHW tensors (replaces a 1x1 ``nn.Conv2d``)."""


class W4A16Conv1x1(_Conv1x1Mixin, W4A16Linear):
    """:class:`W4A16Linear` applied to NCHW tensors (replaces a 1x1 ``nn.Conv2d``)."""


class SVDQSplitLinear(nn.Module):
    """``y = sum_i parts[i](x[..., o_i : o_i + K_i])``: a linear over concatenated inputs whose
    column ranges are quantized as separate :class:`SVDQLinear` parts.

    FLUX's single blocks feed ``proj_out`` with ``cat([attention output, GELU(proj_mlp(x))])``:
    only the second range is a GELU output, which quantizes best with unsigned codes
    (``act_unsigned``), so the quantizer splits the layer there (two GEMMs and an add instead of
    one GEMM; the same FLOPs). Each part has its own smoothing, low-rank branch and bias.

    Parameters
    ----------
    parts : SVDQLinear layers with equal ``out_features``, format and dtype; part i reads the
        ``parts[i].in_features`` input columns after those of parts 0..i-1
    """

    def __init__(self, parts: Sequence[SVDQLinear]):
        super().__init__()
        parts = list(parts)
        if len(parts) < 2 or any(not isinstance(p, SVDQLinear) for p in parts):
            raise ValueError("SVDQSplitLinear needs two or more SVDQLinear parts")
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            for attr in ("out_features", "fmt", "dtype"):
                if getattr(p, attr) != getattr(first, attr):
                    raise ValueError(
                        f"SVDQSplitLinear: part {i} has {attr}={getattr(p, attr)!r}, part 0 "
                        f"{getattr(first, attr)!r}"
                    )
        self.parts = nn.ModuleList(parts)
        self.in_features = sum(p.in_features for p in parts)
        self.out_features = first.out_features

    @property
    def splits(self) -> list[int]:
        """Input columns of each part, in order."""
        return [p.in_features for p in self.parts]

    @property
    def fmt(self) -> str:
        return self.parts[0].fmt

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def set_layout(self, layout: str) -> None:
        """Re-lay every part's ``qweight`` (see :meth:`SVDQLinear.set_layout`)."""
        for p in self.parts:
            p.set_layout(layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> y [..., N], K = sum of the parts' in_features."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SVDQSplitLinear: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        y, start = None, 0
        for p in self.parts:
            part = p(x[..., start : start + p.in_features])
            y = part if y is None else y + part
            start += p.in_features
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"splits={self.splits}"
        )
