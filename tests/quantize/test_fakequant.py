"""The search's fake quantization equals the formats' quantize + dequantize bit for bit."""

import pytest
import torch

from dcgen_quant.formats import (
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)
from dcgen_quant.quantize.fakequant import fake_quant_act, fake_quant_weight


def _awkward(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.exp(2 * torch.randn(k, generator=g))
    x[0, :16] = 0.0  # an all-zero group (zero scale)
    x[1, 3] = -0.0  # negative zero
    x[2, 16:32] = 1.25  # all-equal group
    return x


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [3, 37])
def test_weight_fake_quant_is_bit_exact(fmt, dtype, rows):
    w = _awkward(rows, 192, seed=rows)
    expected = dequantize_weight(quantize_weight(w, fmt, dtype))
    assert torch.equal(fake_quant_weight(w, fmt, dtype), expected)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_fake_quant_is_bit_exact(fmt, dtype):
    # the runtime quantizes x already cast to the layer dtype, with INT4 scales in that dtype
    x = _awkward(53, 128, seed=7).to(dtype)
    q, scales = quantize_activation(x, fmt)
    expected = dequantize_activation(q, scales, fmt)
    assert torch.equal(fake_quant_act(x.float(), fmt, dtype), expected)
