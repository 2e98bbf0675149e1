"""jcompress.demo."""
