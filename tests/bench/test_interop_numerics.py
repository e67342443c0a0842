"""bench/interop_numerics.py: its emulation of Nunchaku's kernel rules starts from exactly our
reference (all rules off = SVDQLinear / W4A16Linear forward, bit for bit), and every rule it
switches on changes the output, but by less than the layer's own 4-bit error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcgen_quant.bench import interop_numerics as num
from dcgen_quant.formats import dequantize_weight
from dcgen_quant.nn import SVDQLinear, W4A16Linear

from ..quantized_models import fill_from_linear


def _layer(fmt, unsigned, k=256, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        linear.bias.copy_(0.1 * torch.randn(n, generator=g))
    layer = SVDQLinear(k, n, 16, fmt, True, torch.bfloat16, act_unsigned=unsigned)
    fill_from_linear(layer, linear, 16, g)
    if unsigned:  # the bias that absorbs the shift, as the quantizer writes it
        r = dequantize_weight(layer.quantized_weight()).double() / layer.smooth_factor.double()
        layer.bias.copy_(
            (layer.bias.double() - num.UNSIGNED_ACT_SHIFT * r.sum(1)).to(torch.bfloat16)
        )
    dense = dequantize_weight(layer.quantized_weight()).double() / layer.smooth_factor.double()
    dense = dense + layer.proj_up.double() @ layer.proj_down.double().t()
    return layer, g, dense


@pytest.mark.parametrize("fmt, unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
def test_all_rules_off_is_our_reference_and_each_rule_changes_little(fmt, unsigned):
    layer, g, dense = _layer(fmt, unsigned)
    x = torch.randn(12, 256, generator=g)
    x = (nn.functional.gelu(x, approximate="tanh") if unsigned else x).to(torch.bfloat16)
    with torch.no_grad():
        ours = layer(x)
        assert torch.equal(num.w4a4_forward(layer, x, num.Rules()), ours)
        # the layer's exact function (no activation quantization): our 4-bit error against it
        exact = x.double() @ dense.t() + layer.bias.double()
        if unsigned:
            exact = exact + num.UNSIGNED_ACT_SHIFT * (
                dense - layer.proj_up.double() @ layer.proj_down.double().t()
            ).sum(1)
        own = ((ours.double() - exact).norm() / exact.norm()).item()
        for rule in num.W4A4_RULES:
            y = num.w4a4_forward(layer, x, num.Rules(**{rule: True}))
            change = ((y.double() - ours.double()).norm() / exact.norm()).item()
            assert 0 < change < own, (rule, change, own)


def test_adaln_all_rules_off_is_our_layer_plus_diffusers_one():
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(256, 384)
    layer = W4A16Linear(256, 384, "int4", True, torch.bfloat16)
    fill_from_linear(layer, linear, 0, g)
    x = torch.randn(2, 256, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        mod = num.adaln_modulation(layer, x, 6, False, False)
        per = 384 // 6
        for j in range(6):
            chunk = y[:, j * per : (j + 1) * per]
            want = (1 + chunk) if j in (1, 4) else chunk  # diffusers: x * (1 + scale) + shift
            assert torch.equal(mod[:, j * per : (j + 1) * per], want.float())
        for awq, fold in ((True, False), (False, True)):
            other = num.adaln_modulation(layer, x, 6, awq, fold)
            assert 0 < ((other - mod).norm() / mod.norm()).item() < 0.05
