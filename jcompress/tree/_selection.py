"""Selection: which leaves a transform touches, resolved once (``where=``, roles, kinds).

Every transform takes ``where=``: a regex matched with ``re.fullmatch`` against the path, a
callable ``(path, leaf) -> bool``, a pytree of bools, or ``None`` for the default selection
(with roles: floating leaves of the transform's kinds; without: floating leaves named
``kernel`` or ``embedding``, Flax's names). :func:`selection` resolves it into a
:class:`Selection` (the selected paths, their leaves and roles, and the way back to a tree);
:func:`select` is the same as a pytree of bools.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.tree._compressed import is_compressed
from jcompress.tree._forms import _is_floating, check_finite, describe_form, outer_structure
from jcompress.tree._paths import (
    Params,
    _check_unique,
    _flatten,
    common_prefix_hint,
    leaves_with_paths,
    match_by_path,
)
from jcompress.tree._roles import KINDS, WEIGHT_KINDS, Role, default_role

__all__ = ["Selection", "Where", "resolve_roles", "select", "selected_paths", "selection"]

Where = str | Callable[[str, Any], bool] | Any | None
"""A selection: a regex (``re.fullmatch`` against the path), a callable ``(path, leaf) -> bool``,
a pytree of bools with the same paths, or ``None`` for the default selection."""


class Selection:
    """The leaves of a parameter tree that a transform touches (made by :func:`selection`).

    Attributes:
      tree: the parameter tree it was made from.
      paths: the selected paths, in tree order.
      all_paths: every path of ``tree``, in tree order.
      pairs: ``[(path, leaf), ...]`` of every leaf (:func:`~jcompress.tree.leaves_with_paths`).
      leaves: ``{path: leaf}`` of the selected leaves (nnx ``Variable`` s unwrapped, compressed
        leaves whole).
      roles: ``{path: Role}`` of the selected leaves: the given ``roles=``, else Flax's layouts
        (:func:`resolve_roles`), checked against each leaf's shape (computed on first use).
      mask: the pytree of bools with ``tree``'s structure (what :func:`select` returns).

    >>> import jax.numpy as jnp
    >>> s = selection({"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}, None)
    >>> s.paths, s.roles["Dense_0/kernel"].output
    (('Dense_0/kernel',), (1,))
    >>> s.unflatten({"Dense_0/kernel": 0.5}, default=None)
    {'Dense_0': {'bias': None, 'kernel': 0.5}}
    """

    def __init__(
        self,
        tree: Params,
        pairs: list[tuple[str, Any]],
        treedef: Any,
        chosen: list[bool],
        roles: Mapping[str, Role] | None,
        what: str,
    ):
        self.tree = tree
        self.all_paths = tuple(p for p, _ in pairs)
        self.paths = tuple(p for (p, _), c in zip(pairs, chosen) if c)
        self.leaves = {p: x for (p, x), c in zip(pairs, chosen) if c}
        self.what = what
        self.pairs = pairs
        self._treedef = treedef
        self._chosen = chosen
        self._given_roles = roles

    def __repr__(self) -> str:
        return f"Selection({list(self.paths)!r})"

    def __contains__(self, path: str) -> bool:
        return path in self.leaves

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def mask(self) -> Params:
        """A pytree of Python bools with ``tree``'s structure (``True`` where selected)."""
        return jax.tree_util.tree_unflatten(self._treedef, list(self._chosen))

    @functools.cached_property
    def roles(self) -> dict[str, Role]:
        return _resolve(self.pairs, self._chosen, self._given_roles)

    def narrow(self, paths: Iterable[str]) -> Selection:
        """The selection of only those selected ``paths`` (the same tree, roles and name).

        >>> import jax.numpy as jnp
        >>> selection({"a": jnp.ones(2), "b": jnp.ones(2)}, ".*").narrow(["b"]).paths
        ('b',)
        """
        keep = set(paths)
        unknown = sorted(keep - set(self.paths))
        if unknown:
            raise ValueError(f"{self.what}: {unknown[:5]} are not selected paths")
        chosen = [p in keep for p, _ in self.pairs]
        out = Selection(self.tree, self.pairs, self._treedef, chosen, self._given_roles, self.what)
        if "roles" in self.__dict__:
            out.roles = {p: r for p, r in self.roles.items() if p in keep}
        return out

    def check_finite(self) -> Selection:
        """Raise naming the path if a selected leaf holds NaN/Inf (concrete leaves only: inside
        ``jit`` the caller flags it instead) or is not an array at all; returns ``self``."""
        for path, leaf in self.leaves.items():
            check_finite(path, leaf, what=self.what)
        return self

    def values(self) -> dict[str, jax.Array]:
        """``{path: float array}`` of the selected leaves (compressed leaves dequantized)."""
        return {p: _float_value(x) for p, x in self.leaves.items()}

    def match(self, other: Params | Mapping[str, Any], *, name: str) -> dict[str, Any]:
        """``{path: other's leaf}`` for the selected paths. ``other`` has ``tree``'s paths (a
        pytree or a flat ``{path: value}`` dict, checked as by
        :func:`~jcompress.tree.match_by_path`) or is a flat dict of exactly the selected paths.

        >>> import jax.numpy as jnp
        >>> s = selection({"a": jnp.ones(2), "b": jnp.ones(2)}, "a")
        >>> s.match({"a": 1, "b": 2}, name="scores"), s.match({"a": 3}, name="scores")
        ({'a': 1}, {'a': 3})
        """
        if isinstance(other, Mapping) and set(other) == set(self.paths):
            return {p: other[p] for p in self.paths}
        matched = match_by_path(self.tree, other, name=name)
        return {p: matched[p] for p in self.paths}

    def unflatten(self, values: Mapping[str, Any], *, default: Any = True) -> Params:
        """A tree with ``tree``'s containers holding ``values[path]`` (any path of ``tree``),
        ``default`` elsewhere: nnx ``Variable`` s and compressed leaves are replaced whole, so
        the result holds plain values (masks, scores) with the parameters' paths."""
        known = set(self.all_paths)
        unknown = [p for p in values if p not in known]
        if unknown:
            raise ValueError(f"{self.what}: {unknown[:5]} are not paths of the parameter tree")
        treedef = outer_structure(self.tree, len(self.pairs))
        leaves = [values.get(p, default) for p in self.all_paths]
        return jax.tree_util.tree_unflatten(treedef, leaves)


def _float_value(leaf: Any) -> jax.Array:
    return leaf.dequantize() if is_compressed(leaf) else jnp.asarray(leaf)


def _describe_where(where: Any) -> str:
    if where is None:
        return "the default selection (no where=)"
    if isinstance(where, str):
        return f"where={where!r}"
    if callable(where):
        return f"where={getattr(where, '__name__', 'callable')}"
    return "where=<pytree>"


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool | np.bool_) or (
        getattr(x, "dtype", None) == np.dtype(bool) and getattr(x, "shape", None) == ()
    )


def _is_bool_tree(where: Any) -> bool:
    """A pytree whose leaves are all scalar bools (an Equinox module of bools is callable too)."""
    leaves = jax.tree.leaves(where)
    return bool(leaves) and all(_is_bool(x) for x in leaves)


def _missing_role(path: str, roles: Mapping[str, Role], by: str) -> ValueError:
    near = difflib.get_close_matches(path, list(roles), n=3, cutoff=0.5)
    return ValueError(
        f"{path}: selected{by} but missing from roles="
        + (f" (nearest: {near})" if near else "")
        + ("; pass roles for every selected leaf or narrow where=" if by else "")
        + common_prefix_hint([path], list(roles))
    )


def selection(
    tree: Params,
    where: Where = None,
    *,
    roles: Mapping[str, Role] | None = None,
    kinds: Iterable[str] = WEIGHT_KINDS,
    what: str = "this transform",
    allow_empty: bool = False,
) -> Selection:
    """Which leaves of ``tree`` a transform touches, as a :class:`Selection`.

    Args:
      tree: the parameter tree.
      where: ``None`` (the default selection below), a regex matched with ``re.fullmatch``
        against each path, a callable ``(path, leaf) -> bool``, or a pytree of bools with the same
        paths.
      roles: ``{path: Role}``. With ``roles``, the default selects floating leaves whose kind is
        in ``kinds``; without, floating leaves named ``kernel`` or ``embedding`` (Flax's names;
        ``embedding`` only if ``"gather"`` is in ``kinds``), so biases, norm scales and stacked
        biases are never picked by accident.
      kinds: the role kinds the default may select (N:M and channel pruning pass
        ``("matmul", "conv")``).
      what: the transform's name, for error messages.
      allow_empty: an empty selection instead of an error when nothing is selected.

    Returns:
      A :class:`Selection` (compressed leaves are single leaves).

    Raises:
      ValueError: nothing selected; a selected leaf that is not floating; a selected leaf
        missing from ``roles``; a ``where`` pytree whose paths differ from ``tree``'s.

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    >>> selection(params, ".*bias").paths
    ('Dense_0/bias',)
    """
    kinds = tuple(kinds)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown role kind {k!r}; expected one of {KINDS}")
    pairs, treedef = _flatten(tree)
    paths = [p for p, _ in pairs]
    _check_unique(paths)
    if roles is not None and not isinstance(roles, Mapping):
        raise TypeError(f"roles= must be a {{path: Role}} dict, got {type(roles).__name__}")

    if where is None:
        chosen = []
        for p, x in pairs:
            if not _is_floating(x):
                chosen.append(False)
                continue
            role = roles.get(p) if roles is not None else default_role(p, x)
            chosen.append(role is not None and role.kind in kinds)
        explicit = False
    elif isinstance(where, str):
        try:
            rx = re.compile(where)
        except re.error as e:
            raise ValueError(f"where={where!r} is not a valid regular expression: {e}") from None
        chosen = [rx.fullmatch(p) is not None for p in paths]
        explicit = True
    elif callable(where) and not _is_bool_tree(where):
        chosen = [bool(where(p, x)) for p, x in pairs]
        explicit = True
    else:
        chosen = []
        for p, g in match_by_path(tree, where, name="where").items():
            if not _is_bool(g):
                raise TypeError(f"where: the entry for {p!r} must be a bool, got {g!r}")
            chosen.append(bool(g))
        explicit = True

    if explicit:
        for (p, x), c in zip(pairs, chosen):
            if not c:
                continue
            if not _is_floating(x):
                dtype = getattr(x, "dtype", type(x).__name__)
                raise ValueError(
                    f"{p}: {what} needs floating leaves, but {_describe_where(where)} selects a "
                    f"leaf of dtype {dtype}; exclude it from where="
                )
            if roles is not None and p not in roles:
                raise _missing_role(p, roles, f" by {_describe_where(where)}")

    if not allow_empty and not any(chosen):
        hint = (
            "without roles= it picks floating leaves named 'kernel'/'embedding' and assumes "
            f"Flax's layouts, and {describe_form(tree)} has none (paths: "
            f"{paths[:4]}{' ...' if len(paths) > 4 else ''}). Pass "
            "roles=jc.roles(fn, params, *args), which reads each leaf's layout from the function "
            "that uses it (Equinox's weight is (out, in)), or where= to pick leaves by path"
            if where is None and roles is None
            else f"available paths: {paths[:8]}{' ...' if len(paths) > 8 else ''}"
        )
        raise ValueError(f"{what}: {_describe_where(where)} selects no leaf; {hint}")
    return Selection(tree, pairs, treedef, chosen, roles, what)


def select(
    tree: Params,
    where: Where = None,
    *,
    roles: Mapping[str, Role] | None = None,
    kinds: Iterable[str] = WEIGHT_KINDS,
    what: str = "this transform",
    allow_empty: bool = False,
) -> Params:
    """A pytree of Python bools with ``tree``'s structure: which leaves a transform touches.

    ``selection(tree, where, ...).mask``; arguments and errors as in :func:`selection`.

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    >>> select(params)
    {'Dense_0': {'bias': False, 'kernel': True}}
    >>> select(params, ".*bias")
    {'Dense_0': {'bias': True, 'kernel': False}}
    """
    return selection(tree, where, roles=roles, kinds=kinds, what=what, allow_empty=allow_empty).mask


def selected_paths(selection: Params) -> list[str]:
    """The paths whose entry in a :func:`select` result is ``True``.

    >>> selected_paths({"a": True, "b": False})
    ['a']
    """
    return [p for p, s in leaves_with_paths(selection) if s]


def _resolve(
    pairs: list[tuple[str, Any]], chosen: list[Any], roles: Mapping[str, Role] | None
) -> dict[str, Role]:
    out = {}
    for (p, x), s in zip(pairs, chosen):
        if not s:
            continue
        shape = tuple(getattr(x, "shape", ()))
        if roles is not None:
            if p not in roles:
                raise _missing_role(p, roles, "")
            role = roles[p]
        else:
            role = default_role(p, x)
            if role is None:
                nd = len(shape)
                role = (
                    Role("matmul", contracting=tuple(range(nd - 1)), output=(nd - 1,))
                    if nd >= 2
                    else Role("other")
                )
        out[p] = role.check(p, shape)
    return out


def resolve_roles(
    tree: Params,
    selection: Params,
    roles: Mapping[str, Role] | None = None,
) -> dict[str, Role]:
    """``{path: Role}`` for every selected leaf, checked against the leaf's shape.

    From ``roles`` when given (a missing selected path is an error), else :func:`default_role`,
    falling back to Flax's layout (every axis but the last contracting) for selected leaves that
    have no default role.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((3, 4))}
    >>> resolve_roles(params, {"w": True})
    {'w': Role(kind='matmul', contracting=(0,), output=(1,), stacked=())}
    """
    chosen = match_by_path(tree, selection, name="selection")
    return _resolve(leaves_with_paths(tree), list(chosen.values()), roles)
