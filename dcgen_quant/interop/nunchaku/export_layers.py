"""One layer at a time: our 4-bit layers -> Nunchaku's W4A4 and AWQ W4A16 tensors.

Our ``SVDQLinear`` and Nunchaku's ``GEMM_W4A4`` compute the same thing from the same logical
tensors (docs/FORMAT.md, NUNCHAKU_FORMAT.md section 2.8): the activation is divided by ``smooth``
and quantized, the residual codes and scales live in smoothed coordinates, the low-rank branch
reads the raw input (our ``proj_down`` [K, r] is Nunchaku's ``V^T``, our ``proj_up`` its ``U``).
So a W4A4 layer converts exactly: only the tile layouts change (:mod:`.packing`), the rank is
zero-padded to a multiple of 16 (exact), and a missing bias becomes zeros (exact). NVFP4's FP32
tensor scale is written as an FP32 ``wtscale`` (the C++ loader reads FP32; V2 pops it into a
Python float), never rounded to 16 bits.

What Nunchaku cannot hold is recorded in a :class:`Changes` ledger: a *lossy* change (a value
that must change) raises :class:`NotRepresentable` unless the caller allowed it
(``--requantize``), and is then counted; an *inherent* one (the format's own 16-bit rounding:
the folded adaLN ``+1`` and the AWQ zero ``-7*s``) is only counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...formats import UNSIGNED_ACT_SHIFT, QuantizedWeight, dequantize_weight, get_format
from ...formats.int4 import quantize_int4
from ...formats.packing import unpack_nibbles
from ...quantize.layer import unsigned_bias
from . import packing as P


class NotRepresentable(ValueError):
    """A layer Nunchaku's format cannot hold exactly, and the caller did not allow changing it."""


@dataclass
class Change:
    kind: str
    lossy: bool
    message: str  # what happened, for the summary
    layers: int = 0
    values: int = 0
    total: int = 0
    first: str = ""


@dataclass
class Changes:
    """Counts of the values an export had to change, by kind (printed by the CLI)."""

    allow_lossy: bool = False
    kinds: dict[str, Change] = field(default_factory=dict)

    def record(self, kind: str, layer: str, changed: int, total: int, *, lossy: bool,
               message: str, refusal: str | None = None) -> None:  # fmt: skip
        """Count ``changed`` of ``total`` values of ``layer``; a lossy change without
        ``allow_lossy`` raises NotRepresentable(``refusal``)."""
        if changed == 0:
            return
        if lossy and not self.allow_lossy:
            raise NotRepresentable(refusal or f"{layer}: {message}; pass --requantize to allow it")
        entry = self.kinds.setdefault(kind, Change(kind, lossy, message, first=layer))
        entry.layers += 1
        entry.values += int(changed)
        entry.total += int(total)

    def summary(self) -> list[dict]:
        return [
            {"kind": c.kind, "lossy": c.lossy, "what": c.message, "layers": c.layers,
             "values_changed": c.values, "values_in_those_layers": c.total, "first": c.first}
            for c in self.kinds.values()
        ]  # fmt: skip


