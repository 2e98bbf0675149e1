"""Paths, selection, roles and the compressed-leaf protocol: the ground floor of jcompress.

Every jcompress function names a parameter leaf by its *path*: the key path joined with ``/``
(``params/Dense_0/kernel``; the trailing ``.value`` of an ``nnx.Variable`` dropped). Trees that
should correspond (params, masks, roles, statistics) are matched by exact path, never by position.

This module imports nothing else from jcompress.

Types:

* :class:`Compressed`: base class of compressed leaves (``QArray``, low-rank factors, ...). Every
  jcompress tree walk treats a compressed node as one leaf; :func:`is_compressed` is the
  ``is_leaf=`` to pass to your own ``jax.tree.map``.
* :class:`Role`: what a leaf *is* (``matmul``, ``conv``, ``gather`` or ``other``) and which axes
  contract, index output channels, or stack separate layers.
* :class:`Member` / :class:`Group`: plain data naming parameter axes that must lose the same
  channels together (filled in by ``jcompress.structure.dependencies``).
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
"""Any pytree of arrays: a linen variables dict, an ``nnx.State``, an Equinox module, nested
dicts/lists/tuples. Compressed leaves count as single leaves."""

Where = str | Callable[[str, Any], bool] | Any | None
"""A selection: a regex (``re.fullmatch`` against the path), a callable ``(path, leaf) -> bool``,
a pytree of bools with the same paths, or ``None`` for the default selection."""

__all__ = [
    "Compressed",
    "Group",
    "Member",
    "Params",
    "Role",
    "Where",
    "check_array_leaf",
    "check_finite",
    "common_prefix_hint",
    "default_role",
    "describe_form",
    "is_array_leaf",
    "is_compressed",
    "is_concrete",
    "is_equinox_module",
    "leaves_with_paths",
    "map_with_paths",
    "match_paths",
    "path_str",
    "resolve_roles",
    "select",
    "selected_paths",
]

KINDS = ("matmul", "conv", "gather", "other")
WEIGHT_KINDS = ("matmul", "conv", "gather")
DEFAULT_NAMES = ("kernel", "embedding")


# ----------------------------------------------------------------------------------------------
# The compressed-leaf protocol
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: Sequence[Any]) -> str:
    """The ``/``-joined name of a key path (the trailing ``.value`` of nnx variables dropped).

    >>> import jax
    >>> [(kp, _)] = jax.tree_util.tree_leaves_with_path({"params": {"Dense_0": {"kernel": 1.0}}})
    >>> path_str(kp)
    'params/Dense_0/kernel'
    """
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


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
            leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
            held = "Variables" if any(isinstance(x, nnx.Variable) for x in leaves) else "arrays"
            return f"an nnx.State of {held}"
        return f"a flax {name}"
    if isinstance(tree, dict | list | tuple):
        return f"a {name}"
    return f"a {type(tree).__module__}.{type(tree).__qualname__}"


def _flatten(tree: Params, is_leaf: Callable[[Any], bool] | None = None):
    def leaf_test(x):
        return is_compressed(x) or (is_leaf is not None and is_leaf(x))

    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf_test)
    return [(path_str(kp), leaf) for kp, leaf in pairs], treedef


def leaves_with_paths(tree: Params) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in tree order; compressed leaves are single leaves.

    >>> leaves_with_paths({"a": {"kernel": 1.0, "bias": 2.0}})
    [('a/bias', 2.0), ('a/kernel', 1.0)]
    """
    pairs, _ = _flatten(tree)
    _check_unique([p for p, _ in pairs])
    return pairs


def _check_unique(paths: list[str]) -> None:
    if len(set(paths)) != len(paths):
        seen, dup = set(), []
        for p in paths:
            if p in seen:
                dup.append(p)
            seen.add(p)
        raise ValueError(
            f"two leaves share the path(s) {sorted(set(dup))[:5]}: jcompress names leaves by "
            "their '/'-joined key paths, so keys must not contain '/' or collide after joining"
        )


def common_prefix_hint(missing: list[str], available: list[str]) -> str:
    """Explain a systematic prefix difference (``params/`` present on one side only)."""
    counts: dict[tuple[str, str], int] = {}
    for m in missing:
        for a in available:
            if a.endswith("/" + m):
                key = ("given", a[: len(a) - len(m)])
            elif m.endswith("/" + a):
                key = ("expected", m[: len(m) - len(a)])
            else:
                continue
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return ""
    (side, prefix), _ = max(counts.items(), key=lambda kv: kv[1])
    has, lacks = (
        ("the given tree", "the parameter tree")
        if side == "given"
        else ("the parameter tree", "the given tree")
    )
    return (
        f"\nThe paths differ by a common prefix {prefix!r}: {has} has it, {lacks} does not "
        "(roles computed from `model.apply(variables, x)` carry 'params/'; compute them with "
        "`lambda p, x: model.apply({'params': p}, x)` to match `variables['params']`)."
    )


