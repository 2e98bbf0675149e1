"""The compressed-leaf protocol: a registered pytree node that stands for one float array.

``QArray``, ``LowRank``, ``AWQArray`` and later encodings subclass :class:`Compressed`; every
jcompress tree walk treats such a node as one leaf, and the runtime dispatches through the methods
it offers (``dot_general``, ``conv``, ``take``) without importing the modules that define them.

A leaf class declares its fields once, with :func:`field`; the rest is derived (pytree
registration with keys, immutability, ``repr``, ``replace``, ``nbytes``, ``stored``, indexing of
stacked layers, and, with ``kind=``, the name under which checkpoints and exports store it, in
the table of :mod:`jcompress.tree._kinds`: a leaf module registers itself at class definition,
and the checkpoint code knows only this protocol.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jcompress.tree._kinds import register_compressed

__all__ = ["Compressed", "Field", "field", "fields", "is_compressed"]

_MISSING = object()

# bits one element occupies in memory (sub-byte dtypes packed; XLA packs them in buffers)
_PACKED_BITS = {"int2": 2, "uint2": 2, "int4": 4, "uint4": 4, "float4_e2m1fn": 4}


class Field:
    """One declared field of a compressed leaf (made by :func:`field`)."""

    __slots__ = ("default", "name", "repr", "static", "stored", "trainable")

    def __init__(
        self, *, static: bool, default: Any, stored: bool, repr: bool, trainable: bool | str
    ):
        self.static, self.default, self.stored, self.repr = static, default, stored, repr
        self.trainable = trainable
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        # Instances keep their values in ``__dict__``, which Python reads before this
        # (non-data) descriptor: it runs for the class (the declaration) and for unset fields.
        if obj is None:
            return self
        raise AttributeError(f"{type(obj).__name__}.{self.name} is not set")

    def __repr__(self) -> str:
        what = "static" if self.static else "child"
        return f"<{what} field {self.name!r}>"


def field(
    *,
    static: bool = False,
    default: Any = _MISSING,
    stored: bool = True,
    repr: bool = True,
    trainable: bool | str = False,
) -> Any:
    """Declare a field of a :class:`Compressed` leaf, as a class attribute.

    Args:
      static: ``False`` (default): an array child, a pytree leaf that ``jit``, ``vmap``,
        sharding and checkpoints see: an array, ``None``, or another compressed leaf (a
        *wrapper* leaf holds one). ``True``: static (aux) data, hashable (ints, dtypes, tuples,
        ``NamedTuple`` s), part of the tree structure.
      default: the value when the constructor is not given one.
      stored: for a static field, whether checkpoints store it. ``False`` marks a runtime-only
        field (a layout): the class's :meth:`Compressed.stored` must return a leaf where it has
        its default.
      repr: whether ``repr`` shows it (static fields are shown when not at their default,
        array children as ``dtype[shape]`` when not ``None``).
      trainable: for a float array child, whether :func:`jcompress.tree.partition` puts it in
        the trainable half: ``True`` (always: codebook tables, low-rank factors), ``"scales"``
        (only with ``partition(..., scales=True)``: quantization scales) or ``False`` (never:
        integer values, indices). The leaf's runtime fast paths must then give this child its
        derivative (or compute through ``dequantize``).

    >>> import jax.numpy as jnp
    >>> class Halved(Compressed, kind="doctest.Halved"):
    ...     half = field()
    ...     dequantize = lambda self: self.half.astype(jnp.float32) * 2
    ...     shape = property(lambda self: self.half.shape)
    ...     dtype = property(lambda self: jnp.dtype(jnp.float32))
    >>> h = Halved(jnp.ones(3, jnp.float16))
    >>> h.nbytes, h.dequantize()[0], h
    (6, Array(2., dtype=float32), Halved(shape=(3,), half=float16[3]))
    """
    if not all(isinstance(flag, bool) for flag in (static, stored, repr)):
        raise TypeError(
            f"field: static, stored and repr must be bools, got {static!r}, {stored!r}, {repr!r}"
        )
    if not stored and not static:
        raise ValueError("field(stored=False) is for static fields; array children are stored")
    if not (isinstance(trainable, bool) or trainable == "scales"):
        raise ValueError(f"field: trainable must be False, True or 'scales', got {trainable!r}")
    if trainable is not False and static:
        raise ValueError("field(trainable=...) is for array children; static fields are data")
    return Field(static=static, default=default, stored=stored, repr=repr, trainable=trainable)


def fields(leaf: Any) -> tuple[Field, ...]:
    """The declared fields of a compressed leaf or leaf class, in declaration order (empty for a
    class that builds its own pytree); each has ``name``, ``static``, ``default``, ``stored``.

    >>> from jcompress.quantization import QArray
    >>> [f.name for f in fields(QArray) if not f.static]
    ['values', 'scale', 'zero_point', 'act_scale']
    """
    cls = leaf if isinstance(leaf, type) else type(leaf)
    if not (isinstance(cls, type) and issubclass(cls, Compressed)):
        raise TypeError(f"fields() takes a compressed leaf or leaf class, got {cls.__name__}")
    return cls._fields


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


def _register_pytree(cls: type) -> None:
    """Register a declared class as a pytree node keyed by its children's names."""
    children = tuple(f.name for f in cls._fields if not f.static)
    statics = tuple(f.name for f in cls._fields if f.static)
    keys = tuple(jax.tree_util.GetAttrKey(n) for n in children)

    def flatten(x):
        d = x.__dict__
        return [d[n] for n in children], tuple(d[n] for n in statics)

    def flatten_with_keys(x):
        d = x.__dict__
        return [(k, d[n]) for k, n in zip(keys, children)], tuple(d[n] for n in statics)

    def unflatten(aux, values):
        # No constructor: jax rebuilds nodes with tracers, None, float0 or in_axes specs.
        obj = object.__new__(cls)
        d = obj.__dict__
        d.update(zip(children, values))
        d.update(zip(statics, aux))
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)


