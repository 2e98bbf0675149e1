"""Tracing a function of pytrees for the jaxpr walker: which leaves are dynamic, and their names.

Array leaves (and compressed leaves, traced as ``ShapeDtypeStruct`` s of their float shape) are
dynamic; anything else is static (closed over). Leaves are named as ``jcompress.tree`` names
them: the first argument's leaves by their plain path, the others as ``args[i]/path`` and
``kwargs[name]/path``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jcompress.runtime._views import View, identity_view
from jcompress.tree import Params, is_compressed, leaves_with_paths

__all__ = [
    "Traced",
    "is_array_like",
    "leaf_names",
    "run_abstract",
    "signature",
    "stand_in",
    "trace",
    "trace_params",
]


def is_array_like(x: Any) -> bool:
    """Whether ``x`` is traced by the runtime (arrays, tracers, stand-ins, compressed leaves)."""
    return (
        isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)
        or is_compressed(x)
        or isinstance(x, jax.core.Tracer)
    )


def signature(tree: Any) -> tuple[Any, tuple[Any, ...]]:
    """``(treedef, per-leaf keys)``: what a cache of traces keys on, as ``jax.jit`` does: the
    structure, each array's shape, dtype and weak type, each compressed leaf's structure and
    children's shapes, and every other leaf as itself (hashable when those static values are).
    """
    flat, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_compressed)
    keys = []
    for x in flat:
        if is_compressed(x):
            keys.append(
                (jax.tree.structure(x), tuple((a.shape, a.dtype) for a in jax.tree.leaves(x)))
            )
        elif is_array_like(x):
            keys.append((tuple(x.shape), np.dtype(x.dtype), getattr(x, "weak_type", False)))
        else:
            keys.append(("static", x))
    return treedef, tuple(keys)


def stand_in(x: Any) -> Any:
    """The abstract value a leaf is traced as (compressed leaves: their float shape/dtype)."""
    if is_compressed(x):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return x


@dataclasses.dataclass(frozen=True)
class Traced:
    """A function traced for the walker.

    Attributes:
      jaxpr: the closed jaxpr of ``fn`` over the flat dynamic leaves.
      paths: the path of every flat dynamic leaf (``None`` for those that are not parameters).
      leaves: the flat dynamic leaves (compressed leaves as themselves).
      out_tree: the output tree definition.
    """

    jaxpr: Any
    paths: tuple[str | None, ...]
    leaves: tuple[Any, ...]
    out_tree: Any

    def facts(self) -> list[View | None]:
        """The walker's input facts: each parameter leaf a view of itself."""
        return [
            None if p is None else identity_view(p, len(x.shape))
            for p, x in zip(self.paths, self.leaves)
        ]


def _argument_leaves(
    args: Sequence[Any], kwargs: dict[str, Any]
) -> Iterator[tuple[int | None, str, Any]]:
    """``(argument index, name, leaf)`` in ``tree_flatten((args, kwargs))`` order.

    The index is ``None`` for keyword arguments.
    """
    for i, a in enumerate(args):
        for p, x in leaves_with_paths(a):
            yield i, (p if i == 0 else f"args[{i}]/{p}" if p else f"args[{i}]"), x
    for k in sorted(kwargs):
        for p, x in leaves_with_paths(kwargs[k]):
            yield None, (f"kwargs[{k}]/{p}" if p else f"kwargs[{k}]"), x


def leaf_names(args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
    """Names of the leaves of ``tree_flatten((args, kwargs), is_leaf=is_compressed)``.

    The first argument's leaves by their plain path, the others as ``args[i]/path`` and
    ``kwargs[name]/path``: how the runtime names compressed leaves.

    >>> import jax.numpy as jnp
    >>> leaf_names(({"w": jnp.ones(2)}, [jnp.ones(1)]), {"b": jnp.ones(1)})
    ['w', 'args[1]/0', 'kwargs[b]']
    """
    return [name for _, name, _ in _argument_leaves(args, kwargs)]


def trace(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    param_args: Sequence[int] = (0,),
    name_all: bool = False,
) -> Traced:
    """Trace ``fn(*args, **kwargs)`` to a closed jaxpr over its array leaves.

    Array leaves (and compressed leaves, traced as ``ShapeDtypeStruct`` s of their float shape)
    are dynamic; anything else is static (closed over). Leaves of the arguments in
    ``param_args`` are parameters, named by their path (the first argument's leaves by their plain
    path); with ``name_all`` every compressed leaf of any argument is named
    (``args[i]/...`` / ``kwargs[name]/...``).
    """
    kwargs = dict(kwargs or {})
    named = [
        (name if i in param_args or (name_all and is_compressed(x)) else None, x)
        for i, name, x in _argument_leaves(args, kwargs)
        if is_array_like(x)
    ]
    flat_args, treedef = jax.tree_util.tree_flatten((tuple(args), kwargs), is_leaf=is_compressed)
    dynamic = [i for i, x in enumerate(flat_args) if is_array_like(x)]
    out_tree_box: list[Any] = []

    def flat_fn(*dyn):
        full = list(flat_args)
        for i, d in zip(dynamic, dyn):
            full[i] = d
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        out = fn(*a, **kw)
        leaves, out_tree = jax.tree_util.tree_flatten(out)
        out_tree_box.append(out_tree)
        return leaves

    dyn_leaves = [flat_args[i] for i in dynamic]
    jaxpr = jax.make_jaxpr(flat_fn)(*[stand_in(x) for x in dyn_leaves])
    assert len(named) == len(dyn_leaves)
    return Traced(
        jaxpr=jaxpr,
        paths=tuple(p for p, _ in named),
        leaves=tuple(dyn_leaves),
        out_tree=out_tree_box[-1],
    )


def trace_params(fn: Callable[..., Any], params: Params, args: tuple) -> Traced:
    """Trace ``fn(params, *args)``, turning a path mismatch into an error that names it."""
    try:
        return trace(fn, (params, *args))
    except Exception as e:
        if isinstance(e, KeyError) or "NotFound" in type(e).__name__:
            paths = [p for p, _ in leaves_with_paths(params)]
            raise ValueError(
                f"fn(params, *args) failed looking up {e} in params: the parameter tree does not "
                f"have the paths fn consumes. Its paths are {paths[:8]}"
                f"{' ...' if len(paths) > 8 else ''}. For linen, pass "
                "`lambda p, x: model.apply({'params': p}, x)` with `variables['params']`"
            ) from e
        raise


def run_abstract(traced: Traced, walk: Callable[..., Any]) -> None:
    """Call ``walk(*leaves)`` on abstract leaves: an analysis pass that computes nothing."""
    jax.make_jaxpr(walk)(*[stand_in(x) for x in traced.leaves])
