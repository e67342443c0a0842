"""Per-family knowledge of diffusion transformers (FLUX, SANA) and tiny test models."""
