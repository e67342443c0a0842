"""Test layers and inputs shared by the quantizer tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def structured_weight(n: int, k: int, generator: torch.Generator, strong: int = 64) -> torch.Tensor:
    """A weight [N, K] with a decaying spectrum: ``strong`` directions plus a noise floor.

    Trained transformer weights are far from i.i.d. noise: a few directions carry much of the
    energy (this is what SVDQuant's low-rank branch exploits). Here singular value i of the
    structured part is ``8 / i`` (i = 1..strong) on random orthonormal directions, plus an
    i.i.d. Gaussian floor of std 0.5 / sqrt(K) (which no low-rank branch can remove).
    """
    u = torch.linalg.qr(torch.randn(n, strong, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(k, strong, generator=generator)).Q
    s = 8.0 / torch.arange(1, strong + 1, dtype=torch.float32)
    return (u * s) @ v.t() + 0.5 * torch.randn(n, k, generator=generator) / k**0.5


def outlier_inputs(
    t: int, k: int, generator: torch.Generator, outliers: int = 8, factor: float = 50.0
) -> torch.Tensor:
    """Activations [T, K]: standard normal, with ``outliers`` fixed channels ``factor`` x larger."""
    x = torch.randn(t, k, generator=generator)
    x[:, :: k // outliers][:, :outliers] *= factor
    return x


def make_linear(w: torch.Tensor, generator: torch.Generator, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(0.1 * torch.randn(w.shape[0], generator=generator))
    return lin


def rel_error(module: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """||module(x) - reference(x)|| / ||reference(x)|| in float32."""
    with torch.no_grad():
        y = reference(x).float()
        return float((module(x).float() - y).norm() / y.norm())


def peak_live_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU while ``fn()`` runs: torch.profiler's
    raw allocation and free records, in time order (turning ~10^6 of them into FunctionEvents,
    ``prof.events()``, would take a minute)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak
