"""Nunchaku's SVDQuant checkpoint format (FLUX.1): family-A key names, GPU-tile packing."""
