"""How far our runtime's numerics are from Nunchaku's on the same (imported) layers, rule by rule.

``python -m dcgen_quant.bench.interop_numerics --out DIR [--quick] [--json]``

An imported Nunchaku checkpoint means the same tensors to both runtimes (tests/interop prove the
tensor semantics bit for bit), but the two compute differently. This script emulates, in pure
torch, each arithmetic rule of Nunchaku's CUDA kernels (read from its source,
NUNCHAKU_FORMAT.md sections 2.8 and 3) that differs from our reference, switches them on one at
a time on top of our reference forward, and measures the change of the layer output against the
layer's own 4-bit error (both relative to the float64 output of the original 16-bit layer):

``act16``     the smoothed (and, on GELU inputs, shifted) activation is rounded to 16 bits
              before quantization (kernel: ``h2div`` to half, ``+ 0.171875`` in half);
``scale``     INT4: ``scale = half(amax * float(1/7))``, codes ``rni(x * (1 / scale_fp32))`` from
              the *unrounded* scale; NVFP4: ``scale = min(amax * float(1/6), 448)``, codes from
              ``x / scale_fp32`` while dequantization uses ``e4m3(scale)``;
``accum16``   INT4: each 64-group partial sum is converted to 16 bits and accumulated with a
              16-bit FMA (``hfma2``, ``USE_FP32_ACCUM = false``); NVFP4: the fp32 product times
              ``wtscale`` is rounded to 16 bits before the epilogue;
``epilogue16`` bias added in 16 bits, the low-rank activation rounded to 16 bits before the up
              projection, its result added to the 16-bit output;
``awq``       adaLN weights dequantized as ``half(q*s + half(-7*s))`` and each product rounded to
              16 bits (``gemv_awq``), instead of the exact ``(q - 7) * s``;
``fold``      adaLN ``1 + scale`` taken as ``half(acc + half(b + 1))`` (Nunchaku's folded bias)
              instead of diffusers' ``half(1 + half(acc + b))``.

Not emulated (hardware-specific approximations, no CPU reference): ``rcp.approx.ftz.f32`` for
``1/scale`` and ``__fdividef`` in the smoothing division (correctly rounded here), the
``tanh.approx.f32`` GELU, the accumulation order inside the tensor-core MMAs.

Layers: FLUX.1-dev shapes cut to N=1024 outputs (the rules act per output column, so N only
averages): ``attn-in`` K=3072 signed (normal inputs with 8 outlier channels), ``mlp-out`` K=12288
on tanh-GELU outputs (INT4: unsigned codes), and an adaLN ``norm1.linear`` 3072 -> 1536 (6 chunks)
on SiLU inputs; quantized by our quantizer (rank 32). Writes DIR/interop_numerics.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcgen_quant.formats import UNSIGNED_ACT_SHIFT
from dcgen_quant.formats.int4 import dequantize_int4
from dcgen_quant.formats.nvfp4 import e2m1_decode, e2m1_encode, to_e4m3
from dcgen_quant.formats.packing import nibbles_to_int4, unpack_nibbles
from dcgen_quant.nn import SVDQLinear, W4A16Linear

NAME = "interop_numerics"
W4A4_RULES = ("act16", "scale", "accum16", "epilogue16")
AWQ_RULES = ("awq", "fold")


def _r16(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float values to the 16-bit dtype (RNE) and back to float32."""
    return t.to(dtype).float()


@dataclass(frozen=True)
class Rules:
    act16: bool = False
    scale: bool = False
    accum16: bool = False
    epilogue16: bool = False


