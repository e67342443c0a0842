"""An imported Nunchaku-format FLUX block through the Triton and CUDA backends (GPU check).

``python -m dcgen_quant.bench.gpu_interop --out DIR [--dry-run] [--tokens N] [--formats F,...]``

For each format: a FLUX.1-width model with one double and one single block (hidden 3072, 24
heads of 128, FLUX.1-dev's embedders) gets 4-bit layers with round-to-nearest contents of its
random weights (rank-32 random low-rank branches, random smoothing), is saved as our checkpoint,
exported to a Nunchaku v1.0 file by our exporter (``convert --to nunchaku --requantize``: the
GELU shift folded into the bias, as Nunchaku runs INT4 ``mlp_fc2`` unsigned), and imported back
with ``load_quantized`` on the GPU. Then, per backend (reference, triton, cuda; each one that
``dcgen_quant.set_backend`` accepts):

* every 4-bit layer of the imported blocks on its real input (captured from the reference
  forward): ``quantize_act`` codes and scales must equal the reference's bit for bit, and the
  ``gemm_w4a4`` / ``gemm_w4a16`` output error against float64 is compared with the reference's
  own error in the output dtype (the project's 2x rule); the worst ratio is reported;
* the whole forward (median time of CUDA-event-timed runs, relative difference to the reference
  output).

``--dry-run``: the same pipeline on a tiny FLUX on the CPU with the reference backend only (what
bench/gpu_check.sh runs without a GPU). Writes DIR/gpu_interop.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

NAME = "gpu_interop"
FLUX1_BLOCKS = {
    "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}  # fmt: skip


def _random_quantized(model: nn.Module, fmt: str, rank: int, seed: int) -> nn.Module:
    """Swap the block linears for 4-bit layers holding round-to-nearest codes of their weights."""
    from dcgen_quant.formats import quantize_weight
    from dcgen_quant.nn import SVDQLinear, W4A16Linear
    from dcgen_quant.quantize.config import QuantConfig

    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.bfloat16
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, nn.Linear) or "transformer_blocks" not in name:
            continue
        k, n = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        if name.endswith(".linear"):  # adaLN: INT4 W4A16, as Nunchaku's AWQ layers
            layer = W4A16Linear(k, n, "int4", True, dtype, w.device)
            qw = quantize_weight(w, "int4", dtype)
        else:
            layer = SVDQLinear(k, n, rank, fmt, True, dtype, w.device)
            smooth = (torch.rand(k, generator=g) + 0.5).to(w.device)
            qw = quantize_weight(w * smooth, fmt, dtype if fmt == "int4" else None)
            layer.smooth_factor.copy_(smooth)
            layer.proj_down.copy_(torch.randn(k, rank, generator=g) * 0.02)
            layer.proj_up.copy_(torch.randn(n, rank, generator=g) * 0.02)
        layer.qweight.copy_(qw.qweight)
        layer.wscales.copy_(qw.wscales)
        if qw.wtscale is not None:
            layer.wtscale.copy_(qw.wtscale)
        layer.bias.copy_(linear.bias.detach())  # every FLUX block linear has a bias
        model.set_submodule(name, layer)
    # fused q/k/v members share their input side (Nunchaku's qkv_proj has one of each)
    for attn in (m for n, m in model.named_modules() if n.endswith(".attn")):
        for group in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
            members = [getattr(attn, m, None) for m in group]
            if all(isinstance(m, SVDQLinear) for m in members):
                for m in members[1:]:
                    m.smooth_factor.copy_(members[0].smooth_factor)
                    m.proj_down.copy_(members[0].proj_down)
                    if m.wtscale is not None:
                        m.wtscale.copy_(members[0].wtscale)
    model.dcgen_quant_config = QuantConfig(format=fmt, rank=rank, dtype=dtype)
    return model


def _nunchaku_model(fmt: str, config: dict, device: torch.device, tmp: Path, seed: int = 0):
    """(imported model on ``device``, export summary): ours -> Nunchaku file -> import."""
    from diffusers import FluxTransformer2DModel

    import dcgen_quant
    from dcgen_quant.bench.measured import init_random_
    from dcgen_quant.interop.nunchaku.exporter import convert_to_nunchaku

    with torch.device("meta"):  # allocate once, on the device, without diffusers' slow init
        model = FluxTransformer2DModel(**config)
    model = init_random_(model.to(torch.bfloat16).to_empty(device=device), seed)
    model = _random_quantized(model.requires_grad_(False), fmt, 32, seed)
    ours, theirs = tmp / f"ours-{fmt}.safetensors", tmp / f"nunchaku-{fmt}.safetensors"
    dcgen_quant.save_quantized(model, ours)
    del model
    summary = convert_to_nunchaku(ours, theirs, requantize=True)
    return dcgen_quant.load_quantized(theirs, device=device, layout="canonical"), summary


def _inputs(model, tokens: int, text: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = model.config
    side = int(tokens**0.5)
    axis = torch.arange(float(side))
    ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1)
    t = {
        "hidden_states": torch.randn(1, side * side, c.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
    }
    t = {k: v.to(device, torch.bfloat16) for k, v in t.items()}
    guidance = torch.tensor([3.5], device=device) if c.guidance_embeds else None
    t.update(timestep=torch.tensor([0.7], device=device), img_ids=ids.reshape(-1, 3).to(device),
             txt_ids=torch.zeros(text, 3, device=device), guidance=guidance)  # fmt: skip
    return t


def _capture(model, inputs) -> dict[str, torch.Tensor]:
    """The input of every 4-bit layer in the reference forward."""
    from dcgen_quant.nn import SVDQLinear, W4A16Linear

    seen, hooks = {}, []

    def keep(name):
        def hook(module, args):  # returns None: the input is only recorded, never replaced
            seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    for name, m in model.named_modules():
        if type(m) in (SVDQLinear, W4A16Linear):
            hooks.append(m.register_forward_pre_hook(keep(name)))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


def _layer_ratio(layer, x: torch.Tensor, backend: str) -> tuple[float, bool]:
    """(error / reference error vs float64, activation codes equal to the reference's)."""
    from dcgen_quant import ops
    from dcgen_quant.formats import dequantize_activation, dequantize_weight
    from dcgen_quant.formats.layouts import from_layout
    from dcgen_quant.nn import W4A16Linear

    x = x.to(layer.dtype)
    if isinstance(layer, W4A16Linear):
        w = dequantize_weight(layer.quantized_weight()).double()
        truth = x.double() @ w.t() + layer.bias.double()
        ops.set_backend("reference")
        base = layer(x)
        ops.set_backend(backend)
        out = layer(x)
        codes_equal = True
    else:
        ops.set_backend("reference")
        rq, rs, rla = ops.quantize_act(x, layer.smooth_factor, layer.proj_down, layer.fmt,
                                       layer.layout, layer.act_unsigned)  # fmt: skip
        args = (layer.qweight, layer.wscales, rla, layer.proj_up, layer.bias, layer.wtscale,
                layer.fmt, layer.dtype, layer.layout, layer.act_unsigned)  # fmt: skip
        base = ops.gemm_w4a4(rq, rs, *args)
        ops.set_backend(backend)
        q, s, _ = ops.quantize_act(x, layer.smooth_factor, layer.proj_down, layer.fmt,
                                   layer.layout, layer.act_unsigned)  # fmt: skip
        codes_equal = torch.equal(q, rq) and torch.equal(s.view(torch.uint8) if s.dtype ==
                                                         torch.float8_e4m3fn else s,
                                                         rs.view(torch.uint8) if rs.dtype ==
                                                         torch.float8_e4m3fn else rs)  # fmt: skip
        out = ops.gemm_w4a4(rq, rs, *args)  # the kernel's GEMM on the reference activations
        a = dequantize_activation(from_layout(rq, layer.layout, layer.fmt), rs, layer.fmt,
                                  layer.act_unsigned).double()  # fmt: skip
        w = dequantize_weight(layer.quantized_weight(), apply_tensor_scale=False).double()
        truth = a @ w.t()
        if layer.wtscale is not None:
            truth = truth * layer.wtscale.double()
        truth = truth + rla.double() @ layer.proj_up.double().t() + layer.bias.double()
    err = (out.double() - truth).abs().max().item()
    ref = (base.double() - truth).abs().max().item()
    eps = 1e-6 * truth.abs().max().item()
    return err / max(ref, eps), codes_equal


def _relayout(model, layout_of) -> None:
    for m in model.modules():
        if hasattr(m, "set_layout") and hasattr(m, "fmt"):
            m.set_layout(layout_of(m.fmt))


def _run_format(fmt, config, device, tmp: Path, tokens: int, dry_run: bool, emit_row) -> None:
    from dcgen_quant import ops
    from dcgen_quant.bench.measured import time_fn

    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        model, export = _nunchaku_model(fmt, config, device, tmp)
    prep = round(time.perf_counter() - t0, 1)
    inputs = _inputs(model, tokens, 16 if dry_run else 512, device)
    ops.set_backend("reference")
    acts = _capture(model, inputs)
    with torch.no_grad():
        y_ref = model(**inputs).sample.double()
    for backend in ["reference"] + ([] if dry_run else ["triton", "cuda"]):
        row = {"format": fmt, "backend": backend, "tokens": tokens, "prepare_s": prep,
               "export_changes": len(export["changes"])}  # fmt: skip
        if (reason := ops.backend_unavailable(backend)) is not None:
            emit_row({**row, "status": f"unavailable: {reason}"})
            continue
        try:
            ops.set_backend(backend)
            _relayout(model, lambda f: ops.preferred_layout(f, device))
            ratios, equal = [], True
            for name, x in acts.items():
                r, e = _layer_ratio(model.get_submodule(name), x, backend)
                ratios.append((r, name))
                equal &= e
                ops.set_backend(backend)
            with torch.no_grad():
                y = model(**inputs).sample.double()
                reps = (1, 1) if dry_run else (3, 10)
                times = time_fn(lambda: model(**inputs), device, *reps)
            worst = max(ratios)
            row.update(status="ok", layers=len(ratios), worst_ratio=round(worst[0], 3),
                       worst_layer=worst[1], codes_equal=equal,
                       forward_rel_diff=float((y - y_ref).norm() / y_ref.norm()),
                       forward_ms=round(1e3 * statistics.median(times), 2))  # fmt: skip
        except Exception as exc:  # one backend failing must not hide the others
            row["status"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            ops.set_backend("reference")
            _relayout(model, lambda f: "canonical")
        emit_row(row)


def run(out: Path | None, dry_run: bool, tokens: int, formats: list[str]) -> list[dict[str, Any]]:
    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU (use --dry-run on a CPU)")
    config = dict(FLUX1_BLOCKS)
    if dry_run:
        from dcgen_quant.models.tiny import TINY_FLUX_CONFIG

        config = {**TINY_FLUX_CONFIG, "num_layers": 1, "num_single_layers": 1}
        tokens = min(tokens, 64)
    rows: list[dict[str, Any]] = []

    def emit_row(row: dict[str, Any]) -> None:
        # written after every row: a run cut short by its time box keeps what it measured
        rows.append(row)
        _write(out, rows, device, dry_run)

    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            _run_format(fmt, config, device, Path(tmp), tokens, dry_run, emit_row)
    return rows


def _write(out: Path | None, rows, device, dry_run: bool) -> None:
    if out is None:
        return
    from dcgen_quant.bench.measured import environment
    from dcgen_quant.tables import format_table

    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": environment(device), "dry_run": dry_run, "rows": rows}
    (out / f"{NAME}.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / f"{NAME}.md").write_text(
        f"# {NAME}\n\n`python -m dcgen_quant.bench.{NAME}{' --dry-run' if dry_run else ''}`\n\n"
        f"```\n{format_table(rows, COLUMNS)}\n```\n"
    )


COLUMNS = [
    ("format", "format", None), ("backend", "backend", None), ("tokens", "tokens", None),
    ("status", "status", None), ("layers", "layers", None), ("codes_equal", "codes equal", None),
    ("worst_ratio", "worst err/ref err", ".3f"), ("worst_layer", "worst layer", None),
    ("forward_rel_diff", "fwd rel diff", ".2e"), ("forward_ms", "fwd ms", ".2f"),
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m dcgen_quant.bench.{NAME}",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny FLUX on the CPU, reference")
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens (default 1024)")
    parser.add_argument("--formats", default="int4,nvfp4")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        torch.set_num_threads(1)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    rows = run(args.out, args.dry_run, args.tokens, formats)
    from dcgen_quant.tables import emit

    emit(rows, COLUMNS, args.json, title="imported Nunchaku FLUX blocks per backend")
    bad = [r for r in rows if not r["status"].startswith(("ok", "unavailable"))]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
