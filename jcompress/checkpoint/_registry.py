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
    arrays: Sequence[str] | None = None,
    static: Sequence[str] | None = None,
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
      arrays: attribute names of the array children (default: ``cls.array_fields``).
      static: attribute names of the static fields (default: ``cls.static_fields``).
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
    arrays = tuple(cls.array_fields if arrays is None else arrays)
    static = tuple(cls.static_fields if static is None else static)
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


# Kinds that jcompress itself defines, registered on first use (importing their modules
# eagerly would make the checkpoint import everything): name -> module. Their fields are the
# classes' own ``array_fields`` / ``static_fields``.
_BUILTIN = {
    "QArray": "jcompress.quantization",
    "AWQArray": "jcompress.quantization",
    "LowRank": "jcompress.structure",
}


def _load_builtins() -> None:
    for name, module in _BUILTIN.items():
        if name not in _BY_NAME:
            register_compressed(getattr(importlib.import_module(module), name), name=name)


def kind_of(leaf: Any) -> CompressedKind | None:
    _load_builtins()
    return _BY_TYPE.get(type(leaf))


def kind_named(name: str) -> CompressedKind | None:
    _load_builtins()
    return _BY_NAME.get(name)


def registered() -> list[str]:
    _load_builtins()
    return sorted(_BY_NAME)
