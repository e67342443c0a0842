"""Nunchaku's SVDQuant checkpoint format (NUNCHAKU_FORMAT.md): the GPU-tile packings
(:mod:`.packing`), the exporter and the importer."""
