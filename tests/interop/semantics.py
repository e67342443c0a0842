"""An independent float64 reading of a Nunchaku layer (NUNCHAKU_FORMAT.md sections 2.8, 2.9, 3),
computed from the known tensors that went into DeepCompressor's converter, and inputs whose
4-bit activation quantization is exact (so that a layer's reference forward must equal
``x W_dense^T + b_dense`` up to its own float32 / 16-bit rounding)."""

from __future__ import annotations

import torch

from .helpers import E2M1, SHIFT, Known


def dense(kn: Known, members: list[str], fused: bool, unsigned: bool, smooth_key: str,
          branch_key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(W_dense [N, K], b_dense [N], runtime smooth [K]) in float64 for the Nunchaku layer that
    stacks the DeepCompressor modules ``members``."""
    k = kn.model[f"{members[0]}.weight"].shape[1]
    if kn.fmt == "int4":
        wdq = torch.cat([
            kn.codes[m].double().reshape(-1, k // 64, 64)
            * kn.scale[f"{m}.weight.scale.0"].double().reshape(-1, k // 64, 1)
            for m in members
        ]).reshape(-1, k)  # fmt: skip
    else:
        parts = []
        for m in members:
            st = kn.scale[f"{m}.weight.scale.0"].to(kn.dtype).double()  # stored in 16 bits
            sb = kn.scale[f"{m}.weight.scale.1"].double().reshape(-1, k // 16, 1)
            v = E2M1.double()[kn.codes[m]].reshape(-1, k // 16, 16) * sb
            parts.append(v.reshape(-1, k) * st)
        wdq = torch.cat(parts)
    smooth = kn.smooth[smooth_key].double()
    a = kn.branch[branch_key]["a.weight"].double()
    u = kn.branch[branch_key]["b.weight"].double()
    v64 = a if fused else a / smooth
    v16 = v64.to(kn.dtype).double()  # what lora_down stores
    bias = torch.cat([
        kn.model.get(f"{m}.bias", torch.zeros(kn.model[f"{m}.weight"].shape[0])).double()
        for m in members
    ])  # fmt: skip
    if unsigned:  # the converter's correction, then the 16-bit rounding of the stored bias
        bias = bias + (u @ v64 @ torch.full((k, 1), SHIFT, dtype=torch.float64)).reshape(-1)
    bias = bias.to(kn.dtype).double()
    runtime_smooth = torch.ones_like(smooth) if fused else smooth
    w_dense = wdq / runtime_smooth + u @ v16
    b_dense = bias + (SHIFT * (wdq / runtime_smooth).sum(dim=1) if unsigned else 0)
    return w_dense, b_dense, runtime_smooth


def exact_inputs(kn: Known, smooth: torch.Tensor, tokens: int, unsigned: bool, g) -> torch.Tensor:
    """x [tokens, K] (16-bit exact) whose smoothed (and shifted) values lie exactly on the
    4-bit grid of a power-of-two scale, each group holding the largest code, so that
    quantize_act reproduces them exactly. ``smooth`` must hold powers of two."""
    k = smooth.numel()
    if kn.fmt == "int4":
        group, top = 64, 15 if unsigned else 7
        if unsigned:
            c = torch.randint(0, 16, (tokens, k), generator=g).double()
        else:
            c = torch.randint(-7, 8, (tokens, k), generator=g).double()
        c = c.reshape(tokens, k // group, group)
        c[:, :, 0] = (
            top
            if unsigned
            else top * (1 - 2 * torch.randint(0, 2, (tokens, k // group), generator=g))
        )
        sigma = (
            2.0**-5
            if unsigned
            else torch.exp2(-torch.randint(2, 6, (tokens, k // group, 1), generator=g).double())
        )
        v = (c * sigma).reshape(tokens, k)
    else:
        group = 16
        c = torch.randint(0, 16, (tokens, k), generator=g)
        c = c.reshape(tokens, k // group, group)
        c[:, :, 0] = 7 + 8 * torch.randint(0, 2, (tokens, k // group), generator=g)  # +-6
        sigma = torch.exp2(-torch.randint(0, 4, (tokens, k // group, 1), generator=g).double())
        v = (E2M1.double()[c] * sigma).reshape(tokens, k)
    x = v * smooth - (SHIFT if unsigned else 0.0)
    x16 = x.to(kn.dtype)
    assert torch.equal(x16.double(), x), "crafted input is not exact in 16 bits"
    return x16


def check_close(
    y: torch.Tensor, y64: torch.Tensor, dtype: torch.dtype, what: str
) -> tuple[float, float]:
    """err(y) <= 2 * err(round(y64)) against the float64 result: within 2x of the reference's own
    rounding error. Returns (err, own error)."""
    err = (y.double() - y64).norm().item()
    own = (y64.to(dtype).double() - y64).norm().item()
    assert own > 0, f"{what}: the float64 result is exact in 16 bits; the check would be empty"
    assert err <= 2 * own, f"{what}: error {err:.3e} vs the reference's own rounding {own:.3e}"
    return err, own
