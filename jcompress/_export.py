"""``export``: a serialized ``jax.export`` artifact of ``jcompress.runtime.compressed(fn)``.

The artifact holds the compiled program (StableHLO, with the compressed matmul formulations
inlined), not the parameters: they are its first argument, loaded separately (for instance with
:func:`jcompress.checkpoint.load`), so one artifact serves every checkpoint of the same shapes.

    blob = export(lambda p, x: model.apply({"params": p}, x), qparams, x_example)
    exported = load_exported(blob)         # in another process: no model code needed
    logits = exported.call(qparams, x)

Compressed leaves (``QArray``, ``LowRank`` and kinds added with
:func:`jcompress.checkpoint.register_compressed`) are registered with ``jax.export``'s pytree
serialization under ``jcompress.<kind>``; their static fields are stored as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jcompress.checkpoint import _registry
from jcompress.checkpoint._schema import decode_static, encode_static
from jcompress.tree import is_compressed, leaves_with_paths

__all__ = ["export", "load_exported"]

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


def _register_all() -> None:
    for name in _registry.registered():
        _register(_registry.kind_named(name).cls, name)


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
        of the same structure; only shapes, dtypes and structure are used.
      *example_args: arrays or ``jax.ShapeDtypeStruct`` s fixing the other arguments' shapes
        (symbolic dimensions from ``jax.export.symbolic_shape`` where ``fn`` allows them).
      platforms: target platforms (``["cpu", "cuda", "tpu"]``); default: the current backend.
      mode: ``"weight_only"`` or ``"int8"``, as in ``jcompress.runtime.compressed``.

    Returns:
      The serialized ``jax.export.Exported`` (``bytes``); :func:`load_exported` reads it back.

    Raises:
      TypeError: a compressed leaf whose class is not registered (naming its path), or a tree
        node ``jax.export`` cannot serialize (convert ``nnx.State`` with ``to_pure_dict()``).
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
    for path, leaf in leaves_with_paths(tree):
        if is_compressed(leaf):
            kind = _registry.kind_of(leaf)
            if kind is None:
                raise TypeError(
                    f"{path}: export cannot serialize a {type(leaf).__name__} leaf; register its "
                    "class with jcompress.checkpoint.register_compressed"
                )
            _register(kind.cls, kind.name)
    run = compressed(fn, mode=mode)
    exported = jax.export.export(jax.jit(run), platforms=platforms)(tree, *example_args)
    try:
        return bytes(exported.serialize())
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"export: jax.export cannot serialize the parameter tree's structure ({e}); use "
            "dicts, lists and tuples (nnx: state.to_pure_dict())"
        ) from None


def _check_flatbuffers() -> None:
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        raise ImportError(
            "jcompress export needs the flatbuffers package (jax.export serialization): "
            "pip install flatbuffers"
        ) from None


def load_exported(serialized: bytes) -> jax.export.Exported:
    """Deserialize an :func:`export` artifact; call it with ``.call(tree, *args)``."""
    _check_flatbuffers()
    _register_all()
    return jax.export.deserialize(bytearray(serialized))
