"""Paths: every leaf is named by its key path joined with ``/``; trees correspond by path.

``params/Dense_0/kernel`` (the trailing ``.value`` of an ``nnx.Variable`` dropped). Trees that
should correspond (params, masks, roles, statistics) are matched by exact path, never by
position; a mismatch names the missing and unexpected paths, the nearest ones and a common
prefix if that is the cause. Compressed leaves are single leaves in every walk.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jcompress.tree._compressed import is_compressed

__all__ = [
    "Params",
    "common_prefix_hint",
    "leaves_with_paths",
    "map_with_paths",
    "match_by_path",
    "match_paths",
    "path_str",
]

Params = Any
"""Any pytree of arrays: a linen variables dict, an ``nnx.State``, an Equinox module, nested
dicts/lists/tuples. Compressed leaves count as single leaves."""


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


def match_by_path(
    reference: Params,
    other: Params | Mapping[str, Any],
    *,
    name: str = "tree",
    is_leaf: Callable[[Any], bool] | None = None,
) -> dict[str, Any]:
    """``{path: other's leaf}`` for every path of ``reference``, in its tree order.

    ``other`` may be a pytree (nnx ``Variable`` s unwrapped by the walk) or a flat
    ``{path: value}`` dict whose values may be pytrees themselves (statistics, groups). A
    difference in paths raises a ``ValueError`` naming the missing and unexpected paths, the
    nearest ones, and a common prefix if that is the cause.

    >>> match_by_path({"a": 1, "b": 2}, {"b": 20, "a": 10}, name="masks")
    {'a': 10, 'b': 20}
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
    return {p: lookup[p] for p in ref_paths}


def match_paths(
    reference: Params,
    other: Params | Mapping[str, Any],
    *,
    name: str = "tree",
    is_leaf: Callable[[Any], bool] | None = None,
) -> list[Any]:
    """``other``'s leaves in the order of ``reference``'s leaves, matched by exact path
    (:func:`match_by_path` as a list).

    >>> match_paths({"a": 1, "b": 2}, {"b": 20, "a": 10}, name="masks")
    [10, 20]
    """
    return list(match_by_path(reference, other, name=name, is_leaf=is_leaf).values())


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
