"""``QArray``: integer values with scales, a registered pytree node and a compressed leaf."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcompress import tree as jtree

__all__ = [
    "OutMajor",
    "QArray",
    "block_shapes",
    "broadcast_apply",
    "dequantize_blocks",
    "storage_dtype",
    "widen",
]


class OutMajor(NamedTuple):
    """A runtime layout of a matmul weight: its trailing ``contracting + output`` axes, which are
    ``(*contracting axes, *output axes)`` in the float array (Flax ``Dense`` ``(in, out)``,
    ``DenseGeneral``), are stored output axes first: ``(..., *output axes, *contracting axes)``.

    Every child (values, scale, zero point, activation step) is stored in that axis order; leading
    (stacked) axes stay where they are, so ``vmap``/``scan`` over them and slicing them work.
    Made by ``jcompress.quantization.runtime_layout``; :meth:`QArray.stored` returns
    the float array's axis order.

    >>> OutMajor(contracting=1, output=1).stored_order(3)  # (layers, in, out) -> (layers, out, in)
    (0, 2, 1)
    """

    contracting: int
    output: int

    def stored_order(self, ndim: int) -> tuple[int, ...]:
        """Stored axis ``i`` holds float-array axis ``stored_order(ndim)[i]``."""
        lead = ndim - self.contracting - self.output
        if lead < 0 or self.contracting < 1 or self.output < 1:
            raise ValueError(f"{self} does not fit an array of rank {ndim}")
        return (*range(lead), *range(ndim - self.output, ndim), *range(lead, ndim - self.output))

    def canonical_order(self, ndim: int) -> tuple[int, ...]:
        """Float-array axis ``i`` is stored axis ``canonical_order(ndim)[i]``."""
        return tuple(int(i) for i in np.argsort(self.stored_order(ndim)))


def storage_dtype(bits: int) -> np.dtype:
    """The signed container of ``bits``-bit values: ``int2`` (2), ``int4`` (3-4), ``int8`` (5-8).

    >>> storage_dtype(3)
    dtype(int4)
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return np.dtype(jnp.int2 if bits == 2 else jnp.int4 if bits <= 4 else jnp.int8)


def _container_bits(dtype: Any) -> int:
    dtype = np.dtype(dtype)
    return {np.dtype(jnp.int2): 2, np.dtype(jnp.int4): 4}.get(dtype, 8 * dtype.itemsize)


