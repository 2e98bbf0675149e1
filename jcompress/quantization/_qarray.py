"""``QArray``: integer values with scales, a registered pytree node and a compressed leaf."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcompress import tree as jtree
from jcompress.tree._kinds import register_static

__all__ = [
    "GroupMajor",
    "OutMajor",
    "QArray",
    "block_shapes",
    "broadcast_apply",
    "dequantize_blocks",
    "storage_dtype",
    "widen",
]


@register_static
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

    @property
    def axes(self) -> int:
        """How many trailing axes of the float array the layout rearranges."""
        return self.contracting + self.output

    def canonical_shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        """The float array's shape of a child stored with shape ``stored``."""
        return tuple(stored[i] for i in self.canonical_order(len(stored)))

    def store(self, x: jax.Array) -> jax.Array:
        """A child (float-array axis order) in this layout."""
        return jnp.transpose(x, self.stored_order(x.ndim))

    def restore(self, x: jax.Array) -> jax.Array:
        """A stored child back in the float array's axis order."""
        return jnp.transpose(x, self.canonical_order(x.ndim))


@register_static
class GroupMajor(NamedTuple):
    """A runtime layout of a per-group matmul weight ``(..., K, *output axes)`` whose scales hold
    ``groups`` blocks along ``K``, its one contracting axis (Flax ``Dense`` ``(in, out)`` with
    ``PerGroup`` scales): stored ``(..., groups, *output axes, K // groups)``, so each group's
    rows are output-major and contiguous and one batched integer dot multiplies every group at
    once (the batch-1 decode formulation of ``jc.compressed`` on CPU).

    Every child is stored alike: ``K`` split into ``(groups, K // groups)`` (a child with one
    entry along ``K``, such as a scale, into ``(groups, 1)``; a child of size 1 there into
    ``(1, 1)``), the block axis moved last. Leading (stacked) axes stay where they are. Made by
    ``jcompress.quantization.runtime_layout``; :meth:`QArray.stored` returns the float array's
    form.

    >>> GroupMajor(groups=4, output=1).stored_shape((2, 8, 3))  # (layers, in, out)
    (2, 4, 3, 2)
    """

    groups: int
    output: int

    @property
    def axes(self) -> int:
        """How many trailing axes of the float array the layout rearranges."""
        return 1 + self.output

    def _split(self, size: int) -> tuple[int, int]:
        if size == 1:
            return 1, 1
        if self.groups < 1 or size % self.groups:
            raise ValueError(f"{self} does not fit an axis of {size} entries")
        return self.groups, size // self.groups

    def _lead(self, ndim: int) -> int:
        lead = ndim - self.axes
        if lead < 0 or self.output < 1:
            raise ValueError(f"{self} does not fit an array of rank {ndim}")
        return lead

    def stored_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The stored shape of a child of float-array shape ``shape``."""
        lead = self._lead(len(shape))
        a, b = self._split(shape[lead])
        return (*shape[:lead], a, *shape[lead + 1 :], b)

    def canonical_shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        """The float array's shape of a child stored with shape ``stored``."""
        lead = self._lead(len(stored) - 1)
        a, b = stored[lead], stored[-1]
        return (*stored[:lead], a * b, *stored[lead + 1 : -1])

    def store(self, x: jax.Array) -> jax.Array:
        """A child (float-array axis order) in this layout."""
        lead = self._lead(x.ndim)
        a, b = self._split(x.shape[lead])
        x = x.reshape(*x.shape[:lead], a, b, *x.shape[lead + 1 :])
        return jnp.moveaxis(x, lead + 1, -1)

    def restore(self, x: jax.Array) -> jax.Array:
        """A stored child back in the float array's axis order."""
        shape = self.canonical_shape(x.shape)
        return jnp.moveaxis(x, -1, self._lead(len(shape)) + 1).reshape(shape)


