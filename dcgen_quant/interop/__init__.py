"""Other engines' checkpoint formats: Nunchaku export and import, DeepCompressor import.

``python -m dcgen_quant convert IN OUT --to nunchaku|dcgen_quant`` is the command
(:mod:`dcgen_quant.interop.cli`); docs/INTEROP.md describes what is read and written. Import
side (:mod:`dcgen_quant.interop.nunchaku.importer`): Nunchaku's v1.0 single file, its legacy
folder and DeepCompressor's raw output folder become a diffusers model of our 4-bit layers
(``load_quantized`` detects them) or a dcgen_quant checkpoint (``convert --to dcgen_quant``).
"""