def _mismatch_error(name: str, missing: list[str], extra: list[str], available: list[str]) -> str:
    lines = [f"{name} does not match the parameter tree by path."]
    for p in missing[:5]:
        near = difflib.get_close_matches(p, extra or available, n=3, cutoff=0.5)
        lines.append(f"  missing {p!r}" + (f" (nearest given: {near})" if near else ""))
    if len(missing) > 5:
        lines.append(f"  ... and {len(missing) - 5} more missing")
    for p in extra[:5]:
        lines.append(f"  unexpected {p!r}")
    if len(extra) > 5:
        lines.append(f"  ... and {len(extra) - 5} more unexpected")
    msg = "\n".join(lines)
    msg += common_prefix_hint(missing, extra)
    return msg + "\nFix: build it from the same tree (e.g. jax.tree.map over the params)."


def match_paths(
    reference: Params,
    other: Params | Mapping[str, Any],
    *,
    name: str = "tree",
    is_leaf: Callable[[Any], bool] | None = None,
) -> list[Any]:
    """``other``'s leaves in the order of ``reference``'s leaves, matched by exact path.

    ``other`` may be a pytree or a flat ``{path: value}`` dict. A difference in paths raises a
    ``ValueError`` naming the missing and unexpected paths, the nearest ones, and a common prefix
    if that is the cause.

    >>> match_paths({"a": 1, "b": 2}, {"b": 20, "a": 10}, name="masks")
    [10, 20]
    """
    ref_paths = [p for p, _ in leaves_with_paths(reference)]
    pairs, _ = _flatten(other, is_leaf=is_leaf)
    lookup = dict(pairs)
    if len(lookup) != len(pairs) or set(lookup) != set(ref_paths):
        # Not the same tree shape: maybe a flat {path: value} dict whose values are pytrees
        # themselves (statistics, groups). A tree that flattens to the right paths (an
        # nnx.State holding Variables, say) always takes the branch above, values unwrapped.
        if isinstance(other, Mapping) and all(isinstance(k, str) for k in other):
            if set(other) == set(ref_paths) or any("/" in k for k in other):
                lookup = dict(other)
        else:
            _check_unique([p for p, _ in pairs])
    missing = [p for p in ref_paths if p not in lookup]
    extra = [p for p in lookup if p not in set(ref_paths)]
    if missing or extra:
        raise ValueError(_mismatch_error(name, missing, extra, list(lookup)))
    return [lookup[p] for p in ref_paths]


def map_with_paths(
    fn: Callable[..., Any],
    tree: Params,
    *others: Params | Mapping[str, Any],
    names: Sequence[str] | None = None,
) -> Params:
    """``fn(path, leaf, *other_leaves)`` over ``tree``, with ``others`` matched by exact path.

    The result has ``tree``'s structure (nnx ``Variable`` wrappers kept). ``others`` may be
    pytrees of another structure (plain arrays where ``tree`` has ``Variable`` s) or flat
    ``{path: value}`` dicts. Compressed leaves are single leaves.

    >>> map_with_paths(lambda p, x, m: x * m, {"a": 2.0}, {"a": 3.0})
    {'a': 6.0}
    """
    pairs, treedef = _flatten(tree)
    _check_unique([p for p, _ in pairs])
    names = list(names) if names is not None else [f"argument {i + 2}" for i in range(len(others))]
    matched = [match_paths(tree, o, name=n) for o, n in zip(others, names)]
    out = [fn(p, x, *(m[i] for m in matched)) for i, (p, x) in enumerate(pairs)]
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------------------------


def _axes(value: Any, field: str) -> tuple[int, ...]:
    if isinstance(value, int | np.integer):
        value = (value,)
    try:
        axes = tuple(int(a) for a in value)
    except TypeError:
        raise TypeError(f"Role.{field} must be a tuple of ints, got {value!r}") from None
    if len(set(axes)) != len(axes):
        raise ValueError(f"Role.{field} has repeated axes: {axes}")
    return axes


