"""``LookupArray``: packed indices into a small float table (NF4, codebooks), a compressed leaf."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcompress import tree as jtree
from jcompress.quantization._qarray import broadcast_apply

__all__ = [
    "FORMATS",
    "NF4_LEVELS",
    "LookupArray",
    "dequantized_dot",
    "index_dtype",
    "take_rows",
]

NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
"""The 16 levels of 4-bit NormalFloat (Dettmers et al., QLoRA, 2023; the table of bitsandbytes):
quantiles of a standard normal, normalised to ``[-1, 1]``, with ``0.0`` exact (index 7)."""

FORMATS = ("NF4", "Codebook")
"""The ``LookupArray.format`` names: the ``QuantSpec.format`` variants stored as lookups."""


def index_dtype(bits: int) -> np.dtype:
    """The unsigned container of ``bits``-bit indices: ``uint2`` (1-2), ``uint4`` (3-4) or
    ``uint8`` (5-8); no 1-bit dtype exists, so 1-bit indices take 2 bits.

    >>> index_dtype(1), index_dtype(3), index_dtype(6)
    (dtype(uint2), dtype(uint4), dtype('uint8'))
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"lookup indices have 1..8 bits, got {bits}")
    return np.dtype(jnp.uint2 if bits <= 2 else jnp.uint4 if bits <= 4 else jnp.uint8)


class LookupArray(jtree.Compressed, kind="LookupArray"):
    """Indices into a float table: ``dequantize() == table[indices] * scale`` (blockwise).

    Children (pytree leaves):

    * ``indices``: the full shape of the float array, unsigned ``uint2`` (``bits`` 1-2), ``uint4``
      (3-4) or ``uint8`` (5-8), each below ``2**bits``.
    * ``table``: ``float32`` of shape ``(*blocks, 2**bits)``: ``blocks`` has the float array's
      rank and along each axis size 1 (one table shared along it) or the array's size (a table
      per index: per output channel, per stacked layer). NF4: the 16 levels
      (:data:`NF4_LEVELS`), one shared table; ``Codebook``: the k-means centroids of each tensor
      or output channel.
    * ``scale``: ``None`` (``Codebook``: the table holds the values) or ``float32`` of the
      array's rank with, along each axis, size 1, the array's size, or a divisor (``PerGroup``
      blocks), as ``QArray.scale`` (NF4: the abs-max of each block).

    ``jc.tree.partition`` puts a ``Codebook`` table in the trainable half (its centroids are
    fine-tuned with the indices fixed, as in Deep Compression: each entry's gradient is the sum
    of the gradients of the weights mapped to it; a reserved ``0.0`` entry has none, so pruned
    weights stay exactly zero through training), never an NF4 table (the 16 levels are the
    format), and ``scale`` when ``scales=True``.

    Static: ``bits``, the original float ``dtype`` and ``format`` (``"NF4"`` or
    ``"Codebook"``, what ``jc.explain`` names).

    Invariants: an exact ``0.0`` of the source is stored as an index whose table entry is exactly
    ``0.0`` (NF4: level 7; ``Codebook``: entry 0 of a table whose weights held zeros), so pruned
    weights stay exactly zero. A block or table whose weights held NaN/Inf has a NaN scale or
    table and dequantizes to NaN (see :func:`jcompress.quantization.nonfinite`). ``nbytes`` is
    the packed size: indices at their container width plus the table and the scales.

    >>> import jax.numpy as jnp
    >>> la = LookupArray(jnp.array([[0, 7, 15]], jnp.uint4), jnp.asarray(NF4_LEVELS)[None, None],
    ...                  jnp.array([[2.0, 2.0, 0.5]]), bits=4, dtype=jnp.float32, format="NF4")
    >>> la.dequantize()
    Array([[-2. ,  0. ,  0.5]], dtype=float32)
    >>> la.nbytes   # 3 uint4 indices = 2 bytes, 16 float32 levels, 3 float32 scales
    78
    """

    indices = jtree.field()
    table = jtree.field(trainable=True)  # fine-tuned centroids (Deep Compression)
    scale = jtree.field(default=None, trainable="scales")
    bits = jtree.field(static=True)
    dtype = jtree.field(static=True)
    format = jtree.field(static=True)

    no_conv_reason = "LookupArray has no convolution kernel: it is dequantized (a table lookup)"

    def __init__(
        self,
        indices: ArrayLike,
        table: ArrayLike,
        scale: ArrayLike | None = None,
        *,
        bits: int,
        dtype: Any,
        format: str,
    ):
        dtype = np.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"LookupArray.dtype must be a float dtype, got {dtype}")
        if format not in FORMATS:
            raise ValueError(f"LookupArray.format must be one of {FORMATS}, got {format!r}")
        store = index_dtype(bits)
        if np.dtype(indices.dtype) != store:
            raise TypeError(
                f"LookupArray: {bits}-bit indices must be stored as {store}, got {indices.dtype}"
            )
        shape = tuple(indices.shape)
        tshape = tuple(table.shape)
        if (
            np.dtype(table.dtype) != np.float32
            or len(tshape) != len(shape) + 1
            or tshape[-1] != 2**bits
            or any(t not in (1, v) for v, t in zip(shape, tshape))
        ):
            raise ValueError(
                f"LookupArray: table must be float32 of shape (*blocks, {2**bits}) with blocks of "
                f"size 1 or the indices' size on each axis of {shape}, got "
                f"{np.dtype(table.dtype).name}{tshape}"
            )
        if scale is not None and (
            len(scale.shape) != len(shape)
            or any(s < 1 or v % s for v, s in zip(shape, scale.shape))
        ):
            raise ValueError(
                f"LookupArray: scale shape {tuple(scale.shape)} must have the indices' rank and "
                f"divide their shape {shape} axis by axis"
            )
        super().__init__(indices, table, scale, bits=bits, dtype=dtype, format=format)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.indices.shape)

    def trainable_fields(self, *, scales: bool = False) -> tuple[str, ...]:
        """``table`` (a codebook's; never NF4's fixed levels), and ``scale`` when ``scales``."""
        names = super().trainable_fields(scales=scales)
        return tuple(n for n in names if not (n == "table" and self.format == "NF4"))

    def lookup(self) -> jax.Array:
        """``table[indices]`` in ``float32`` (before the scale), the float array's shape."""
        table = self.table
        if self.format == "Codebook":  # a reserved 0.0 entry stays 0.0: no gradient reaches it
            zero = jax.lax.stop_gradient(table[..., :1] == 0)
            first = jnp.where(zero, jnp.zeros((), table.dtype), table[..., :1])
            table = jnp.concatenate([first, table[..., 1:]], axis=-1)
        idx = self.indices.astype(jnp.int32)[..., None]
        return jnp.take_along_axis(table, idx, axis=-1)[..., 0]

    def dequantize(self) -> jax.Array:
        """The float array, ``table[indices] * scale`` in ``float32``, cast to ``dtype``."""
        w = self.lookup()
        if self.scale is not None:
            w = broadcast_apply(lambda v, s: v * s, w, self.scale)
        return w.astype(self.dtype)

    def dot_general(self, lhs: ArrayLike, dimension_numbers: Any, **options: Any) -> jax.Array:
        """``lax.dot_general`` with the dequantized table lookup as one operand.

        The lookup runs inside the jitted function, next to the matmul (``jc.explain`` names it
        ``nf4_lookup`` / ``codebook_lookup``, a float path); ``options`` (``mode=`` of integer
        leaves) do not apply to a lookup and are ignored.
        """
        name = f"{self.format.lower()}_lookup"
        return dequantized_dot(self, name, lhs, dimension_numbers, **options)

    def take(self, indices: ArrayLike, axis: int = 0) -> jax.Array:
        """``jnp.take(self.dequantize(), indices, axis)``, looking up only the rows it takes
        (gathered tables: ``Embed``)."""
        return take_rows(self, indices, axis)


