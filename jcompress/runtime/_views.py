"""A parameter leaf seen through view primitives: its axis map and its deferred value.

A *view* is the leaf itself or the leaf seen through reshapes, transposes, broadcasts, slices,
squeezes, dtype casts and copies (``VIEW_PRIMITIVES``). The walker keeps two things per such
variable: the fact (:class:`View`: which leaf axes each variable axis spans) and, for a
compressed leaf, the value not yet dequantized (:class:`Deferred`: the leaf and the view
operations to replay on its float form). :func:`view_rule` maps a fact through one view
equation; :func:`reshape_groups` is the reshape arithmetic both it and the channel analysis use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from jcompress.runtime._primitives import bind_params
from jcompress.tree import is_compressed

__all__ = ["Deferred", "View", "identity_view", "reshape_groups", "view_rule"]


@dataclasses.dataclass(frozen=True)
class View:
    """Fact: a variable is a view of the parameter leaf at ``path``.

    Attributes:
      path: the leaf's path (``jcompress.tree`` naming).
      axes: one entry per axis of the variable: the leaf axes it spans (``()`` for an axis a
        broadcast or ``expand_dims`` added; several for a reshape that merged leaf axes).
      stacked: leaf axes sliced away by ``scan`` (each slice a separate layer).
      exact: ``False`` once a reshape split a leaf axis or a slice/reverse reordered elements:
        the axis map is then only a coarse one.
    """

    path: str
    axes: tuple[tuple[int, ...], ...]
    stacked: tuple[int, ...] = ()
    exact: bool = True

    def leaf_axes(self, dims: Sequence[int]) -> tuple[int, ...]:
        """The leaf axes spanned by the variable axes ``dims`` (sorted, unique)."""
        return tuple(sorted({a for d in dims for a in self.axes[d]}))

    def sliced(self) -> View:
        """The view inside a ``scan`` body that slices the variable's axis 0 (now stacked).

        >>> View("w", ((0,), (1,), (2,))).sliced()
        View(path='w', axes=((1,), (2,)), stacked=(0,), exact=True)
        """
        return dataclasses.replace(
            self, axes=self.axes[1:], stacked=tuple(sorted({*self.stacked, *self.axes[0]}))
        )


def identity_view(path: str, ndim: int) -> View:
    """The fact of a parameter leaf itself."""
    return View(path, tuple((i,) for i in range(ndim)))


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A value not yet materialized: ``base`` (a compressed leaf or array) seen through ``ops``.

    ``ops`` are ``(primitive, params)`` pairs of single-operand view primitives, replayed on
    ``base.dequantize()`` by :meth:`materialize`.
    """

    base: Any
    ops: tuple[tuple[Any, dict], ...] = ()

    def materialize(self) -> jax.Array:
        x = self.base.dequantize() if is_compressed(self.base) else self.base
        for prim, params in self.ops:
            x = prim.bind(x, **params)
        return x

    def through(self, eqn: Any) -> Deferred:
        """This value seen through one more view equation (recorded, not evaluated)."""
        return Deferred(self.base, (*self.ops, (eqn.primitive, bind_params(eqn)[1])))


def view_rule(eqn: Any, fact: View) -> View:
    """The fact of a view primitive's output given its operand's fact."""
    name = eqn.primitive.name
    p = eqn.params
    in_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    axes = fact.axes
    if name == "transpose":
        return dataclasses.replace(fact, axes=tuple(axes[i] for i in p["permutation"]))
    if name == "broadcast_in_dim":
        new = [()] * len(out_shape)
        for i, d in enumerate(p["broadcast_dimensions"]):
            new[d] = axes[i]
        return dataclasses.replace(fact, axes=tuple(new))
    if name == "squeeze":
        drop = {d % len(in_shape) for d in p["dimensions"]}
        return dataclasses.replace(fact, axes=tuple(a for i, a in enumerate(axes) if i not in drop))
    if name == "reshape":
        return _reshape_rule(fact, in_shape, out_shape)
    if name in ("slice", "rev"):
        return dataclasses.replace(fact, exact=fact.exact and name == "slice")
    return fact  # dtype casts, copies, sharding constraints


def reshape_groups(
    in_shape: Sequence[int], out_shape: Sequence[int]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """How a reshape maps axes: ``[(input axes, output axes), ...]`` runs of equal products.

    A size-1 axis dropped is ``((i,), ())``, one added ``((), (j,))``; a merge is
    ``((i, i + 1), (j,))`` and a split ``((i,), (j, j + 1))``.

    >>> reshape_groups((2, 3, 4), (6, 1, 4))
    [((0, 1), (0,)), ((), (1,)), ((2,), (2,))]
    """
    groups: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        if i < n_in and in_shape[i] == 1 and (j >= n_out or out_shape[j] != 1):
            groups.append(((i,), ()))
            i += 1
            continue
        if j < n_out and out_shape[j] == 1 and (i >= n_in or in_shape[i] != 1):
            groups.append(((), (j,)))
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            else:
                pj *= out_shape[j]
                gj.append(j)
                j += 1
        groups.append((tuple(gi), tuple(gj)))
    return groups


def _reshape_rule(fact: View, in_shape: Sequence[int], out_shape: Sequence[int]) -> View:
    """Map axes through a reshape; a split leaves every piece spanning the whole source."""
    new: list[tuple[int, ...]] = []
    exact = fact.exact
    for gi, gj in reshape_groups(in_shape, out_shape):
        src = tuple(sorted({a for k in gi for a in fact.axes[k]}))
        exact = exact and len(gj) <= 1
        new.extend([src] * len(gj))
    return dataclasses.replace(fact, axes=tuple(new), exact=exact)
