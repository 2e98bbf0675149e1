"""jcompress: JAX-native model compression as pure functions over parameter pytrees.

Compression methods are pure functions over parameter pytrees; compressed parameters are pytrees
too, so ``jit``, ``vmap``, ``scan``, sharding, optax and orbax keep working.
"""

from jcompress import distillation, pruning, quantization, runtime, structure, tree
from jcompress.tree import Compressed, Role, is_compressed

__version__ = "0.1.0"

__all__ = [
    "Compressed",
    "Role",
    "is_compressed",
    "distillation",
    "pruning",
    "quantization",
    "runtime",
    "structure",
    "tree",
]