@dataclasses.dataclass(frozen=True)
class Role:
    """What a parameter leaf is, and what its axes mean.

    Attributes:
      kind: ``"matmul"``, ``"conv"``, ``"gather"`` (an embedding table) or ``"other"``.
      contracting: axes summed over when the leaf is used (Dense ``(in, out)``: ``(0,)``; Conv
        ``(kh, kw, in, out)``: ``(0, 1, 2)``; a gathered table ``(vocab, features)``: ``(1,)``).
      output: axes that index output channels (Dense: ``(1,)``; attention ``DenseGeneral``
        ``(features, heads, head_dim)``: ``(1, 2)``; a gathered table: the row axis ``(0,)``).
      stacked: leading axes of scanned / vmapped layers; each slice is a separate layer.

    Axes are non-negative. Where an axis must be one axis (N:M groups, quantization groups) it is
    the last contracting axis, :attr:`group_axis`.

    >>> Role("matmul", contracting=(0,), output=(1,)).group_axis
    0
    """

    kind: str
    contracting: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    stacked: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Role.kind must be one of {KINDS}, got {self.kind!r}")
        for f in ("contracting", "output", "stacked"):
            axes = _axes(getattr(self, f), f)
            if any(a < 0 for a in axes):
                raise ValueError(f"Role.{f} axes must be non-negative, got {axes}")
            object.__setattr__(self, f, axes)
        sets = [set(self.contracting), set(self.output), set(self.stacked)]
        if (sets[0] & sets[1]) or (sets[0] & sets[2]) or (sets[1] & sets[2]):
            raise ValueError(
                f"Role axes overlap: contracting={self.contracting}, output={self.output}, "
                f"stacked={self.stacked}; each axis has at most one meaning"
            )
        if self.kind != "other" and (not self.contracting or not self.output):
            raise ValueError(
                f"a {self.kind!r} role needs contracting and output axes, got "
                f"contracting={self.contracting}, output={self.output}"
            )

    @property
    def group_axis(self) -> int:
        """The last contracting axis: N:M groups and quantization groups run along it."""
        if not self.contracting:
            raise ValueError(f"a {self.kind!r} role has no contracting axis")
        return self.contracting[-1]

    def check(self, path: str, shape: Sequence[int]) -> Role:
        """Raise if the role does not fit a leaf of ``shape``; returns ``self``."""
        ndim = len(shape)
        axes = self.contracting + self.output + self.stacked
        if any(a >= ndim for a in axes):
            raise ValueError(
                f"{path}: role {self} names axes beyond the leaf's rank {ndim} (shape "
                f"{tuple(shape)}); fix roles= (jc.roles(fn, params, *args) infers them)"
            )
        return self


