"""Trainable and frozen halves of a tree with compressed leaves: :func:`partition` /
:func:`combine`.

A compressed leaf declares which float children may be trained (``field(trainable=True)``:
codebook tables, low-rank factors; ``field(trainable="scales")``: quantization scales, only when
asked). :func:`partition` splits a tree into two trees of the same structure, each with ``None``
where the other holds the value (as ``equinox.partition`` does); ``jax.grad`` and optax see the
trainable half only, integer values and indices stay fixed; :func:`combine` puts them back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jcompress.tree._compressed import Compressed, fields, is_compressed
from jcompress.tree._paths import Params

__all__ = ["combine", "partition"]


def _inexact(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return hasattr(x, "shape") and dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _children(leaf: Compressed) -> tuple[list[Any], Any]:
    """The leaf's array children (``None`` included) and its one-level structure."""
    is_child = lambda x: x is not leaf
    return jax.tree.leaves(leaf, is_leaf=is_child), jax.tree.structure(leaf, is_leaf=is_child)


def _split_leaf(leaf: Compressed, scales: bool) -> tuple[Any, Any]:
    """``(trainable, rest)`` copies of one compressed leaf (children ``None`` on the other side)."""
    declared = [f for f in fields(leaf) if not f.static]
    if not declared:  # a leaf that builds its own pytree declares nothing trainable
        return None, leaf
    trainable = set(leaf.trainable_fields(scales=scales))
    values, structure = _children(leaf)
    train, rest = [], []
    for f, x in zip(declared, values):
        if isinstance(x, Compressed):
            t, r = _split_leaf(x, scales)
        elif _inexact(x) and f.name in trainable:
            t, r = x, None
        else:
            t, r = None, x
        train.append(t)
        rest.append(r)
    if all(t is None for t in train):
        return None, leaf
    return jax.tree.unflatten(structure, train), jax.tree.unflatten(structure, rest)


def partition(tree: Params, *, scales: bool = False, floats: bool = True) -> tuple[Any, Any]:
    """Split ``tree`` into ``(trainable, rest)``: same structure, ``None`` where the other half
    holds the value. ``combine(trainable, rest)`` gives ``tree`` back.

    Trainable: the children of compressed leaves declared ``trainable`` (codebook tables,
    low-rank factors), their quantization scales when ``scales=True``, and, with ``floats=True``
    (the default), every uncompressed floating-point leaf (biases, norms, float kernels). Integer
    values, indices and everything else stay in ``rest``, so ``jax.grad`` with respect to
    ``trainable`` and an optax loop over it fine-tune tables and scales with the indices fixed.

    Args:
      tree: a parameter tree (dicts, ``nnx.State``, lists...) that may hold compressed leaves.
      scales: also train quantization scales (``QArray.scale``).
      floats: also train the uncompressed floating-point leaves.

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.quantization import QArray
    >>> q = QArray(jnp.array([[-7, 7]], jnp.int4), jnp.array([[0.5, 1.0]]), bits=4,
    ...            dtype=jnp.float32)
    >>> params = {"kernel": q, "bias": jnp.zeros(2)}
    >>> trainable, rest = partition(params, scales=True)
    >>> trainable["kernel"].values is None, rest["kernel"].scale is None
    (True, True)
    >>> loss = lambda t: jnp.sum(combine(t, rest)["kernel"].dequantize())
    >>> jax.grad(loss)(trainable)["kernel"].scale   # d sum((v - 0) * s) / ds = v
    Array([[-7.,  7.]], dtype=float32)
    """
    if not isinstance(scales, bool) or not isinstance(floats, bool):
        raise TypeError(f"partition: scales and floats must be bools, got {scales!r}, {floats!r}")

    def split(x: Any) -> tuple[Any, Any]:
        if is_compressed(x):
            return _split_leaf(x, scales)
        if floats and _inexact(x):
            return x, None
        return None, x

    trainable = jax.tree.map(lambda x: split(x)[0], tree, is_leaf=is_compressed)
    rest = jax.tree.map(lambda x: split(x)[1], tree, is_leaf=is_compressed)
    return trainable, rest


class _InBothHalves(ValueError):
    """``combine`` met a value in both halves (told apart from a structure mismatch)."""


def combine(trainable: Any, rest: Any) -> Params:
    """The tree :func:`partition` split: each value from whichever half holds it.

    >>> combine({"a": None, "b": 2.0}, {"a": 1.0, "b": None})
    {'a': 1.0, 'b': 2.0}
    """

    def pick(a: Any, b: Any) -> Any:
        if a is not None and b is not None:
            raise _InBothHalves(
                "combine: a value is in both halves; pass the two trees one partition() made "
                "(trainable first), e.g. combine(updated_trainable, rest)"
            )
        return b if a is None else a

    try:
        return jax.tree.map(pick, trainable, rest, is_leaf=lambda x: x is None)
    except _InBothHalves:
        raise
    except ValueError as e:  # jax's structure mismatch
        raise ValueError(
            "combine: trainable and rest do not have the same structure; pass the two trees "
            f"one partition() made, trainable first ({e})"
        ) from e
