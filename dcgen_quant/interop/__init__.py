"""Other engines' checkpoint formats: Nunchaku export and import, DeepCompressor import.

``python -m dcgen_quant convert IN OUT --to nunchaku|dcgen_quant`` is the command
(:mod:`dcgen_quant.interop.cli`); docs/INTEROP.md describes what is read and written.
"""
