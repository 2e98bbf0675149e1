"""jcompress.pruning."""
