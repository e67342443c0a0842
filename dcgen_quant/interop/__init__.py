"""Other engines' checkpoint formats: Nunchaku (read and write) and DeepCompressor (read).

Import side (``dcgen_quant.interop.nunchaku.importer``): Nunchaku's v1.0 single file, its legacy
folder and DeepCompressor's raw output folder become a diffusers model of our 4-bit layers
(``load_quantized`` detects them) or a dcgen_quant checkpoint (``convert --to dcgen_quant``).
docs/INTEROP.md is the user documentation; ``NUNCHAKU_FORMAT.md`` the format reference.
"""