def _stored_bytes(x: Any) -> int:
    if x is None:
        return 0
    size = math.prod(x.shape)
    return -(-size * _container_bits(x.dtype) // 8)


def block_shapes(
    shape: Sequence[int], scale_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes that broadcast a blocked ``scale`` against values of ``shape``.

    Along each axis a scale of size 1 is shared, a scale of the values' size is per element, and a
    scale of size ``n`` in between covers blocks of ``shape[a] // n`` consecutive elements: the
    values' axis is split into ``(n, shape[a] // n)`` and the scale's into ``(n, 1)``.

    >>> block_shapes((8, 3), (2, 3))
    ((2, 4, 3), (2, 1, 3))
    """
    vshape, sshape = [], []
    for v, s in zip(shape, scale_shape):
        if s in (1, v):
            vshape.append(v)
            sshape.append(s)
        else:
            vshape += [s, v // s]
            sshape += [s, 1]
    return tuple(vshape), tuple(sshape)


def broadcast_apply(fn, x: jax.Array, *per_block: jax.Array | None) -> jax.Array:
    """``fn(x, *per_block)`` with each per-block array broadcast over its blocks of ``x``."""
    scale_shape = next(p.shape for p in per_block if p is not None)
    xs, ss = block_shapes(x.shape, scale_shape)
    out = fn(x.reshape(xs), *(None if p is None else p.reshape(ss) for p in per_block))
    return out.reshape(x.shape)


def dequantize_blocks(values, scale, zero_point, dtype) -> jax.Array:
    """``(values - zero_point) * scale`` in ``float32`` with blocked scales, cast to ``dtype``."""

    def fn(q, s, zp):
        q = q.astype(jnp.float32)
        if zp is not None:
            q = q - zp.astype(jnp.float32)
        return q * s

    return broadcast_apply(fn, values, scale, zero_point).astype(dtype)


@jax.tree_util.register_pytree_with_keys_class
class QArray(jtree.Compressed):
    """A quantized array: ``dequantize() == (values - zero_point) * scale`` (blockwise).

    Children (pytree leaves; ``jit``, ``vmap``, ``scan``, sharding and orbax see them):

    * ``values``: the integers, the full shape of the float array, signed ``int2`` (``bits == 2``),
      ``int4`` (3-4) or ``int8`` (5-8); sub-byte values sit in ``int8`` containers only in the
      runtime layout made by :func:`widen` (not accepted by this constructor; checkpoints save
      the packed form, :meth:`stored`).
    * ``scale``: ``float32``, the same rank as ``values``. Along each axis its size is 1 (shared),
      the values' size (per channel / stacked layer), or a divisor ``n`` (``PerGroup``: blocks of
      ``values.shape[a] // n`` consecutive elements).
    * ``zero_point``: ``None`` (symmetric) or integers of ``values``' dtype and ``scale``'s shape,
      so that ``0.0`` is stored as ``zero_point`` and dequantizes to exactly ``0``.
    * ``act_scale``: ``None``, or static per-input-channel activation scales (AWQ input scales,
      static activation quantization) for the runtime; ignored by :meth:`dequantize`.

    Static (aux) data: ``bits``, the original float ``dtype`` and ``layout``: ``None`` (the
    children in the float array's axis order, which the constructor takes and checkpoints store:
    :meth:`stored`) or a runtime layout made by ``runtime_layout`` (:class:`OutMajor`: the
    children's axes permuted; ``shape``, ``dequantize``, ``take`` and indexing account for it).

    Invariants: ``shape == values.shape`` in the canonical layout; ``dtype`` is the original
    float dtype (what :meth:`dequantize` returns); every value lies in the spec's integer range;
    ``scale > 0`` and finite unless the source block held NaN/Inf (then ``scale`` is NaN and the
    block dequantizes to NaN: see :func:`jcompress.quantization.nonfinite`). Stacked layers carry
    their leading axes in every child, so ``vmap``/``scan`` over those axes and ``qa[i]`` give
    per-layer ``QArray`` s.

    ``nbytes`` is the packed size: ``values`` at their container width (2, 4 or 8 bits per
    element; 3-bit values take 4), plus ``scale``, ``zero_point`` and ``act_scale``.

    >>> import jax.numpy as jnp
    >>> qa = QArray(jnp.array([[-7, 7]], jnp.int4), jnp.array([[0.5, 1.0]]), bits=4,
    ...             dtype=jnp.float32)
    >>> qa.dequantize()
    Array([[-3.5,  7. ]], dtype=float32)
    >>> qa.shape, qa.nbytes   # 2 int4 values = 1 byte, 2 float32 scales = 8 bytes
    ((1, 2), 9)
    """

    __slots__ = ("_act_scale", "_bits", "_dtype", "_layout", "_scale", "_values", "_zero_point")

    no_conv_reason = (
        "QArray has no convolution kernel: convolution kernels are small next to the feature "
        "maps, and on XLA:CPU an im2col integer path measured slower than dequantize-then-"
        "convolve when it was tried"
    )
    array_fields = ("values", "scale", "zero_point", "act_scale")
    static_fields = ("bits", "dtype")  # what checkpoints store (always the canonical layout)

    def __init__(
        self,
        values: ArrayLike,
        scale: ArrayLike,
        zero_point: ArrayLike | None = None,
        act_scale: ArrayLike | None = None,
        *,
        bits: int,
        dtype: Any,
    ):
        dtype = np.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"QArray.dtype must be a float dtype, got {dtype}")
        store = storage_dtype(bits)
        if np.dtype(values.dtype) != store:
            raise TypeError(
                f"QArray: {bits}-bit values must be stored as {store}, got {values.dtype} (int8 "
                "containers of sub-byte values exist only as the runtime layout made by widen(): "
                "checkpoints store the packed form: widen after loading)"
            )
        if len(scale.shape) != len(values.shape) or any(
            s < 1 or v % s for v, s in zip(values.shape, scale.shape)
        ):
            raise ValueError(
                f"QArray: scale shape {tuple(scale.shape)} must have values' rank and divide "
                f"values' shape {tuple(values.shape)} axis by axis"
            )
        if zero_point is not None and (
            tuple(zero_point.shape) != tuple(scale.shape) or np.dtype(zero_point.dtype) != store
        ):
            raise ValueError(
                f"QArray: zero_point must be {store} of scale's shape {tuple(scale.shape)}, got "
                f"{zero_point.dtype}{tuple(zero_point.shape)}"
            )
        self._set(values, scale, zero_point, act_scale, bits, dtype, None)

    def _set(self, *values: Any) -> None:
        # the array and static fields, then the runtime layout (default: canonical)
        *fields, layout = values if len(values) == 7 else (*values, None)
        super()._set(*fields)
        object.__setattr__(self, "_layout", layout)

    def tree_flatten_with_keys(self):
        children, aux = super().tree_flatten_with_keys()
        return children, (*aux, self._layout)  # the layout is static (aux) data too

    # -- fields ----------------------------------------------------------------------------------

    @property
    def values(self) -> jax.Array:
        return self._values

    @property
    def scale(self) -> jax.Array:
        return self._scale

    @property
    def zero_point(self) -> jax.Array | None:
        return self._zero_point

    @property
    def act_scale(self) -> jax.Array | None:
        return self._act_scale

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def layout(self) -> OutMajor | None:
        return self._layout

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self._values.shape)
        if self._layout is None:
            return shape
        return tuple(shape[i] for i in self._layout.canonical_order(len(shape)))

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return sum(
            _stored_bytes(x) for x in (self._values, self._scale, self._zero_point, self._act_scale)
        )

    def __repr__(self) -> str:
        zp = "" if self._zero_point is None else ", asymmetric"
        layout = "" if self._layout is None else f", layout={self._layout}"
        return (
            f"QArray(shape={self.shape}, bits={self._bits}, dtype={self._dtype.name}, "
            f"scale={tuple(self._scale.shape)}{zp}{layout})"
        )

    # -- computation -----------------------------------------------------------------------------

    def dequantize(self) -> jax.Array:
        """The float array, ``(values - zero_point) * scale`` in ``float32``, cast to ``dtype``."""
        w = dequantize_blocks(self._values, self._scale, self._zero_point, self._dtype)
        return self._to_canonical(w)

    def _to_canonical(self, x: jax.Array | None) -> jax.Array | None:
        """A child (or the dequantized array) from the stored axis order to the float array's."""
        if x is None or self._layout is None:
            return x
        return jnp.transpose(x, self._layout.canonical_order(x.ndim))

    def canonical(self) -> QArray:
        """The same array with its children in the float array's axis order (``layout=None``);
        ``self`` when already canonical. Sub-byte values stay in their containers."""
        if self._layout is None:
            return self
        out = object.__new__(type(self))  # subclasses (AWQArray) keep their type
        children = [self._to_canonical(c) for c in self._children()]
        out._set(*children, self._bits, self._dtype, None)
        return out

    def _children(self) -> list[jax.Array | None]:
        return [self._values, self._scale, self._zero_point, self._act_scale]

    def __getitem__(self, index: int | slice | tuple[int | slice, ...]) -> QArray:
        """Index leading (stacked) axes: ``qa[i]`` is layer ``i`` of a stacked ``QArray``.

        Only ints and slices on axes where every child is per-index (or shared, size 1) are
        allowed; indexing an axis with blocked scales (``PerGroup``) is an error.
        """
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > len(self.shape):
            raise IndexError(f"too many indices for a QArray of shape {self.shape}")
        layout = self._layout
        if layout is not None and len(index) > len(self.shape) - sum(layout):
            return self.canonical()[index]  # indexing into the permuted axes
        children = self._children()
        pos = 0  # where the original axis now is (ints remove axes)
        for axis, idx in enumerate(index):
            if not isinstance(idx, int | np.integer | slice):
                raise TypeError(
                    f"QArray indexing takes ints and slices on leading axes, got {idx!r}"
                )
            children = [_index_leading(c, idx, pos, axis, self.shape) for c in children]
            pos += isinstance(idx, slice)
        out = object.__new__(type(self))  # subclasses (AWQArray) keep their type
        out._set(*children, self._bits, self._dtype, layout)
        return out

    def widen(self) -> QArray:
        """The same array with sub-byte ``values`` (and ``zero_point``) in ``int8`` containers.

        A runtime layout: XLA:CPU holds int4/int2 buffers at one byte per element between calls
        anyway, but converts them to int8 on every matmul (slowly); widened values are read by
        the integer kernels directly. ``bits`` and ``dequantize()`` are unchanged; ``nbytes``
        counts the containers (one byte per value). Already-int8 values return ``self``. The
        ``layout`` is kept.

        >>> import jax.numpy as jnp
        >>> qa = QArray(jnp.array([[-7, 7]], jnp.int4), jnp.array([[0.5, 1.0]]), bits=4,
        ...             dtype=jnp.float32)
        >>> wide = qa.widen()
        >>> wide.values.dtype, wide.bits, wide.nbytes
        (dtype('int8'), 4, 10)
        """
        return self._recontained(np.dtype(jnp.int8))

    def stored(self) -> QArray:
        """The form checkpoints save: the float array's axis order (``layout=None``) and sub-byte
        values back in their own dtype; ``self`` when already so.

        >>> import jax.numpy as jnp
        >>> qa = QArray(jnp.array([[-7, 7]], jnp.int4), jnp.array([[0.5, 1.0]]), bits=4,
        ...             dtype=jnp.float32)
        >>> qa.widen().stored().values.dtype
        dtype(int4)
        """
        return self.canonical()._recontained(storage_dtype(self._bits))

    def _recontained(self, container: np.dtype) -> QArray:
        """The same numbers with ``values`` and ``zero_point`` in ``container`` (no checks)."""
        if np.dtype(self._values.dtype) == container:
            return self
        zp = None if self._zero_point is None else self._zero_point.astype(container)
        out = object.__new__(type(self))  # subclasses (AWQArray) keep their type
        values = self._values.astype(container)
        out._set(values, self._scale, zp, self._act_scale, self._bits, self._dtype, self._layout)
        return out

    def with_layout(self, layout: OutMajor | None) -> QArray:
        """The same array with its children stored in ``layout`` (``None``: canonical).

        >>> import jax.numpy as jnp
        >>> qa = QArray(jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int8), jnp.ones((1, 3)), bits=8,
        ...             dtype=jnp.float32)
        >>> om = qa.with_layout(OutMajor(contracting=1, output=1))
        >>> om.values.shape, om.shape, bool((om.dequantize() == qa.dequantize()).all())
        ((3, 2), (2, 3), True)
        """
        base = self.canonical()
        if layout is None:
            return base
        if not isinstance(layout, OutMajor):
            raise TypeError(f"QArray layout must be None or an OutMajor, got {layout!r}")
        if type(self) is not QArray:
            raise TypeError(
                f"{type(self).__name__} computes through a plain QArray of its own: runtime "
                "layouts are for QArray leaves only (widen() works on every kind)"
            )
        order = layout.stored_order(len(self.shape))
        children = [None if c is None else jnp.transpose(c, order) for c in base._children()]
        out = object.__new__(type(self))  # subclasses (AWQArray) keep their type
        out._set(*children, self._bits, self._dtype, layout)
        return out

    def take(self, indices: ArrayLike, axis: int = 0) -> jax.Array:
        """``jnp.take(self.dequantize(), indices, axis)``, dequantizing only the rows it takes.

        For gathered tables (``Embed``: ``table.take(ids)``); indices follow ``jnp.take`` (negative
        indices count from the end).
        """
        indices = jnp.asarray(indices)
        ndim = len(self.shape)
        axis = axis % ndim
        n = self.shape[axis]
        order = tuple(range(ndim)) if self._layout is None else self._layout.stored_order(ndim)
        stored_axis = order.index(axis)

        def gather(x):
            if x is None:
                return None
            block = n // x.shape[stored_axis]
            idx = indices if block == 1 else jnp.floor_divide(indices, block)
            return jnp.take(x, idx, axis=stored_axis)

        out = dequantize_blocks(
            gather(self._values), gather(self._scale), gather(self._zero_point), self._dtype
        )
        if self._layout is None:
            return out
        # out: stored axes before ``stored_axis``, the index axes, the stored axes after it
        kept = [a for a in order if a != axis]  # float-array axis of each remaining stored axis
        k = indices.ndim
        before, after = kept[:stored_axis], kept[stored_axis:]
        pos = {a: i for i, a in enumerate(before)}
        pos.update({a: stored_axis + k + i for i, a in enumerate(after)})
        perm = [pos[a] for a in range(axis)]
        perm += list(range(stored_axis, stored_axis + k))
        perm += [pos[a] for a in range(axis + 1, ndim)]
        return jnp.transpose(out, perm)

    def dot_general(self, lhs, dimension_numbers, **options) -> jax.Array:
        """A matmul with this array as one operand: the runtime's fast formulations.

        Delegates to ``jcompress.quantization._kernels.dot_general`` (imported lazily; written
        with the runtime), which chooses how to compute with the integers (fused dequantization,
        int8 x int8, float fallback) and documents ``options``.
        """
        from jcompress.quantization import _kernels

        return _kernels.dot_general(self, lhs, dimension_numbers, **options)


def widen(tree: Any) -> Any:
    """``tree`` with every ``QArray``'s sub-byte values in int8 containers (``QArray.widen``).

    The runtime layout for XLA:CPU, where int4/int2 buffers take one byte per element between
    calls anyway and ``jc.compressed`` would otherwise convert them to int8 on every matmul: with
    4096² weights the widened int4 model runs at int8 speed (``benchmarks/runtime.py``). Widen once
    after loading, not inside the jitted function; ``jc.checkpoint.save`` stores a widened tree in
    its packed form (:meth:`QArray.stored`), so loading gives packed values back.

    >>> import jax.numpy as jnp
    >>> tree = {"w": QArray(jnp.array([[3]], jnp.int4), jnp.ones((1, 1)), bits=4,
    ...                    dtype=jnp.float32), "b": jnp.zeros(1)}
    >>> widen(tree)["w"].values.dtype
    dtype('int8')
    """
    return jax.tree.map(
        lambda x: x.widen() if isinstance(x, QArray) else x,
        tree,
        is_leaf=lambda x: isinstance(x, QArray),
    )


def _index_leading(x, idx, pos: int, axis: int, shape: tuple[int, ...]):
    if x is None:
        return None
    size = x.shape[pos]
    if size == shape[axis] or idx == slice(None):
        pass
    elif size == 1:
        if isinstance(idx, slice):
            return x
        idx = 0
    else:
        raise ValueError(
            f"QArray: axis {axis} has blocked scales ({size} blocks of {shape[axis] // size}); "
            "index only stacked (per-layer) axes, or dequantize() first"
        )
    return x[(slice(None),) * pos + (idx,)]
