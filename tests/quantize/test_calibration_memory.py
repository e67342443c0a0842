"""Streaming calibration: the quantizer's working memory does not grow with the model's depth.

The quantizer caches one block's inputs for all calibration samples, quantizes that block,
then runs it to produce the next block's inputs (dcgen_quant/quantize/calibration.py), so its
working memory is about one block's activations whatever the depth; keeping every block's
activations would grow with it. Measured: the peak of live CPU tensor memory while quantizing
(torch.profiler's allocation and free records summed in time order, helpers.peak_live_bytes)
minus the quantized layers the run creates (the output, which legitimately grows with depth),
for a tiny FLUX with 1 + 1 and with 4 + 4 blocks on calibration data of the same shape.

Measured on the CPU machine: 23.5 and 23.3 MiB of working memory at the two depths (one
block's image + text inputs: 3.4 MiB). A variant that keeps every block's inputs alive
(run_block monkeypatched to hoard them) measured 23.4 and 43.5 MiB and fails the test.
"""

import torch

from dcgen_quant.models.calibration import synthetic_calibration
from dcgen_quant.models.tiny import tiny_flux
from dcgen_quant.quantize import quantize_model
from dcgen_quant.quantize.config import QuantConfig
from dcgen_quant.quantize.layer import QUANTIZED_TYPES

from ..quantized_models import MINIMAL_QUANT
from .helpers import peak_live_bytes


def quantized_bytes(model) -> int:
    tensors = [
        t
        for m in model.modules()
        if isinstance(m, QUANTIZED_TYPES)
        for t in (*m.parameters(), *m.buffers())
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def working_memory(depth: int, config: QuantConfig) -> tuple[int, int]:
    """(working bytes, one block's input bytes) of quantizing a tiny FLUX of ``depth`` + ``depth``
    blocks."""
    model = tiny_flux(num_layers=depth, num_single_layers=depth).eval()
    calib = synthetic_calibration(model, samples=6, steps=2, latent_size=16, text_tokens=32)
    peak = peak_live_bytes(lambda: quantize_model(model, calib, config, progress=False))
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    block_input = len(calib) * (256 + 32) * hidden * 4  # image + text hidden states, fp32
    return peak - quantized_bytes(model), block_input


def test_working_memory_does_not_grow_with_depth(one_thread):
    torch.manual_seed(0)
    # the smallest quantizer settings: the working memory under test is the calibration's, not
    # the layer quantizer's, and every small op of a larger search (GPTQ's per-column loop
    # above all) is one more record for the profiler
    config = QuantConfig(**MINIMAL_QUANT, gptq=False)
    shallow, block_input = working_memory(1, config)
    deep, _ = working_memory(4, config)
    mib = {"1+1 blocks": shallow / 2**20, "4+4 blocks": deep / 2**20}
    # the measurement sees the cached activations: more than one block's inputs
    assert shallow > 2 * block_input, mib
    # 4x the blocks, the same working memory within 10% (keeping every block's activations
    # would add several block inputs' worth per block: +20 MiB here, +86%)
    assert deep < 1.1 * shallow, mib
