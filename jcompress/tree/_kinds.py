"""The kinds of compressed leaves: the stable names under which checkpoints, exports and
reports store a leaf class, with its array children and static fields.

A class that declares its fields registers itself here at class definition
(``class QArray(Compressed, kind="QArray")``); :func:`register_compressed` adds a class that
builds its own pytree node. The checkpoint code reads this table and imports no leaf module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Kind", "kind_named", "kind_names", "kind_of", "register_compressed"]


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one compressed-leaf class is stored: its name, array children and static fields.

    A leaf ``x`` is stored as ``getattr(x, a)`` for ``a`` in ``arrays`` (an array, ``None`` or
    a compressed leaf, stored the same way) and ``getattr(x, s)`` for ``s`` in ``static``, and
    rebuilt as ``build(**arrays, **static)``.
    """

    name: str
    cls: type
    arrays: tuple[str, ...]
    static: tuple[str, ...]
    build: Callable[..., Any]


_BY_NAME: dict[str, Kind] = {}
_BY_TYPE: dict[type, Kind] = {}


def register_compressed(
    cls: type,
    *,
    name: str,
    arrays: Sequence[str] | None = None,
    static: Sequence[str] | None = None,
    build: Callable[..., Any] | None = None,
) -> None:
    """Let checkpoints (and reports, exports) hold leaves of the compressed-leaf class ``cls``.

    Needed only for a class that builds its own pytree node; a class that declares its fields
    with :func:`jcompress.tree.field` registers itself with ``kind="Name"`` in its class
    statement. A leaf ``x`` is saved as its array attributes ``getattr(x, a)`` for ``a`` in
    ``arrays`` (each an array, ``None`` or a compressed leaf) and its static attributes
    (JSON-able values, dtypes, tuples), and loaded as ``build(**arrays, **static)`` (default:
    ``cls.from_stored``, which calls ``cls(**arrays, **static)``). The ``name`` is written into
    the checkpoint, so loading needs the same name registered; no code is named in the file.

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
    >>> register_compressed(Halved, name="doctest.register.Halved", arrays=("half",))
    """
    from jcompress.tree._compressed import Compressed  # the protocol imports this module

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
    if known is not None and known.cls is not cls and not _same_definition(known.cls, cls):
        raise ValueError(
            f"compressed-leaf kind {name!r} is already registered for "
            f"{known.cls.__module__}.{known.cls.__qualname__}; choose another name"
        )
    if known is not None:
        _BY_TYPE.pop(known.cls, None)
    kind = Kind(name, cls, arrays, static, build or cls.from_stored)
    _BY_NAME[name] = kind
    _BY_TYPE[cls] = kind


def _same_definition(a: type, b: type) -> bool:
    """The same class statement run again (a reloaded module): it takes the name over."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def kind_of(leaf: Any) -> Kind | None:
    """The kind of a compressed leaf (by its exact class), or ``None`` when not registered."""
    return _BY_TYPE.get(type(leaf))


def kind_named(name: str) -> Kind | None:
    """The kind registered under ``name``, or ``None``."""
    return _BY_NAME.get(name)


def kind_names() -> list[str]:
    """Every registered kind's name, sorted."""
    return sorted(_BY_NAME)


# Static values of a named type (a ``NamedTuple`` such as ``OutMajor``, a runtime layout)
_STATIC: dict[str, type] = {}


def register_static(cls: type) -> type:
    """Let checkpoints and exports store static values of the ``NamedTuple`` class ``cls`` under
    its class name and rebuild them as ``cls`` (not as plain tuples); a class decorator.

    >>> from typing import NamedTuple
    >>> @register_static
    ... class DoctestLayout(NamedTuple):
    ...     axis: int
    >>> static_type("DoctestLayout") is DoctestLayout
    True
    """
    if not (issubclass(cls, tuple) and hasattr(cls, "_fields")):
        raise TypeError(f"register_static takes a NamedTuple class, got {cls!r}")
    known = _STATIC.get(cls.__name__)
    # the same class again (a reloaded module) replaces itself; another class is a clash
    if known is not None and (known.__module__, known.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise ValueError(f"a static type named {cls.__name__!r} is already registered: {known}")
    _STATIC[cls.__name__] = cls
    return cls


def static_type(name: str) -> type | None:
    """The static ``NamedTuple`` class registered under ``name``, or ``None``."""
    return _STATIC.get(name)