def _child_nbytes(x: Any) -> int:
    """Stored bytes of one child: a compressed leaf's ``nbytes``, an array's packed size."""
    if x is None:
        return 0
    if isinstance(x, Compressed):
        return int(x.nbytes)
    dtype = np.dtype(x.dtype)
    bits = _PACKED_BITS.get(dtype.name, 8 * dtype.itemsize)
    return -(-math.prod(x.shape) * bits // 8)


def _declared_nbytes(self: Compressed) -> int:
    """True stored size in bytes: the children's, sub-byte values counted by their bits."""
    return sum(_child_nbytes(self.__dict__[n]) for n in self.array_fields)


def _short(x: Any) -> str:
    """A child or static value for ``repr``: arrays as ``dtype[shape]``."""
    if isinstance(x, Compressed) or x is None:
        return repr(x)
    if isinstance(x, np.dtype):
        return x.name
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if isinstance(shape, tuple) and dtype is not None:
        return f"{np.dtype(dtype).name}[{','.join(str(d) for d in shape)}]"
    return repr(x)


def _index_child(leaf: Compressed, name: str, x: Any, index: tuple, shape: tuple) -> Any:
    """Child ``name`` of ``leaf`` indexed along the leaf's leading axes (see ``__getitem__``)."""
    if x is None:
        return None
    if isinstance(x, Compressed):
        return x[index]
    if len(x.shape) == 0:  # a scalar is shared by every slice
        return x
    pos = 0  # where the leaf's axis now is in ``x`` (ints remove axes)
    for axis, idx in enumerate(index):
        size = x.shape[pos]
        if size == 1 and size != shape[axis]:  # shared along this axis
            if not isinstance(idx, slice):
                x = x[(slice(None),) * pos + (0,)]
        elif size == shape[axis] or idx == slice(None):
            x = x[(slice(None),) * pos + (idx,)]
        else:
            raise ValueError(
                f"{type(leaf).__name__}: axis {axis} cannot be indexed: {name} holds {size} "
                f"blocks of {shape[axis] // size} along it (blocked scales, as PerGroup makes); "
                "index only stacked (per-layer) axes, or dequantize() first"
            )
        pos += isinstance(idx, slice)
    return x


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

    **Declared fields.** A subclass names its fields once, as class attributes made by
    :func:`field` (array children first by convention, then static fields), and passes
    ``kind="Name"`` to be stored by checkpoints and exports under that name::

        class LowRank(Compressed, kind="LowRank"):
            a = field()                        # array children
            b = field()
            dtype = field(static=True)         # static (aux) data

    From the declaration it gets: registration as a pytree node with keys (children named
    ``GetAttrKey(name)``, static fields as aux data), immutability (``AttributeError`` on
    assignment), a default constructor taking the fields positionally or by keyword (a subclass
    that checks its arguments writes its own ``__init__`` and ends with
    ``super().__init__(**fields)``), :meth:`replace`, ``repr``, ``nbytes`` (the children's
    packed sizes), :meth:`stored` (children in their stored form), ``leaf[i]`` over stacked
    layers (:meth:`__getitem__`), :meth:`from_stored`, and :attr:`array_fields` /
    :attr:`static_fields` (what checkpoints store). Unflattening never runs the constructor:
    JAX rebuilds nodes with tracers, ``None``, ``float0`` or ``in_axes`` specs as children.

    **Wrappers.** A child may itself be a compressed leaf: the wrapper stands for a transform
    of the inner leaf's array (``AWQArray``: a ``QArray`` of ``s·W`` with the input scale ``s``)
    and offers its own ``dot_general`` that transforms the activation and calls the inner
    leaf's. Checkpoints, exports, ``jc.report`` and ``dequantize`` handle the nesting; the
    runtime sees only the outer leaf.

    Classes that build their own pytree node (``jax.tree_util.register_dataclass``,
    ``register_pytree_node_class``) still subclass this base without declaring fields and
    are stored after ``jcompress.checkpoint.register_compressed``.
    """

    dot_general: Callable[..., jax.Array] | None = None
    conv: Callable[..., jax.Array] | None = None
    take: Callable[..., jax.Array] | None = None

    _fields: tuple[Field, ...] = ()
    array_fields: tuple[str, ...] = ()
    """Names of the array children (declared leaves; what checkpoints store)."""
    static_fields: tuple[str, ...] = ()
    """Names of the static fields checkpoints store (runtime-only ones left out)."""

    def __init_subclass__(cls, *, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields: dict[str, Field] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Field):
                    fields[name] = value
                elif name in fields:  # a subclass replaced the field with something else
                    del fields[name]
        if not fields:
            if kind is not None:
                raise TypeError(
                    f"{cls.__name__}: kind= needs fields declared with jcompress.tree.field(); a "
                    "class that builds its own pytree registers with "
                    "jcompress.checkpoint.register_compressed"
                )
            return
        cls._fields = tuple(fields.values())
        cls.array_fields = tuple(f.name for f in cls._fields if not f.static)
        cls.static_fields = tuple(f.name for f in cls._fields if f.static and f.stored)
        if not cls.array_fields:
            raise TypeError(f"{cls.__name__}: a compressed leaf needs at least one array child")
        if getattr(cls, "nbytes", None) is Compressed.__dict__["nbytes"]:
            cls.nbytes = property(_declared_nbytes, doc=_declared_nbytes.__doc__)
        _register_pytree(cls)
        if kind is not None:
            register_compressed(cls, name=kind)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Set the declared fields (positionally in declaration order, or by keyword)."""
        fields = self._fields
        name = type(self).__name__
        if not fields:
            if args or kwargs:
                raise TypeError(f"{name} declares no fields (jcompress.tree.field())")
            return
        if len(args) > len(fields):
            raise TypeError(f"{name} takes {len(fields)} fields, got {len(args)} positional")
        given = {f.name: a for f, a in zip(fields, args)}
        twice = sorted(given.keys() & kwargs.keys())
        unknown = sorted(kwargs.keys() - {f.name for f in fields})
        if twice or unknown:
            raise TypeError(
                f"{name}: {'repeated' if twice else 'unknown'} field(s) {twice or unknown}; its "
                f"fields are {[f.name for f in fields]}"
            )
        given.update(kwargs)
        for f in fields:
            if f.name not in given:
                if f.default is _MISSING:
                    raise TypeError(f"{name}: missing field {f.name!r}")
                given[f.name] = f.default
        self.__dict__.update(given)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._fields:
            raise AttributeError(
                f"{type(self).__name__} is immutable; build a new one (.replace({name}=...))"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._fields:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__delattr__(self, name)

    def replace(self, **changes: Any) -> Compressed:
        """The same kind of leaf with some declared fields changed.

        Built as unflattening builds (without the constructor's checks), for views of the same
        numbers (slices, layouts, stored forms) and rebuilding inside transformations; to have
        new values checked, call the constructor.
        """
        names = {f.name for f in self._fields}
        unknown = sorted(changes.keys() - names)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.replace: unknown field(s) {unknown}; its fields are "
                f"{[f.name for f in self._fields]}"
            )
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.__dict__.update(changes)
        return out

    @classmethod
    def from_stored(cls, **fields: Any) -> Compressed:
        """Rebuild a leaf from the fields a checkpoint stored (keyword arguments named after
        :attr:`array_fields` and :attr:`static_fields`), through the constructor so they are
        checked. Override to also read the layout an older version of the class stored."""
        return cls(**fields)

    def __repr__(self) -> str:
        if not self._fields:
            return object.__repr__(self)
        parts = []
        try:
            parts.append(f"shape={tuple(self.shape)}")
        except (AttributeError, TypeError):  # unflattened with placeholders (None, specs)
            pass
        d = self.__dict__
        shown = [f for f in self._fields if f.repr]
        for f in shown:
            if f.static and (f.default is _MISSING or d.get(f.name) != f.default):
                parts.append(f"{f.name}={_short(d.get(f.name))}")
        for f in shown:
            if not f.static and d.get(f.name) is not None:
                parts.append(f"{f.name}={_short(d.get(f.name))}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @abc.abstractmethod
    def dequantize(self) -> jax.Array:
        """The float array this leaf stands for."""

    def stored(self) -> Compressed:
        """The form checkpoints store: ``self``, unless the leaf is in a runtime-only layout (a
        widened ``QArray`` returns its packed form) or holds compressed children that are, so
        saved files always load. Declared leaves store each compressed child's stored form."""
        changes = {}
        for name in self.array_fields:
            child = self.__dict__[name]
            if isinstance(child, Compressed):
                stored = child.stored()
                if stored is not child:
                    changes[name] = stored
        return self.replace(**changes) if changes else self

    def trainable_fields(self, *, scales: bool = False) -> tuple[str, ...]:
        """The array children :func:`jcompress.tree.partition` puts in the trainable half:
        those declared ``field(trainable=True)``, and ``trainable="scales"`` ones when
        ``scales``. A leaf whose trainable children depend on its data overrides this (a
        ``LookupArray`` trains its table only as a codebook, never the fixed NF4 levels).
        """
        return tuple(
            f.name
            for f in self._fields
            if not f.static and (f.trainable is True or (f.trainable == "scales" and scales))
        )

    @property
    def leading_axes(self) -> int:
        """How many leading axes of ``shape`` ``leaf[i]`` may index: axes that every array
        child carries first, each at the leaf's size (one entry per index) or 1 (shared).
        Default: every axis; ``LowRank`` says its stacked axes."""
        return len(self.shape)

    def __getitem__(self, index: int | slice | tuple[int | slice, ...]) -> Compressed:
        """Index leading (stacked) axes: ``leaf[i]`` is layer ``i`` of a stacked leaf.

        Ints and slices only, on the first :attr:`leading_axes` axes; every array child is
        indexed alike (a child of size 1 along an axis, or a scalar, is shared and kept; a
        compressed child is indexed itself), static fields are kept. An axis along which a child
        is blocked (``PerGroup`` scales) cannot be indexed: ``dequantize()`` first.
        """
        name = type(self).__name__
        if not self._fields:
            raise TypeError(f"{name} declares no fields; it cannot be indexed")
        index = index if isinstance(index, tuple) else (index,)
        lead = self.leading_axes
        if len(index) > lead:
            raise IndexError(
                f"{name} indexing takes ints and slices on its {lead} leading (stacked) axes "
                f"(shape {tuple(self.shape)}), got {len(index)} indices; dequantize() first to "
                "index the other axes"
            )
        for idx in index:
            if isinstance(idx, bool) or not isinstance(idx, int | np.integer | slice):
                raise TypeError(
                    f"{name} indexing takes ints and slices on leading axes, got {idx!r}"
                )
        shape = tuple(self.shape)
        d = self.__dict__
        return self.replace(
            **{n: _index_child(self, n, d[n], index, shape) for n in self.array_fields}
        )

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