def default_role(path: str, leaf: Any) -> Role | None:
    """The role assumed without ``roles=``: Flax's layouts, read from the leaf's name.

    * ``.../kernel`` of rank 2: ``matmul`` ``(in, out)``; rank > 2: ``conv`` with every axis but
      the last contracting (``(kh, kw, in, out)``);
    * ``.../embedding`` of rank 2: ``gather`` ``(vocab, features)``, rows as output channels;
    * anything else: ``None`` (not selected by default).

    Other layouts (attention ``DenseGeneral``, ``nn.scan`` stacks, Equinox ``(out, in)``) need
    ``roles=`` from :func:`jcompress.roles` or written by hand.

    >>> import jax.numpy as jnp
    >>> default_role("Dense_0/kernel", jnp.zeros((3, 4)))
    Role(kind='matmul', contracting=(0,), output=(1,), stacked=())
    """
    name = path.rsplit("/", 1)[-1]
    ndim = len(getattr(leaf, "shape", ()))
    if name == "kernel" and ndim >= 2:
        kind = "matmul" if ndim == 2 else "conv"
        return Role(kind, contracting=tuple(range(ndim - 1)), output=(ndim - 1,))
    if name == "embedding" and ndim == 2:
        return Role("gather", contracting=(1,), output=(0,))
    return None


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def _is_floating(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    return bool(jnp.issubdtype(dtype, jnp.floating))


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
      allow_empty: return an all-``False`` tree instead of raising when nothing is selected.

    Returns:
      A pytree of bools (compressed leaves are single leaves).

    Raises:
      ValueError: nothing selected; a selected leaf that is not floating; a selected leaf
        missing from ``roles``; a ``where`` pytree whose paths differ from ``tree``'s.

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    >>> select(params)
    {'Dense_0': {'bias': False, 'kernel': True}}
    >>> select(params, ".*bias")
    {'Dense_0': {'bias': True, 'kernel': False}}
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
            elif roles is not None:
                role = roles.get(p)
                chosen.append(role is not None and role.kind in kinds)
            else:
                role = default_role(p, x)
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
        given = match_paths(tree, where, name="where")
        chosen = []
        for p, g in zip(paths, given):
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
                near = difflib.get_close_matches(p, list(roles), n=3, cutoff=0.5)
                raise ValueError(
                    f"{p}: selected by {_describe_where(where)} but missing from roles="
                    + (f" (nearest: {near})" if near else "")
                    + "; pass roles for every selected leaf or narrow where="
                    + common_prefix_hint([p], list(roles))
                )

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
    return jax.tree_util.tree_unflatten(treedef, chosen)


def selected_paths(selection: Params) -> list[str]:
    """The paths whose entry in a :func:`select` result is ``True``.

    >>> selected_paths({"a": True, "b": False})
    ['a']
    """
    return [p for p, s in leaves_with_paths(selection) if s]


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
    out = {}
    for (p, x), s in zip(leaves_with_paths(tree), match_paths(tree, selection, name="selection")):
        if not s:
            continue
        shape = tuple(getattr(x, "shape", ()))
        if roles is not None:
            if p not in roles:
                near = difflib.get_close_matches(p, list(roles), n=3, cutoff=0.5)
                raise ValueError(
                    f"{p}: selected but missing from roles="
                    + (f" (nearest: {near})" if near else "")
                    + common_prefix_hint([p], list(roles))
                )
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


# ----------------------------------------------------------------------------------------------
# Channel groups (plain data; filled in by jcompress.structure)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Member:
    """One parameter axis in a channel group.

    Channel ``c`` of the group occupies the ``width`` indices ``offset + c * width + i``
    (``0 <= i < width``) along ``axis`` of the leaf at ``path`` and, when ``stride > 0``, every
    index ``offset + c * width + i + j * stride`` (``j >= 0``) inside the axis (a flatten after a
    conv with ``stride`` channels per spatial position). ``width > 1`` when the group's unit is
    coarser than the leaf's axis: a GroupNorm group of channels, a key/value head with the query
    heads that share it (GQA), a channel-first flatten (a channel's ``H * W`` rows).

    ``blocks > 1`` marks the input axis of a grouped convolution kernel (``feature_group_count =
    blocks``): the indices above are *virtual* (over ``blocks * axis_size`` input channels); index
    ``v`` is row ``v % axis_size`` of the kernel, and only inside block ``v // axis_size`` of the
    ``blocks`` equal slices of ``block_axis`` (the kernel's output axis).
    """

    path: str
    axis: int
    offset: int = 0
    stride: int = 0
    width: int = 1
    blocks: int = 1
    block_axis: int = -1

    def __post_init__(self):
        if self.width < 1 or self.blocks < 1:
            raise ValueError(
                f"{self.path}: Member width and blocks must be >= 1, got {self.width}, "
                f"{self.blocks}"
            )

    def indices(self, channel: int, axis_size: int) -> list[int]:
        """Indices along :attr:`axis` that channel ``channel`` occupies.

        With ``blocks > 1`` the indices are taken modulo ``axis_size`` (see :meth:`block`).

        >>> Member("k", 0, offset=0, stride=4).indices(1, 12)
        [1, 5, 9]
        >>> Member("k", 0, width=2).indices(1, 6)
        [2, 3]
        """
        start = self.offset + channel * self.width
        if self.blocks > 1:
            return [(start + i) % axis_size for i in range(self.width)]
        firsts = range(start, start + self.width)
        if self.stride <= 0:
            return list(firsts)
        return sorted(k for s in firsts for k in range(s, axis_size, self.stride))

    def block(self, channel: int, axis_size: int) -> int:
        """The block of :attr:`block_axis` that channel ``channel`` lives in (0 unless blocked).

        >>> Member("k", 2, width=1, blocks=2, block_axis=3).block(5, 4)
        1
        """
        if self.blocks <= 1:
            return 0
        return (self.offset + channel * self.width) // axis_size


@dataclasses.dataclass(frozen=True)
class Group:
    """Parameter axes that must lose the same channels together.

    Attributes:
      members: the coupled ``Member`` s (kernel output columns, bias, norm statistics, the next
        layer's contracting rows, ...).
      size: the number of channels (pruning units) in the group.
      blocked: ``None`` if the group can be pruned, else the reason it cannot (reduced over by a
        norm, a model output, an irregular reshape, ...).
      blocks: the group's channels fall in ``blocks`` equal contiguous runs that must each lose
        the same number of channels (the groups of a grouped convolution keep equal widths).
    """

    members: tuple[Member, ...]
    size: int
    blocked: str | None = None
    blocks: int = 1

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))
        if self.size < 0:
            raise ValueError(f"Group.size must be >= 0, got {self.size}")
        if self.blocks < 1 or (self.size and self.size % self.blocks):
            raise ValueError(
                f"Group.blocks must be >= 1 and divide size {self.size}, got {self.blocks}"
            )

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.path for m in self.members))


# ----------------------------------------------------------------------------------------------
# Value checks
# ----------------------------------------------------------------------------------------------


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

    Inside ``jit`` the caller records a flag in its state instead (DESIGN §2). A leaf that is not
    an array at all is a ``TypeError`` (:func:`check_array_leaf`).

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
