"""The compressed-leaf protocol: a registered pytree node that stands for one float array.

``QArray``, ``LowRank`` and later encodings subclass :class:`Compressed`; every jcompress tree
walk treats such a node as one leaf, and the runtime dispatches through the methods it offers
(``dot_general``, ``conv``, ``take``) without importing the modules that define them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["Compressed", "is_compressed"]


class Compressed(abc.ABC):
    """Base class of compressed leaves: registered pytree nodes that stand for one float array.

    A subclass is a registered pytree node (its array children are ordinary pytree leaves, so
    ``jit``, ``vmap``, sharding and orbax see them) that every jcompress walk treats as a single
    leaf: paths never end in ``kernel/values``.

    A subclass provides:

    * ``dequantize() -> jax.Array``: the float array it stands for;
    * ``shape`` and ``dtype``: those of the float array (``dtype`` is the original float dtype);
    * ``nbytes``: the true stored size in bytes (packed sub-byte values count their bits).

    and may provide fast paths that the runtime uses instead of dequantizing, as methods (left
    as ``None`` here when absent):

    * ``dot_general(lhs, dimension_numbers, *, weight_is_rhs=True, preferred_element_type=None,
      **options)``: a matmul with the compressed array as one operand;
    * ``conv(lhs, **conv_general_dilated_params)``: a convolution with it as the kernel;
    * ``take(indices, axis)``: a gather that dequantizes only the rows it takes.
    """

    dot_general: Callable[..., jax.Array] | None = None
    conv: Callable[..., jax.Array] | None = None
    take: Callable[..., jax.Array] | None = None

    # Optional field machinery. A subclass that names its array children and static fields here
    # stores them with ``_set(*arrays, *static)`` (as ``_<name>`` attributes), is immutable, and
    # gets ``tree_flatten_with_keys`` / ``tree_unflatten`` for
    # ``@jax.tree_util.register_pytree_with_keys_class``; checkpoints read the same names.
    array_fields: tuple[str, ...] = ()
    static_fields: tuple[str, ...] = ()

    def _set(self, *values: Any) -> None:
        names = self.array_fields + self.static_fields
        if len(values) != len(names):
            raise TypeError(f"{type(self).__name__}._set takes {names}, got {len(values)} values")
        for name, value in zip(names, values):
            object.__setattr__(self, "_" + name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if self.array_fields:
            raise AttributeError(f"{type(self).__name__} is immutable; build a new one")
        object.__setattr__(self, name, value)

    def tree_flatten_with_keys(self):
        children = [
            (jax.tree_util.GetAttrKey(k), getattr(self, "_" + k)) for k in self.array_fields
        ]
        return children, tuple(getattr(self, "_" + k) for k in self.static_fields)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation: jax rebuilds nodes with tracers, ``None`` or in_axes specs as children.
        obj = object.__new__(cls)
        obj._set(*children, *aux)
        return obj

    @abc.abstractmethod
    def dequantize(self) -> jax.Array:
        """The float array this leaf stands for."""

    def stored(self) -> Compressed:
        """The form checkpoints store: ``self``, unless the leaf is in a runtime-only layout
        (a widened ``QArray`` returns its packed form), so saved files always load."""
        return self

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the float array this leaf stands for."""

    @property
    @abc.abstractmethod
    def dtype(self) -> np.dtype:
        """The original (float) dtype."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """True stored size in bytes (sub-byte values counted by their bits)."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def is_compressed(x: Any) -> bool:
    """Whether ``x`` is a compressed leaf; pass as ``is_leaf=`` to your own tree maps.

    >>> import jax.numpy as jnp
    >>> is_compressed(jnp.ones(3))
    False
    """
    return isinstance(x, Compressed)