def storage_dtype(bits: int) -> np.dtype:
    """The signed container of ``bits``-bit values: ``int2`` (2), ``int4`` (3-4), ``int8`` (5-8).

    >>> storage_dtype(3)
    dtype(int4)
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return np.dtype(jnp.int2 if bits == 2 else jnp.int4 if bits <= 4 else jnp.int8)


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


class QArray(jtree.Compressed, kind="QArray"):
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
    * ``act_scale``: ``None``, or the static activation step of ``mode="int8"`` (made by
      ``calibrate_activations``: size 1 on every axis except stacked layer axes); ignored by
      :meth:`dequantize` and weight-only matmuls. (AWQ's per-input-channel scale is another
      thing: ``AWQArray.input_scale``, a wrapper around a ``QArray``.)

    Static (aux) data: ``bits``, the original float ``dtype`` and ``layout``: ``None`` (the
    children in the float array's axis order, which the constructor takes and checkpoints store:
    :meth:`stored`) or a runtime layout made by ``runtime_layout`` (:class:`OutMajor`: the
    children's axes permuted; :class:`GroupMajor`: the contracting axis split into its groups,
    each group output-major); ``shape``, ``dequantize``, ``take``, indexing and ``stored``
    account for it.

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

    values = jtree.field()
    scale = jtree.field(trainable="scales")
    zero_point = jtree.field(default=None)
    act_scale = jtree.field(default=None)
    bits = jtree.field(static=True)
    dtype = jtree.field(static=True)
    layout = jtree.field(static=True, default=None, stored=False)  # checkpoints: canonical

    no_conv_reason = (
        "QArray has no convolution kernel: convolution kernels are small next to the feature "
        "maps, and on XLA:CPU an im2col integer path measured slower than dequantize-then-"
        "convolve when it was tried"
    )

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
        super().__init__(values, scale, zero_point, act_scale, bits=bits, dtype=dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.values.shape)
        return shape if self.layout is None else self.layout.canonical_shape(shape)

    # -- computation -----------------------------------------------------------------------------

    def dequantize(self) -> jax.Array:
        """The float array, ``(values - zero_point) * scale`` in ``float32``, cast to ``dtype``."""
        w = dequantize_blocks(self.values, self.scale, self.zero_point, self.dtype)
        return self._to_canonical(w)

    def _to_canonical(self, x: jax.Array | None) -> jax.Array | None:
        """A child (or the dequantized array) from the stored axis order to the float array's."""
        if x is None or self.layout is None:
            return x
        return self.layout.restore(x)

    def canonical(self) -> QArray:
        """The same array with its children in the float array's axis order (``layout=None``);
        ``self`` when already canonical. Sub-byte values stay in their containers."""
        if self.layout is None:
            return self
        children = {n: self._to_canonical(getattr(self, n)) for n in self.array_fields}
        return self.replace(**children, layout=None)

    def __getitem__(self, index: int | slice | tuple[int | slice, ...]) -> QArray:
        """Index leading (stacked) axes: ``qa[i]`` is layer ``i`` of a stacked ``QArray``.

        As :meth:`jcompress.tree.Compressed.__getitem__` (ints and slices; an axis with blocked
        ``PerGroup`` scales is an error); a runtime layout is kept when only the leading axes it
        leaves in place are indexed, and dropped (canonical) otherwise.
        """
        layout = self.layout
        n = len(index) if isinstance(index, tuple) else 1
        if layout is not None and n > len(self.shape) - layout.axes:
            return self.canonical()[index]  # indexing into the permuted axes
        return super().__getitem__(index)

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
        return self.canonical()._recontained(storage_dtype(self.bits))

    def _recontained(self, container: np.dtype) -> QArray:
        """The same numbers with ``values`` and ``zero_point`` in ``container`` (no checks)."""
        if np.dtype(self.values.dtype) == container:
            return self
        zp = None if self.zero_point is None else self.zero_point.astype(container)
        return self.replace(values=self.values.astype(container), zero_point=zp)

    def with_layout(self, layout: OutMajor | GroupMajor | None) -> QArray:
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
        if not isinstance(layout, OutMajor | GroupMajor):
            raise TypeError(
                f"QArray layout must be None, an OutMajor or a GroupMajor, got {layout!r}"
            )
        if isinstance(layout, GroupMajor):
            k = len(self.shape) - layout.axes
            if k < 0 or base.scale.shape[k] != layout.groups:
                raise ValueError(
                    f"{layout} needs scales with {layout.groups} blocks along axis {k} of a "
                    f"weight of shape {self.shape}; this one's scale has shape "
                    f"{tuple(base.scale.shape)}"
                )
        else:
            layout.stored_order(len(self.shape))  # raises when it does not fit
        children = {n: getattr(base, n) for n in self.array_fields}
        children = {n: None if c is None else layout.store(c) for n, c in children.items()}
        return base.replace(**children, layout=layout)

    def take(self, indices: ArrayLike, axis: int = 0) -> jax.Array:
        """``jnp.take(self.dequantize(), indices, axis)``, dequantizing only the rows it takes.

        For gathered tables (``Embed``: ``table.take(ids)``); indices follow ``jnp.take`` (negative
        indices count from the end).
        """
        if isinstance(self.layout, GroupMajor):  # a matmul weight: gathered rarely
            return self.canonical().take(indices, axis)
        indices = jnp.asarray(indices)
        ndim = len(self.shape)
        axis = axis % ndim
        n = self.shape[axis]
        order = tuple(range(ndim)) if self.layout is None else self.layout.stored_order(ndim)
        stored_axis = order.index(axis)

        def gather(x):
            if x is None:
                return None
            block = n // x.shape[stored_axis]
            idx = indices if block == 1 else jnp.floor_divide(indices, block)
            return jnp.take(x, idx, axis=stored_axis)

        out = dequantize_blocks(
            gather(self.values), gather(self.scale), gather(self.zero_point), self.dtype
        )
        if self.layout is None:
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
