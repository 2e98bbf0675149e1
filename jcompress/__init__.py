"""jcompress: JAX-native model compression as pure functions over parameter pytrees.

Compression methods are pure functions over parameter pytrees; compressed parameters are pytrees
too, so ``jit``, ``vmap``, ``scan``, sharding, optax and orbax keep working.

Subpackages: :mod:`jcompress.pruning`, :mod:`jcompress.quantization`,
:mod:`jcompress.distillation`, :mod:`jcompress.structure`, :mod:`jcompress.runtime`,
:mod:`jcompress.checkpoint`, :mod:`jcompress.report`, :mod:`jcompress.budget`; the ground
floor is :mod:`jcompress.tree`.
"""

from jcompress import (
    budget,
    checkpoint,
    distillation,
    pruning,
    quantization,
    report,
    runtime,
    structure,
    tree,
)
from jcompress._export import export, load_exported
from jcompress._version import __version__ as __version__
from jcompress.runtime import InputStats, capture, compressed, explain, roles, tap
from jcompress.tree import Compressed, Role, is_compressed

__all__ = [
    "Compressed",
    "InputStats",
    "Role",
    "budget",
    "capture",
    "checkpoint",
    "compressed",
    "distillation",
    "explain",
    "export",
    "is_compressed",
    "load_exported",
    "pruning",
    "quantization",
    "report",
    "roles",
    "runtime",
    "structure",
    "tap",
    "tree",
]
