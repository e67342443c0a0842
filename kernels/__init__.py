"""Triton kernels (installed as dcgen_quant.kernels)."""
