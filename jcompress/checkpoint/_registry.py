"""The registry of compressed-leaf kinds a checkpoint can hold, by name."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from jcompress.tree import Compressed


@dataclasses.dataclass(frozen=True)
class CompressedKind:
    """How one compressed-leaf class is stored: its array children and its static fields."""

    name: str
    cls: type
    arrays: tuple[str, ...]
    static: tuple[str, ...]
    build: Callable[..., Any]


_BY_NAME: dict[str, CompressedKind] = {}
_BY_TYPE: dict[type, CompressedKind] = {}


def register_compressed(
    cls: type,
    *,
    name: str,
    arrays: Sequence[str],
    static: Sequence[str] = (),
    build: Callable[..., Any] | None = None,
) -> None:
    """Let checkpoints (and reports) hold leaves of the compressed-leaf class ``cls``.

    A leaf ``x`` is saved as its array attributes ``getattr(x, a)`` for ``a`` in ``arrays``
    (each an array or ``None``) and its static attributes (JSON-able values, dtypes, tuples), and
    loaded as ``build(**arrays, **static)`` (default: ``cls(**arrays, **static)``). The ``name``
    is written into the checkpoint, so loading needs the same name registered; no code is named
    in the file.

    Args:
      cls: a subclass of :class:`jcompress.tree.Compressed`.
      name: a stable name for the kind (``"QArray"``).
      arrays: attribute names of the array children.
      static: attribute names of the static fields.
      build: rebuilds a leaf from keyword arguments named after ``arrays`` and ``static``.

    Raises:
      TypeError: ``cls`` is not a ``Compressed`` subclass.
      ValueError: ``name`` is already registered for another class, or fields repeat.

    >>> import dataclasses, jax, jax.numpy as jnp
    >>> from jcompress.tree import Compressed
    >>> @jax.tree_util.register_dataclass
    ... @dataclasses.dataclass(frozen=True)
    ... class Halved(Compressed):
    ...     half: jax.Array
    ...     def dequantize(self): return self.half * 2
    ...     shape = property(lambda self: self.half.shape)
    ...     dtype = property(lambda self: self.half.dtype)
    ...     nbytes = property(lambda self: self.half.nbytes)
    >>> register_compressed(Halved, name="doctest.Halved", arrays=("half",))
    """
    if not (isinstance(cls, type) and issubclass(cls, Compressed)):
        raise TypeError(f"register_compressed needs a Compressed subclass, got {cls!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_compressed: name must be a non-empty string, got {name!r}")
    arrays, static = tuple(arrays), tuple(static)
    fields = arrays + static
    if len(set(fields)) != len(fields) or not arrays:
        raise ValueError(
            f"register_compressed({name!r}): arrays={arrays} and static={static} must be "
            "distinct names, with at least one array"
        )
    known = _BY_NAME.get(name)
    if known is not None and known.cls is not cls:
        raise ValueError(
            f"register_compressed: the name {name!r} is already registered for "
            f"{known.cls.__qualname__}; choose another name"
        )
    kind = CompressedKind(name, cls, arrays, static, build or cls)
    _BY_NAME[name] = kind
    _BY_TYPE[cls] = kind


# Kinds that jcompress itself defines, registered on first use (their modules may not exist in a
# partial install, and importing them eagerly would make the checkpoint import everything):
# name -> (module, array children, static fields).
_BUILTIN = {
    "QArray": (
        "jcompress.quantization",
        ("values", "scale", "zero_point", "act_scale"),
        ("bits", "dtype"),
    ),
    "AWQArray": (
        "jcompress.quantization",
        ("values", "scale", "zero_point", "act_scale"),
        ("bits", "dtype"),
    ),
    "LowRank": (
        "jcompress.structure",
        ("a", "b"),
        ("dtype", "layer_shape", "contracting", "output"),
    ),
}


def _load_builtins() -> None:
    for name, (module, arrays, static) in _BUILTIN.items():
        if name in _BY_NAME:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and all(hasattr(cls, f) for f in arrays + static):
            register_compressed(cls, name=name, arrays=arrays, static=static)


def kind_of(leaf: Any) -> CompressedKind | None:
    _load_builtins()
    return _BY_TYPE.get(type(leaf))


def kind_named(name: str) -> CompressedKind | None:
    _load_builtins()
    return _BY_NAME.get(name)


def registered() -> list[str]:
    _load_builtins()
    return sorted(_BY_NAME)