def take_rows(leaf: jtree.Compressed, indices: ArrayLike, axis: int = 0) -> jax.Array:
    """``jnp.take(leaf.dequantize(), indices, axis)`` dequantizing only the rows taken: every
    array child is gathered along ``axis`` (a child of size 1 along it, shared, or of blocks of
    rows, takes the block of each index), then the smaller leaf is dequantized. For leaves whose
    children have the float array's leading axes (``LookupArray``, ``Float8Array``)."""
    indices = jnp.asarray(indices)
    axis = axis % len(leaf.shape)
    n = leaf.shape[axis]

    def gather(x):
        if x is None:
            return None
        block = n // x.shape[axis]
        return jnp.take(x, indices if block == 1 else jnp.floor_divide(indices, block), axis=axis)

    return leaf.replace(**{a: gather(getattr(leaf, a)) for a in leaf.array_fields}).dequantize()


def dequantized_dot(
    leaf: jtree.Compressed,
    formulation: str,
    lhs: ArrayLike,
    dimension_numbers: Any,
    *,
    weight_is_rhs: bool = True,
    preferred_element_type: Any = None,
    **options: Any,
) -> jax.Array:
    """A compressed leaf's ``dot_general`` that dequantizes it inside the jitted function, under
    ``jc.explain``'s name ``formulation`` (a float path); ``options`` are ignored. Both operands
    are cast to their promoted dtype (explicitly: strict promotion holds)."""
    del options
    from jcompress.runtime._explain import kernel_scope

    lhs = jnp.asarray(lhs)
    with kernel_scope(formulation, "float"):
        w = leaf.dequantize()
        dtype = jnp.promote_types(lhs.dtype, w.dtype)
        operands = (lhs.astype(dtype), w.astype(dtype))
        if not weight_is_rhs:
            operands = operands[::-1]
        return jax.lax.dot_general(
            *operands, dimension_numbers, preferred_element_type=preferred_element_type
        )
