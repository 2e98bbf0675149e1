"""jcompress.distillation."""
