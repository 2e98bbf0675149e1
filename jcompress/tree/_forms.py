"""Tree forms and leaf values: nnx ``Variable`` s, Equinox modules, eager value checks.

Parameters come as linen dicts, ``nnx.State`` s (of ``Variable`` s, or of plain arrays as
``nnx.Optimizer`` hands them to optax), Equinox modules and nested containers. Paths are the same
for all of them (:mod:`jcompress.tree._paths` drops nnx's ``.value``); :func:`unwrap` and
:func:`rewrap` move between a tree of ``Variable`` s and one of their values. Neither flax nor
equinox is imported here: a ``Variable`` can only exist once ``flax.nnx`` is loaded.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.tree._compressed import is_compressed
from jcompress.tree._paths import Params, map_with_paths

__all__ = [
    "check_array_leaf",
    "check_finite",
    "describe_form",
    "is_array_leaf",
    "is_concrete",
    "is_equinox_module",
    "is_variable",
    "rewrap",
    "unwrap",
]


def is_variable(x: Any) -> bool:
    """Whether ``x`` is an ``nnx.Variable`` (checked without importing flax).

    >>> is_variable(1.0)
    False
    """
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _is_wrapper(x: Any) -> bool:
    return is_variable(x) or is_compressed(x)


def unwrap(tree: Params) -> Params:
    """``tree`` with every nnx ``Variable`` replaced by its value (same paths); a single
    ``Variable`` gives its value. Compressed leaves and other leaves are kept as they are.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> unwrap({"kernel": nnx.Param(jnp.ones(2))})
    {'kernel': Array([1., 1.], dtype=float32)}
    """
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=_is_wrapper)


def rewrap(like: Params, values: Params, *, name: str = "values") -> Params:
    """``values`` (a tree or flat ``{path: value}`` dict with ``like``'s paths) in ``like``'s
    structure: where ``like`` holds an nnx ``Variable``, the result holds one of the same type
    around the value. The inverse of :func:`unwrap`; ``name`` names ``values`` in a path
    mismatch error.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> out = rewrap({"kernel": nnx.Param(jnp.ones(2))}, {"kernel": jnp.zeros(2)})
    >>> type(out["kernel"]).__name__, out["kernel"].get_value().tolist()
    ('Param', [0.0, 0.0])
    """
    return map_with_paths(lambda _, __, v: v, like, values, names=[name])


def outer_structure(tree: Params, n: int) -> Any:
    """The treedef of ``tree`` with nnx ``Variable`` s and compressed nodes as leaves, which
    must hold ``n`` leaves (one array per ``Variable``): unflattening values by path with it
    gives a tree of plain values in ``tree``'s containers."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_wrapper)
    if len(leaves) != n:
        raise ValueError(
            f"cannot unwrap the parameter tree: {len(leaves)} variables hold {n} arrays; "
            "each nnx Variable must hold one array"
        )
    return treedef


def is_equinox_module(x: Any) -> bool:
    """Whether ``x`` is an Equinox module (checked without importing equinox)."""
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(x, eqx.Module)


def describe_form(tree: Any) -> str:
    """A short name of a parameter tree's form, for error messages.

    >>> describe_form({"Dense_0": {"kernel": 1.0}})
    'a dict'
    >>> describe_form([(1.0, 2.0)])
    'a list'
    """
    if is_equinox_module(tree):
        return f"an Equinox module ({type(tree).__name__})"
    name = type(tree).__name__
    if type(tree).__module__.startswith("flax."):
        nnx = sys.modules.get("flax.nnx")
        if nnx is not None and isinstance(tree, nnx.State):
            leaves = jax.tree.leaves(tree, is_leaf=is_variable)
            held = "Variables" if any(is_variable(x) for x in leaves) else "arrays"
            return f"an nnx.State of {held}"
        return f"a flax {name}"
    if isinstance(tree, dict | list | tuple):
        return f"a {name}"
    return f"a {type(tree).__module__}.{type(tree).__qualname__}"


def is_concrete(x: Any) -> bool:
    """Whether ``x`` holds concrete values (not a tracer inside ``jit``/``grad``/``vmap``)."""
    return not isinstance(x, jax.core.Tracer)


def is_array_leaf(x: Any) -> bool:
    """Whether ``x`` is an array leaf: an array, a compressed leaf or a Python number (not a
    function or other object, as a whole Equinox module holds).

    >>> import jax, jax.numpy as jnp
    >>> is_array_leaf(jnp.ones(2)), is_array_leaf(1.0), is_array_leaf(jax.nn.relu)
    (True, True, False)
    """
    return (
        is_compressed(x)
        or isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)
        or type(x) in (bool, int, float, complex)
    )


def check_array_leaf(path: str, leaf: Any, *, what: str = "this transform") -> None:
    """Raise ``TypeError`` if ``leaf`` is not an array (nor a compressed leaf, nor a number).

    A whole Equinox module holds its activation functions (and other fields) as leaves: ``jit``,
    ``grad`` and optax need its arrays alone, as ``eqx.partition`` gives them.

    >>> import jax
    >>> check_array_leaf("activation", jax.nn.gelu, what="prune")
    Traceback (most recent call last):
    ...
    TypeError: activation: prune needs a tree of arrays, but this leaf is a function ...
    """
    if is_array_leaf(leaf):
        return
    kind = "function" if callable(leaf) else f"{type(leaf).__module__}.{type(leaf).__qualname__}"
    raise TypeError(
        f"{path}: {what} needs a tree of arrays, but this leaf is a {kind} ({leaf!r:.60}). A "
        "whole Equinox module keeps such fields as leaves (as do other objects); pass its "
        "arrays, `params, static = eqx.partition(model, eqx.is_inexact_array)`, and rebuild "
        "the model with `eqx.combine(params, static)`, as optax and jax.jit need too"
    )


def check_finite(path: str, leaf: Any, *, what: str = "this transform") -> None:
    """Raise ``ValueError`` if a concrete leaf holds NaN or Inf; tracers are not checked.

    Inside ``jit`` the caller records a flag in its state instead (never a silent NaN). A leaf
    that is not an array at all is a ``TypeError`` (:func:`check_array_leaf`).

    >>> import jax.numpy as jnp
    >>> check_finite("w", jnp.ones(2))
    >>> check_finite("w", jnp.array([1.0, jnp.nan]), what="pruning")
    Traceback (most recent call last):
    ...
    ValueError: w: pruning found 1 NaN/Inf value(s) in the weights; ...
    """
    check_array_leaf(path, leaf, what=what)
    value = leaf.dequantize() if is_compressed(leaf) else leaf
    if not is_concrete(value) or not _is_floating(value):
        return
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(np.asarray(value, np.float32))))
    if bad:
        raise ValueError(
            f"{path}: {what} found {bad} NaN/Inf value(s) in the weights; fix the training run "
            "that produced them (or exclude the leaf with where=) before compressing"
        )


def _is_floating(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    return bool(jnp.issubdtype(dtype, jnp.floating))
