"""jcompress.quantization."""
