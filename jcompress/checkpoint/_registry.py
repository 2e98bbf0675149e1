"""The registry of compressed-leaf kinds a checkpoint can hold, by name.

A leaf class that declares its fields (``class QArray(Compressed, kind="QArray")``) is in the
registry from its class definition, and :func:`register_compressed` adds a class that builds its
own pytree node: nothing here names the modules that define leaves. The table itself lives with
the protocol in :mod:`jcompress.tree`; this module is the checkpoint's view of it.
"""

from __future__ import annotations

from jcompress.tree._kinds import Kind, kind_named, kind_of, register_compressed
from jcompress.tree._kinds import kind_names as registered

__all__ = ["CompressedKind", "kind_named", "kind_of", "register_compressed", "registered"]

CompressedKind = Kind
