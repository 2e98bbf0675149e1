"""Self-describing, compressed checkpoints of parameter trees (orbax-backed).

``save(directory, tree)`` writes any parameter tree (compressed leaves included) so that
``load(directory)`` rebuilds it without a target tree: the structure and each leaf's dtype,
shape and encoding live in a small versioned JSON schema next to the arrays. Sub-byte values
are stored packed, sparse arrays as bitmask + non-zero values when smaller, small arrays grouped
into one blob, all zstd-compressed by orbax. Writes are atomic; loading runs no code.

Inside an ``orbax.checkpoint.CheckpointManager``, save with ``JCompressSave(tree)`` and restore
with ``JCompressRestore(shardings=...)`` (alone, or as one item of ``ocp.args.Composite``).
"""

from typing import Any

from jcompress.checkpoint._io import VERSION, disk_bytes, load, save
from jcompress.checkpoint._registry import register_compressed

# The CheckpointManager integration subclasses orbax types; importing orbax costs ~0.3 s, so it
# loads on first use of one of these names (PEP 562), not with ``import jcompress``.
_MANAGER_NAMES = ("JCompressCheckpointHandler", "JCompressRestore", "JCompressSave")


def __getattr__(name: str) -> Any:
    if name in _MANAGER_NAMES:
        from jcompress.checkpoint import _manager

        return getattr(_manager, name)
    raise AttributeError(f"module 'jcompress.checkpoint' has no attribute {name!r}")


__all__ = [
    "VERSION",
    "JCompressCheckpointHandler",
    "JCompressRestore",
    "JCompressSave",
    "disk_bytes",
    "load",
    "register_compressed",
    "save",
]
