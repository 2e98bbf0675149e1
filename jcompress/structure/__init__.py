"""jcompress.structure."""