def _quantize_act(layer: SVDQLinear, x: torch.Tensor, rules: Rules):
    """(activation codes [M, K] float, per-group scales [M, G] float) under ``rules``."""
    dtype, unsigned = layer.dtype, layer.act_unsigned
    xf = x.float()
    if unsigned:
        xf = xf + UNSIGNED_ACT_SHIFT
        if rules.act16:
            xf = _r16(xf, dtype)
    xs = xf / layer.smooth_factor.float()
    if rules.act16:
        xs = _r16(xs, dtype)
    m, k = xs.shape
    group = layer.group_size
    g = xs.reshape(m, k // group, group)
    amax = g.abs().amax(dim=-1)
    if layer.fmt == "int4":
        lo, hi = (0.0, 15.0) if unsigned else (-8.0, 7.0)
        if rules.scale:
            scale_f = amax * torch.tensor(1.0 / hi, dtype=torch.float32)
            scales = _r16(scale_f, dtype)
            r = torch.where(scale_f > 0, 1.0 / scale_f, torch.zeros_like(scale_f))
            codes = torch.round(g * r[..., None]).clamp(lo, hi)
        else:
            scales = _r16(amax / hi, dtype)
            safe = torch.where(scales == 0, torch.ones_like(scales), scales)
            codes = torch.round(g / safe[..., None]).clamp(lo, hi)
        return codes.reshape(m, k), scales
    if rules.scale:
        scale_f = torch.clamp(amax * torch.tensor(1.0 / 6.0, dtype=torch.float32), max=448.0)
        scales = to_e4m3(scale_f).float()
        v = torch.where(scale_f[..., None] > 0, g / scale_f.clamp(min=1e-30)[..., None], g * 0)
    else:
        scales = to_e4m3(torch.clamp(amax / 6.0, max=448.0)).float()
        v = torch.where(scales[..., None] > 0, g / scales.clamp(min=1e-30)[..., None], g * 0)
    return e2m1_decode(e2m1_encode(v)).reshape(m, k), scales


def w4a4_forward(layer: SVDQLinear, x: torch.Tensor, rules: Rules) -> torch.Tensor:
    """The layer's output [M, N] (layer dtype) with Nunchaku's ``rules`` switched on; all off is
    our reference (checked bit for bit in tests/bench/test_interop_numerics.py)."""
    dtype = layer.dtype
    x16 = x.to(dtype)
    codes, scales = _quantize_act(layer, x16, rules)
    m, k = codes.shape
    group = layer.group_size
    nib = unpack_nibbles(layer.quantized_weight().qweight)
    ws = layer.wscales.float().t()  # [N, G]
    if layer.fmt == "int4":
        wc = nibbles_to_int4(nib).float()
        a = codes.reshape(m, -1, group) * scales[..., None]
        w = dequantize_int4(nibbles_to_int4(nib), ws, group)
    else:
        a = codes.reshape(m, -1, group) * scales[..., None]
        w = (e2m1_decode(nib).reshape(ws.shape[0], -1, group) * ws[..., None]).reshape(-1, k)
    a = a.reshape(m, k)
    if layer.fmt == "int4" and rules.accum16:
        acc = torch.zeros(m, layer.out_features, dtype=torch.float64)
        for g in range(k // group):
            sl = slice(g * group, (g + 1) * group)
            p = _r16(codes[:, sl] @ wc[:, sl].t(), dtype).double()  # exact int dot -> 16 bit
            asws = _r16(scales[:, g, None] * ws[None, :, g], dtype).double()
            acc = _r16(p * asws + acc, dtype).double()  # hfma2: one rounding
        y = acc.float()
    else:
        y = a @ w.t()
        if layer.wtscale is not None:
            y = y * layer.wtscale.float()
        if rules.accum16:
            y = _r16(y, dtype)
    lora_act = x16.float() @ layer.proj_down.float()
    up = layer.proj_up.float()
    bias = layer.bias.float() if layer.bias is not None else 0.0
    if rules.epilogue16:
        out = _r16(_r16(y, dtype) + bias, dtype)
        return (out + _r16(lora_act, dtype) @ up.t()).to(dtype)
    return ((y + lora_act @ up.t()) + bias).to(dtype)


def adaln_modulation(layer: W4A16Linear, x: torch.Tensor, chunks: int, awq: bool, fold: bool):
    """The modulation vector [M, O] a FLUX adaLN linear feeds the block: its chunks in diffusers
    order with the scale chunks as the factor ``1 + scale``; ``awq`` / ``fold`` switch on
    Nunchaku's weight dequantization and folded-bias arithmetic."""
    dtype = layer.dtype
    x16 = x.to(dtype)
    nib = unpack_nibbles(layer.quantized_weight().qweight)
    c = nibbles_to_int4(nib).float()
    s = layer.wscales.float().t()  # [O, G]
    o, i = c.shape
    if awq:
        q = c + 7
        z = _r16(-7 * s, dtype)
        w = _r16((q.reshape(o, -1, 64) * s[..., None] + z[..., None]).reshape(o, i), dtype)
        acc = (_r16(x16.float()[:, None, :] * w[None], dtype)).sum(-1)  # products rounded
    else:
        w = (c.reshape(o, -1, 64) * s[..., None]).reshape(o, i)
        acc = x16.float() @ w.t()
    bias = layer.bias.float()
    per = o // chunks
    scale_cols = torch.zeros(o, dtype=torch.bool)
    for j in sorted({1, chunks - 2}):
        scale_cols[j * per : (j + 1) * per] = True
    if fold:  # Nunchaku: round(acc) + round(b + 1); the result is the factor itself
        folded = torch.where(scale_cols, _r16(bias + 1, dtype), bias)
        return _r16(_r16(acc, dtype) + folded, dtype)
    y = _r16(acc + bias, dtype)  # our W4A16 reference, then diffusers' 1 + scale in 16 bits
    return torch.where(scale_cols, _r16(1 + y, dtype), y)


# --------------------------------------------------------------------------------------------
# the measurement


def _layers(quick: bool, fmt: str, seed: int = 0):
    """(name, quantized layer, float linear, inputs) for the W4A4 layers of the table."""
    from dcgen_quant.quantize import QuantConfig, quantize_linear

    g = torch.Generator().manual_seed(seed)
    n, tokens = (256, 64) if quick else (1024, 128)
    shapes = {"attn-in": 512 if quick else 3072, "mlp-out": 1024 if quick else 12288}
    config = QuantConfig(format=fmt, rank=32, smooth_grid=4, lowrank_iters=2,
                         calib_tokens=512, search_tokens=256, dtype=torch.bfloat16)  # fmt: skip
    out = []
    for name, k in shapes.items():
        w = torch.randn(n, k, generator=g) / k**0.5
        u = torch.linalg.qr(torch.randn(n, 32, generator=g)).Q
        v = torch.linalg.qr(torch.randn(k, 32, generator=g)).Q
        w = w + (u * (4.0 / torch.arange(1, 33))) @ v.t()  # a few strong directions
        linear = nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(0.1 * torch.randn(n, generator=g))
        linear = linear.to(torch.bfloat16)
        if name == "attn-in":
            x = torch.randn(768 + tokens, k, generator=g)
            x[:, :: k // 8] *= 20.0
        else:
            x = nn.functional.gelu(
                1.5 * torch.randn(768 + tokens, k, generator=g), approximate="tanh"
            )
        x = x.to(torch.bfloat16)
        unsigned = name == "mlp-out" and fmt == "int4"
        with contextlib.redirect_stderr(io.StringIO()):
            layer = quantize_linear(linear, x[:768], config, baselines=False, act_unsigned=unsigned)
        out.append((name, layer, linear, x[768:]))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / ref.double().norm())


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """Rows: per format and layer, our 4-bit error and the change each Nunchaku rule makes."""
    torch.manual_seed(0)
    rows = []
    for fmt in ("int4", "nvfp4"):
        for name, layer, linear, x in _layers(quick, fmt):
            y_ref = x.double() @ linear.weight.double().t() + linear.bias.double()
            with torch.no_grad():
                ours = w4a4_forward(layer, x, Rules())
                row = {"format": fmt, "layer": name, "K": layer.in_features,
                       "acts": "unsigned" if layer.act_unsigned else "signed",
                       "ours_err": _rel(ours, y_ref, y_ref)}  # fmt: skip
                for rule in W4A4_RULES:
                    y = w4a4_forward(layer, x, Rules(**{rule: True}))
                    row[rule] = _rel(y, ours, y_ref)
                every = w4a4_forward(layer, x, Rules(*(True,) * len(W4A4_RULES)))
                row["all"] = _rel(every, ours, y_ref)
                row["nunchaku_err"] = _rel(every, y_ref, y_ref)
            rows.append(row)
    rows.append(_adaln_row(quick))
    return rows


def _adaln_row(quick: bool) -> dict[str, Any]:
    from dcgen_quant.quantize import QuantConfig, quantize_linear

    g = torch.Generator().manual_seed(1)
    i, o = (256, 384) if quick else (3072, 1536)
    linear = nn.Linear(i, o).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(o, i, generator=g) / i**0.5)
        linear.bias.copy_(0.05 * torch.randn(o, generator=g))
    x = nn.functional.silu(torch.randn(2, i, generator=g) * 2).to(torch.bfloat16)
    config = QuantConfig(format="int4", nunchaku_compatible=True, dtype=torch.bfloat16)
    with contextlib.redirect_stderr(io.StringIO()):
        layer = quantize_linear(linear, x, config, weight_only=True, baselines=False)
    with torch.no_grad():
        y = x.double() @ linear.weight.double().t() + linear.bias.double()
        per = o // 6
        exact = y.clone()
        for j in (1, 4):
            exact[:, j * per : (j + 1) * per] += 1
        ours = adaln_modulation(layer, x, 6, False, False)
        row = {"format": "int4", "layer": "adaLN", "K": i, "acts": "16-bit",
               "ours_err": _rel(ours, exact, exact)}  # fmt: skip
        for rule in AWQ_RULES:
            row[rule] = _rel(
                adaln_modulation(layer, x, 6, rule == "awq", rule == "fold"), ours, exact
            )
        every = adaln_modulation(layer, x, 6, True, True)
        row["all"] = _rel(every, ours, exact)
        row["nunchaku_err"] = _rel(every, exact, exact)
    return row


COLUMNS = [
    ("format", "format", None), ("layer", "layer", None), ("K", "K", None),
    ("acts", "acts", None), ("ours_err", "our err", ".2e"), ("act16", "act16", ".1e"),
    ("scale", "scale", ".1e"), ("accum16", "accum16", ".1e"), ("epilogue16", "epilogue16", ".1e"),
    ("awq", "awq", ".1e"), ("fold", "fold", ".1e"), ("all", "all rules", ".1e"),
    ("nunchaku_err", "Nunchaku err", ".2e"),
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m dcgen_quant.bench.{NAME}", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=None, help="write NAME.md / NAME.json here")
    parser.add_argument("--quick", action="store_true", help="small layers (seconds on a CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    from dcgen_quant.tables import emit, format_table

    t0 = time.perf_counter()
    rows = measure(args.quick)
    extra = {"seconds": round(time.perf_counter() - t0, 1), "quick": args.quick,
             "torch": torch.__version__}  # fmt: skip
    emit(rows, COLUMNS, args.json, title="Nunchaku's numerics vs ours (relative to the "
         "float64 output of the 16-bit layer)", extra=extra)  # fmt: skip
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{NAME}.json").write_text(json.dumps({**extra, "rows": rows}, indent=1))
        table = format_table(rows, COLUMNS)
        (args.out / f"{NAME}.md").write_text(
            f"# {NAME}\n\n`python -m dcgen_quant.bench.{NAME}{' --quick' if args.quick else ''}`"
            f" ({extra['seconds']} s, torch {extra['torch']}). Columns: our layer's error, the "
            "change each Nunchaku rule alone makes, all rules together, Nunchaku's error; all "
            "relative to the float64 output of the 16-bit layer (bench/interop_numerics.py).\n\n"
            f"```\n{table}\n```\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
