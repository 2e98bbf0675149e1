"""jcompress.runtime."""
