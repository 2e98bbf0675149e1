"""``QArray``: integer values with scales, a registered pytree node and a compressed leaf."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcompress import tree as jtree

__all__ = [
    "QArray",
    "block_shapes",
    "broadcast_apply",
    "dequantize_blocks",
    "storage_dtype",
    "widen",
]


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

    Static (aux) data: ``bits`` and the original float ``dtype`` only.

    Invariants: ``shape == values.shape``; ``dtype`` is the original float dtype (what
    :meth:`dequantize` returns); every value lies in the spec's integer range; ``scale > 0`` and
    finite unless the source block held NaN/Inf (then ``scale`` is NaN and the block dequantizes to
    NaN: see :func:`jcompress.quantization.nonfinite`). Stacked layers carry their leading axes in
    every child, so ``vmap``/``scan`` over those axes and ``qa[i]`` give per-layer ``QArray`` s.

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

    __slots__ = ("_act_scale", "_bits", "_dtype", "_scale", "_values", "_zero_point")

    array_fields = ("values", "scale", "zero_point", "act_scale")
    static_fields = ("bits", "dtype")

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
        self._set(values, scale, zero_point, act_scale, bits, dtype)

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
    def shape(self) -> tuple[int, ...]:
        return tuple(self._values.shape)

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
        return (
            f"QArray(shape={self.shape}, bits={self._bits}, dtype={self._dtype.name}, "
            f"scale={tuple(self._scale.shape)}{zp})"
        )

    # -- computation -----------------------------------------------------------------------------

    def dequantize(self) -> jax.Array:
        """The float array, ``(values - zero_point) * scale`` in ``float32``, cast to ``dtype``."""
        return dequantize_blocks(self._values, self._scale, self._zero_point, self._dtype)

    def __getitem__(self, index: int | slice | tuple[int | slice, ...]) -> QArray:
        """Index leading (stacked) axes: ``qa[i]`` is layer ``i`` of a stacked ``QArray``.

        Only ints and slices on axes where every child is per-index (or shared, size 1) are
        allowed; indexing an axis with blocked scales (``PerGroup``) is an error.
        """
        index = index if isinstance(index, tuple) else (index,)
        children = [self._values, self._scale, self._zero_point, self._act_scale]
        if len(index) > len(self.shape):
            raise IndexError(f"too many indices for a QArray of shape {self.shape}")
        pos = 0  # where the original axis now is (ints remove axes)
        for axis, idx in enumerate(index):
            if not isinstance(idx, int | np.integer | slice):
                raise TypeError(
                    f"QArray indexing takes ints and slices on leading axes, got {idx!r}"
                )
            children = [_index_leading(c, idx, pos, axis, self.shape) for c in children]
            pos += isinstance(idx, slice)
        out = object.__new__(type(self))  # subclasses (AWQArray) keep their type
        out._set(*children, self._bits, self._dtype)
        return out

    def widen(self) -> QArray:
        """The same array with sub-byte ``values`` (and ``zero_point``) in ``int8`` containers.

        A runtime layout: XLA:CPU holds int4/int2 buffers at one byte per element between calls
        anyway, but converts them to int8 on every matmul (slowly); widened values are read by
        the integer kernels directly. ``bits`` and ``dequantize()`` are unchanged; ``nbytes``
        counts the containers (one byte per value). Already-int8 values return ``self``.

        >>> import jax.numpy as jnp
        >>> qa = QArray(jnp.array([[-7, 7]], jnp.int4), jnp.array([[0.5, 1.0]]), bits=4,
        ...             dtype=jnp.float32)
        >>> wide = qa.widen()
        >>> wide.values.dtype, wide.bits, wide.nbytes
        (dtype('int8'), 4, 10)
        """
        return self._recontained(np.dtype(jnp.int8))

    def stored(self) -> QArray:
        """The packed form of a widened array (sub-byte values back in their own dtype), which is
        what checkpoints save; ``self`` when already packed.

        >>> import jax.numpy as jnp
        >>> qa = QArray(jnp.array([[-7, 7]], jnp.int4), jnp.array([[0.5, 1.0]]), bits=4,
        ...             dtype=jnp.float32)
        >>> qa.widen().stored().values.dtype
        dtype(int4)
        """
        return self._recontained(storage_dtype(self._bits))

    def _recontained(self, container: np.dtype) -> QArray:
        """The same numbers with ``values`` and ``zero_point`` in ``container`` (no checks)."""
        if np.dtype(self._values.dtype) == container:
            return self
        zp = None if self._zero_point is None else self._zero_point.astype(container)
        out = object.__new__(type(self))  # subclasses (AWQArray) keep their type
        values = self._values.astype(container)
        out._set(values, self._scale, zp, self._act_scale, self._bits, self._dtype)
        return out

    def take(self, indices: ArrayLike, axis: int = 0) -> jax.Array:
        """``jnp.take(self.dequantize(), indices, axis)``, dequantizing only the rows it takes.

        For gathered tables (``Embed``: ``table.take(ids)``); indices follow ``jnp.take`` (negative
        indices count from the end).
        """
        indices = jnp.asarray(indices)
        axis = axis % len(self.shape)
        n = self.shape[axis]

        def gather(x):
            if x is None:
                return None
            block = n // x.shape[axis]
            idx = indices if block == 1 else jnp.floor_divide(indices, block)
            return jnp.take(x, idx, axis=axis)

        return dequantize_blocks(
            gather(self._values), gather(self._scale), gather(self._zero_point), self._dtype
        )

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
