"""``export``: a serialized ``jax.export`` artifact of ``jcompress.runtime.compressed(fn)``.

The artifact holds the compiled program (StableHLO, with the compressed matmul formulations
inlined), not the parameters: they are its first argument, loaded separately (for instance with
:func:`jcompress.checkpoint.load`), so one artifact serves every checkpoint of the same shapes.

    blob = export(lambda p, x: model.apply({"params": p}, x), qparams, x_example)
    exported = load_exported(blob)         # in another process: no model code needed
    logits = exported.call(qparams, x)

Any parameter tree works (linen dicts, ``nnx.State`` and its pure dicts with integer keys,
Equinox modules, partitioned ones with ``None`` leaves): the program takes the tree's array
leaves as one flat ``{path: leaf}`` dict (the paths of :func:`jcompress.tree.leaves_with_paths`,
string keys that ``jax.export`` can serialize), and the tree's structure and non-array leaves
(Equinox activation functions, Python scalars) are fixed at export time, as ``eqx.filter_jit``
treats them. :meth:`Exported.call` flattens the tree it is given the same way, so callers pass
the tree they have. Compressed leaves (``QArray``, ``LowRank``, every declared kind and kinds
added with :func:`jcompress.checkpoint.register_compressed`, the leaves a wrapper holds
included) are registered with ``jax.export``'s pytree serialization under ``jcompress.<kind>``;
their static fields are stored as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jcompress.checkpoint import _registry
from jcompress.checkpoint._schema import decode_static, encode_static
from jcompress.tree import common_prefix_hint, is_compressed, leaves_with_paths

__all__ = ["Exported", "export", "load_exported"]

_SERIALIZABLE: set[type] = set()


def _register(cls: type, name: str) -> None:
    if cls in _SERIALIZABLE:
        return

    def serialize(aux: Any) -> bytes:
        return json.dumps(encode_static(name, "aux", aux)).encode()

    def deserialize(data: bytes) -> Any:
        return decode_static(json.loads(bytes(data).decode()))

    jax.export.register_pytree_node_serialization(
        cls,
        serialized_name=f"jcompress.{name}",
        serialize_auxdata=serialize,
        deserialize_auxdata=deserialize,
    )
    _SERIALIZABLE.add(cls)


def _register_leaf(path: str, leaf: Any) -> None:
    """Register ``leaf``'s class for serialization, and those of the leaves it wraps."""
    kind = _registry.kind_of(leaf)
    if kind is None:
        raise TypeError(
            f"{path}: export cannot serialize a {type(leaf).__name__} leaf; declare its fields "
            "with jcompress.tree.field() and kind=, or register its class with "
            "jcompress.checkpoint.register_compressed"
        )
    _register(kind.cls, kind.name)
    for a in kind.arrays:
        child = getattr(leaf, a)
        if is_compressed(child):
            _register_leaf(f"{path}/{a}", child)


def _register_all() -> None:
    for name in _registry.registered():
        _register(_registry.kind_named(name).cls, name)


def _is_array(leaf: Any) -> bool:
    return is_compressed(leaf) or (hasattr(leaf, "shape") and hasattr(leaf, "dtype"))


def _flat(tree: Any) -> dict[str, Any]:
    """The array leaves of ``tree`` by path (compressed leaves whole)."""
    return {path: leaf for path, leaf in leaves_with_paths(tree) if _is_array(leaf)}


def export(
    fn: Callable[..., Any],
    tree: Any,
    *example_args: Any,
    platforms: Sequence[str] | None = None,
    mode: str = "weight_only",
) -> bytes:
    """Serialize ``jcompress.runtime.compressed(fn, mode=mode)`` for these argument shapes.

    Args:
      fn: ``fn(tree, *args)``, e.g. ``lambda p, x: model.apply({"params": p}, x)``. Bind
        non-array arguments (flags, module objects) with ``functools.partial`` first.
      tree: the parameters (compressed leaves included), or a tree of ``jax.ShapeDtypeStruct`` s
        of the same structure; only shapes, dtypes and structure are used. Any pytree: its
        array leaves become the program's first argument (a flat ``{path: leaf}`` dict), its
        structure and non-array leaves are fixed in the program.
      *example_args: arrays or ``jax.ShapeDtypeStruct`` s fixing the other arguments' shapes
        (symbolic dimensions from ``jax.export.symbolic_shape`` where ``fn`` allows them).
      platforms: target platforms (``["cpu", "cuda", "tpu"]``); default: the current backend.
      mode: ``"weight_only"`` or ``"int8"``, as in ``jcompress.runtime.compressed``.

    Returns:
      The serialized ``jax.export.Exported`` (``bytes``); :func:`load_exported` reads it back.

    Raises:
      TypeError: a compressed leaf whose class is not registered (naming its path).
      ImportError: ``flatbuffers`` is not installed.

    Serializing needs the ``flatbuffers`` package (``pip install flatbuffers``).

    >>> import jax.numpy as jnp
    >>> f = lambda p, x: x @ p["w"]
    >>> blob = export(f, {"w": jnp.eye(2)}, jnp.ones((1, 2)))
    >>> load_exported(blob).call({"w": jnp.eye(2)}, jnp.full((1, 2), 3.0))
    Array([[3., 3.]], dtype=float32)
    """
    from jcompress.runtime import compressed

    _check_flatbuffers()
    pairs = leaves_with_paths(tree)
    for path, leaf in pairs:
        if is_compressed(leaf):
            _register_leaf(path, leaf)
    treedef = jax.tree.structure(tree, is_leaf=is_compressed)
    fixed = [(path, None if _is_array(leaf) else leaf) for path, leaf in pairs]

    def by_path(flat: dict[str, Any], *args: Any) -> Any:
        leaves = [flat[path] if static is None else static for path, static in fixed]
        return fn(jax.tree.unflatten(treedef, leaves), *args)

    run = compressed(by_path, mode=mode)
    exported = jax.export.export(jax.jit(run), platforms=platforms)(_flat(tree), *example_args)
    return bytes(exported.serialize())


def _check_flatbuffers() -> None:
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        raise ImportError(
            "jcompress export needs the flatbuffers package (jax.export serialization): "
            "pip install flatbuffers"
        ) from None


class Exported:
    """A loaded :func:`export` artifact: ``call(tree, *args)`` with the tree you have.

    ``tree`` may be the parameter tree itself (any container; its array leaves are taken by
    path) or the flat ``{path: leaf}`` dict the program takes. Every other attribute
    (``in_avals``, ``out_avals``, ``platforms``, ...) is the underlying
    ``jax.export.Exported``'s, available as :attr:`exported`.
    """

    def __init__(self, exported: jax.export.Exported):
        self.exported = exported
        (flat, *_), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
        self.paths = tuple(flat) if isinstance(flat, dict) else None

    def call(self, tree: Any, *args: Any) -> Any:
        if self.paths is None:  # an artifact that takes the tree as it is
            return self.exported.call(tree, *args)
        flat = _flat(tree)
        missing = [p for p in self.paths if p not in flat]
        if missing:
            raise ValueError(
                f"Exported.call: the tree lacks the exported parameter(s) {missing[:5]}; pass "
                "the tree (or the {path: leaf} dict) the artifact was exported for"
                + common_prefix_hint(missing, list(flat))
            )
        return self.exported.call({p: flat[p] for p in self.paths}, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exported, name)


def load_exported(serialized: bytes) -> Exported:
    """Deserialize an :func:`export` artifact; call it with ``.call(tree, *args)``."""
    _check_flatbuffers()
    _register_all()
    return Exported(jax.export.deserialize(bytearray(serialized)))