def cast(t: torch.Tensor, dtype: torch.dtype, key: str, changes: Changes) -> torch.Tensor:
    """``t`` in ``dtype``; values that do not survive the cast are a lossy change of ``key``."""
    if t.dtype == dtype or not t.is_floating_point():
        return t
    out = t.to(dtype)
    changed = int((out.to(t.dtype) != t).sum())
    changes.record(
        "cast", key, changed, t.numel(), lossy=True,
        message=f"16-bit tensors cast to {str(dtype).replace('torch.', '')}",
        refusal=f"{key}: {changed} of {t.numel()} values change when cast from "
        f"{str(t.dtype).replace('torch.', '')} to {str(dtype).replace('torch.', '')}; choose "
        "--dtype to match the checkpoint, or pass --requantize",
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# W4A4


@dataclass
class W4A4Layer:
    """One of our SVDQLinear layers (or a column range of one) as logical tensors.

    packed [N, K/2] uint8 (canonical nibbles); wscales [K/G, N] (16-bit INT4 / fp8 NVFP4);
    wtscale [] float32 (NVFP4) or None; bias [N] or None; smooth [K]; proj_down [K, r];
    proj_up [N, r].
    """

    name: str
    fmt: str
    packed: torch.Tensor
    wscales: torch.Tensor
    wtscale: torch.Tensor | None
    bias: torch.Tensor | None
    smooth: torch.Tensor
    proj_down: torch.Tensor
    proj_up: torch.Tensor
    act_unsigned: bool = False

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.packed, self.wscales, self.wtscale, self.fmt)

    def columns(self, start: int, stop: int, keep_bias: bool) -> W4A4Layer:
        """The layer restricted to input columns [start, stop): exact, because every tensor is
        per input column or per group (``start``, ``stop`` multiples of the group size) and the
        low-rank product splits as ``U V = U V[:, a:b] + ...``; the bias is kept or dropped."""
        g = get_format(self.fmt).group_size
        if start % g or stop % g:
            raise ValueError(f"{self.name}: columns {start}:{stop} do not align with groups of {g}")
        return W4A4Layer(
            f"{self.name}[:, {start}:{stop}]", self.fmt,
            self.packed[:, start // 2 : stop // 2].contiguous(),
            self.wscales[start // g : stop // g].contiguous(), self.wtscale,
            self.bias if keep_bias else None, self.smooth[start:stop].contiguous(),
            self.proj_down[start:stop].contiguous(), self.proj_up, self.act_unsigned,
        )  # fmt: skip


def _shared(members: list[W4A4Layer], attr: str, out: str) -> torch.Tensor | None:
    first = getattr(members[0], attr)
    for m in members[1:]:
        other = getattr(m, attr)
        if (first is None) != (other is None) or (
            first is not None and (first.shape != other.shape or not torch.equal(first, other))
        ):
            raise NotRepresentable(
                f"{out}: {members[0].name} and {m.name} have different {attr}; Nunchaku's fused "
                "layer has one (dcgen_quant's quantizer always shares it within a fused group)"
            )
    return first


def w4a4_tensors(
    members: list[W4A4Layer],
    out: str,
    *,
    unsigned: bool,
    rank: int,
    dtype: torch.dtype,
    changes: Changes,
) -> dict[str, torch.Tensor]:
    """Nunchaku W4A4 tensors of one (fused) layer.

    Parameters
    ----------
    members : layers whose outputs are concatenated (q, k, v), or one layer; they must share
        the input side (smooth, proj_down, NVFP4 tensor scale)
    out : the Nunchaku layer name (messages)
    unsigned : whether Nunchaku runs this layer's activations unsigned (INT4 GELU inputs)
    rank : Nunchaku rank (a multiple of 16, >= every member's rank): padded with zeros
    dtype : 16-bit dtype of the file

    Returns
    -------
    {suffix: tensor}: qweight, wscales, [wtscale,] bias, smooth_orig, smooth, lora_down,
    lora_up (Nunchaku family-A names, DeepCompressor's order).
    """
    fmt = members[0].fmt
    if any(m.fmt != fmt for m in members):
        raise NotRepresentable(f"{out}: members mix formats {sorted({m.fmt for m in members})}")
    smooth = _shared(members, "smooth", out)
    proj_down = _shared(members, "proj_down", out)
    wtscale = _shared(members, "wtscale", out) if fmt == "nvfp4" else None
    r = proj_down.shape[1]
    if r > rank:
        raise ValueError(f"{out}: rank {r} exceeds the file's rank {rank}")
    bias = torch.cat([
        m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=smooth.dtype)
        for m in members
    ])  # fmt: skip
    is_unsigned = {m.act_unsigned for m in members}
    if len(is_unsigned) > 1:
        raise NotRepresentable(f"{out}: members mix signed and unsigned activations")
    have_unsigned = is_unsigned.pop()
    if fmt == "int4" and unsigned and not have_unsigned:
        # Nunchaku quantizes (x + 0.171875) / smooth unsigned here: fold the shift into the bias
        # exactly as our quantizer does for its unsigned layers (same weights, new bias)
        new = torch.cat([
            unsigned_bias(m.quantized_weight(), m.smooth, m.bias).to(smooth.dtype)
            for m in members
        ])  # fmt: skip
        changes.record(
            "unsigned-gelu", out, int((new != bias).sum()), bias.numel(), lossy=True,
            message="layers quantized with signed GELU-input codes (--signed-gelu) run unsigned "
            f"by Nunchaku: bias - {UNSIGNED_ACT_SHIFT} * rowsum(W/smooth) folded in (weights "
            "unchanged, activation codes differ from calibration)",
            refusal=f"{members[0].name} was quantized with signed activation codes "
            "(--signed-gelu), but Nunchaku's INT4 runs this GELU-input layer with unsigned codes "
            "of x + 0.171875: pass --requantize to fold the shift into its bias, or quantize "
            "without --signed-gelu",
        )  # fmt: skip
        bias = new
    elif have_unsigned and not (fmt == "int4" and unsigned):
        raise NotRepresentable(
            f"{members[0].name} has unsigned activation codes, but Nunchaku runs {out} signed"
        )
    v = proj_down.t()  # [r, K]
    u = torch.cat([m.proj_up for m in members])  # [N, r]
    tensors = {"qweight": P.pack_qweight_nibbles(torch.cat([m.packed for m in members]))}
    scales = torch.cat([m.wscales for m in members], dim=1).t()  # [N, G]
    if fmt == "int4":
        tensors["wscales"] = P.pack_wscales(cast(scales, dtype, f"{out}.wscales", changes))
    else:
        tensors["wscales"] = P.pack_fp8_wscales(scales)
        tensors["wtscale"] = wtscale.reshape(1).float()
    tensors["bias"] = P.pack_vector(cast(bias, dtype, f"{out}.bias", changes))
    smooth_p = P.pack_vector(cast(smooth, dtype, f"{out}.smooth", changes))
    tensors["smooth_orig"] = smooth_p
    tensors["smooth"] = smooth_p.clone()
    # rank padded with zeros (exact: the extra rank columns contribute nothing)
    v = cast(v, dtype, f"{out}.lora_down", changes)
    u = cast(u, dtype, f"{out}.lora_up", changes)
    tensors["lora_down"] = P.pack_lowrank_down(torch.cat([v, v.new_zeros(rank - r, v.shape[1])]))
    tensors["lora_up"] = P.pack_lowrank_up(torch.cat([u, u.new_zeros(u.shape[0], rank - r)], 1))
    return tensors


def w4a4_specs(n: int, k: int, fmt: str, rank: int, dtype: torch.dtype) -> dict[str, tuple]:
    """{suffix: (dtype, shape)} of :func:`w4a4_tensors` for an N x K layer (no values needed)."""
    np_, kp = P.padded(n, P.TILE_N), P.padded(k, P.TILE_K)
    specs = {"qweight": (torch.int8, (np_, kp // 2))}
    if fmt == "int4":
        specs["wscales"] = (dtype, (kp // P.INT4_GROUP, np_))
    else:
        specs["wscales"] = (torch.float8_e4m3fn, (kp // P.NVFP4_GROUP, np_))
        specs["wtscale"] = (torch.float32, (1,))
    specs["bias"] = (dtype, (np_,))
    specs["smooth_orig"] = (dtype, (kp,))
    specs["smooth"] = (dtype, (kp,))
    specs["lora_down"] = (dtype, (kp, rank))
    specs["lora_up"] = (dtype, (np_, rank))
    return specs


# --------------------------------------------------------------------------------------------
# AWQ W4A16 (adaLN modulation)


@dataclass
class W4A16Layer:
    """One of our INT4 W4A16Linear layers: packed [O, I/2] uint8, wscales [I/64, O] 16-bit,
    bias [O] or None."""

    name: str
    packed: torch.Tensor
    wscales: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class DenseWeight:
    """What an adaLN linear holds when it is not an INT4 g64 W4A16 layer: the dense weight
    [O, I] float32 it computes, and where it came from (for messages)."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    origin: str  # "nvfp4 W4A16", "16-bit", "W4A4 (SVDQLinear)", ...


def awq_tensors(
    layer: W4A16Layer | DenseWeight,
    out: str,
    *,
    chunks: int,
    dtype: torch.dtype,
    changes: Changes,
) -> dict[str, torch.Tensor]:
    """Nunchaku AWQ W4A16 tensors (qweight, wscales, wzeros, bias) of an adaLN linear.

    ``layer`` is an INT4 group-64 W4A16 layer (codes -8..7 map to ``q = c + 7``, exact unless a
    code is -8) or a :class:`DenseWeight`
    (re-quantized: round to nearest INT4, group 64, ``scale = amax/7``, a lossy change).
    ``chunks``: 6 (``AdaLayerNormZero``) or 3 (``AdaLayerNormZeroSingle``).
    """
    if isinstance(layer, DenseWeight):
        w = layer.weight.float()
        codes, scales = quantize_int4(w, P.AWQ_GROUP, dtype)
        deq = codes.float().reshape(*w.shape[:1], -1, P.AWQ_GROUP) * scales.float()[..., None]
        changed = int((deq.reshape(w.shape) != w).sum())
        changes.record(
            "awq-requantize", out, max(changed, 1), w.numel(), lossy=True,
            message="adaLN linears re-quantized to INT4 AWQ (group 64, zero point 7)",
            refusal=f"{layer.name} is {layer.origin}, but Nunchaku's adaLN linears are INT4 AWQ "
            "W4A16 (group 64): pass --requantize to re-quantize it (round to nearest), or "
            "quantize with --nunchaku-compatible",
        )  # fmt: skip
        # round to nearest gives codes -7..7 (|w| / bf16(amax / 7) <= 7.03); clamp regardless
        q = (codes.clamp(min=-7) + P.AWQ_ZERO_POINT).to(torch.uint8)
        bias = layer.bias
    else:
        # Work on raw nibbles: INT4 code c has nibble c & 15, and q = c + 7 = (nibble + 7) & 15
        # for every code but -8 (nibble 8), which zero point 7 cannot hold.
        nib = unpack_nibbles(layer.packed)  # [O, I] uint8
        minus8 = nib == 8
        low = int(minus8.sum()) if bool(minus8.any()) else 0
        changes.record(
            "awq-clamp", out, low, nib.numel(), lossy=True,
            message="W4A16 codes -8 clamped to -7 (AWQ zero point 7 holds -7..8)",
            refusal=f"{layer.name}: {low} W4A16 code(s) are -8, which Nunchaku's AWQ zero point 7 "
            "cannot hold: pass --requantize to clamp them to -7, or quantize with "
            "--nunchaku-compatible",
        )  # fmt: skip
        q = (nib + P.AWQ_ZERO_POINT) & 15
        if low:
            q[minus8] = 0  # code -7
        scales = cast(layer.wscales.t(), dtype, f"{out}.wscales", changes)  # [O, G]
        bias = layer.bias
    o = q.shape[0]
    bias = (
        torch.zeros(o, dtype=dtype) if bias is None else cast(bias, dtype, f"{out}.bias", changes)
    )
    q = P.interleave_adanorm(q, chunks)
    s = P.interleave_adanorm(scales.contiguous(), chunks)
    folded = P.fold_adanorm_bias(bias, chunks)
    # inherent 16-bit roundings of the format, counted: b + 1 of the scale chunks, and 7 * s
    back = P.unfold_adanorm_bias(folded, chunks)
    changes.record(
        "adaln-bias-fold", out, int((back != bias).sum()), bias.numel(), lossy=False,
        message="adaLN bias + 1 folded in 16 bits (Nunchaku's format): b + 1 rounded",
    )  # fmt: skip
    zeros = -(P.AWQ_ZERO_POINT * scales.float())
    changes.record(
        "awq-zero", out, int((zeros.to(dtype).float() != zeros).sum()), scales.numel(),
        lossy=False, message="AWQ zero -7*s stored in 16 bits (Nunchaku's format): rounded",
    )  # fmt: skip
    return {
        "qweight": P.pack_awq_qweight(q),
        "wscales": P.pack_awq_scales(s),
        "wzeros": P.pack_awq_zeros(s),
        "bias": folded,
    }


def awq_specs(o: int, i: int, dtype: torch.dtype) -> dict[str, tuple]:
    """{suffix: (dtype, shape)} of :func:`awq_tensors` for an O x I layer."""
    groups = P.awq_groups(i)
    return {
        "qweight": (torch.int32, (o // 4, i // 2)),
        "wscales": (dtype, (groups, o)),
        "wzeros": (dtype, (groups, o)),
        "bias": (dtype, (o,)),
    }


def dense_of_w4a4(layer: W4A4Layer) -> torch.Tensor:
    """The dense weight [N, K] float32 an SVDQLinear computes: ``R / smooth + U V``."""
    r = dequantize_weight(layer.quantized_weight()) / layer.smooth.float()
    return r + layer.proj_up.float() @ layer.proj_down.float().t()
