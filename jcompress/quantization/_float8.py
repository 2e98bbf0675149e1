"""``Float8Array``: 8-bit float values (``E4M3`` / ``E5M2``) times abs-max scales, a compressed
leaf; and how ``quantize`` builds it.

Conventions (``fmax`` the largest finite value of the 8-bit type: 448 for ``float8_e4m3fn``,
57344 for ``float8_e5m2``; arithmetic in ``float32``):

* ``scale = absmax(block) * float32(1 / fmax)`` (an all-zero block gets 1; scales are at least
  ``finfo(float32).tiny``);
* ``values = float8(clip(w * (1 / scale), -fmax, fmax))``: a saturating cast (round to nearest
  even; never Inf, never NaN from finite weights);
* ``dequantize = float32(values) * scale``, cast to the original dtype.

A block holding NaN/Inf gets a NaN scale and values 0, so it dequantizes to NaN (flagged by
:func:`jcompress.quantization.nonfinite`), as ``QArray`` blocks do. Reference: Micikevicius et
al., "FP8 Formats for Deep Learning" (2022).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcompress import tree as jtree
from jcompress.quantization._lookup import dequantized_dot, take_rows
from jcompress.quantization._qarray import broadcast_apply
from jcompress.quantization._scales import ScaleBlocks
from jcompress.quantization._spec import E4M3, QuantSpec

__all__ = ["FLOAT8", "Float8Array", "float8_leaf"]

FLOAT8 = {"E4M3": np.dtype(jnp.float8_e4m3fn), "E5M2": np.dtype(jnp.float8_e5m2)}
"""The 8-bit float dtype of each ``Float8Array.format``."""

_TINY = float(np.finfo(np.float32).tiny)


class Float8Array(jtree.Compressed, kind="Float8Array"):
    """8-bit floats times a scale: ``dequantize() == float32(values) * scale`` (blockwise).

    Children: ``values`` (``float8_e4m3fn`` for ``format="E4M3"``, ``float8_e5m2`` for
    ``"E5M2"``; the float array's shape) and ``scale`` (``float32``, blocked as
    ``QArray.scale``: along each axis size 1, the array's size, or a divisor for ``PerGroup``).
    Static: ``format`` and the original float ``dtype``; ``bits`` is 8.

    ``nbytes`` is one byte per value plus the scales. ``jc.compressed`` dequantizes it next to
    the matmul (``jc.explain`` names ``e4m3_dequantize`` / ``e5m2_dequantize``).

    >>> import jax.numpy as jnp
    >>> fa = Float8Array(jnp.array([[448.0, -3.25]], jnp.float8_e4m3fn), jnp.array([[0.5]]),
    ...                  dtype=jnp.float32, format="E4M3")
    >>> fa.dequantize(), fa.nbytes
    (Array([[224.   ,  -1.625]], dtype=float32), 6)
    """

    values = jtree.field()
    scale = jtree.field(trainable="scales")
    dtype = jtree.field(static=True)
    format = jtree.field(static=True)

    bits = 8
    no_conv_reason = "Float8Array has no convolution kernel: it is dequantized"

    def __init__(self, values: ArrayLike, scale: ArrayLike, *, dtype: Any, format: str):
        dtype = np.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"Float8Array.dtype must be a float dtype, got {dtype}")
        if format not in FLOAT8:
            raise ValueError(f"Float8Array.format must be one of {list(FLOAT8)}, got {format!r}")
        if np.dtype(values.dtype) != FLOAT8[format]:
            raise TypeError(
                f"Float8Array: {format} values must be {FLOAT8[format]}, got {values.dtype}"
            )
        shape = tuple(values.shape)
        if len(scale.shape) != len(shape) or any(
            s < 1 or v % s for v, s in zip(shape, scale.shape)
        ):
            raise ValueError(
                f"Float8Array: scale shape {tuple(scale.shape)} must have values' rank and "
                f"divide values' shape {shape} axis by axis"
            )
        super().__init__(values, scale, dtype=dtype, format=format)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def dequantize(self) -> jax.Array:
        """The float array, ``float32(values) * scale``, cast to ``dtype``."""
        w = broadcast_apply(lambda v, s: v * s, self.values.astype(jnp.float32), self.scale)
        return w.astype(self.dtype)

    def dot_general(
        self,
        lhs: ArrayLike,
        dimension_numbers: Any,
        *,
        weight_is_rhs: bool = True,
        preferred_element_type: Any = None,
        mode: str = "weight_only",
        **options: Any,
    ) -> jax.Array:
        """``lax.dot_general`` with this weight as one operand.

        ``mode="fp8"`` (``jc.compressed(fn, mode="fp8")``): the activations are quantized too,
        per row (every non-contracting index of ``lhs``) to this leaf's 8-bit format with a
        dynamic abs-max scale (saturating; an all-zero row gets scale 1), and one
        ``float8 x float8 -> float32`` dot runs, its result times the row and weight scales:
        ``(x8 @ w8) * sx * sw``. Backends with an fp8 matmul (Hopper-class GPUs) run it as
        such; XLA:CPU has none and converts both operands to float32 (same numbers:
        ``jc.explain`` reports ``fp8 dot`` intended, ``float fallback`` compiled). Weights with
        per-group scales (blocked along the contracting axes, which no post-dot scale can
        apply) dequantize instead, with the activations still rounded to fp8
        (``e4m3_activations``). A different model from the float one, chosen explicitly.

        Any other ``mode`` (``"weight_only"``, ...): the dequantized weight in a float matmul
        (``e4m3_dequantize`` / ``e5m2_dequantize``), equal to ``fn(dequantize(tree))``.
        """
        del options
        name = self.format.lower()
        if mode != "fp8":
            return dequantized_dot(
                self,
                f"{name}_dequantize",
                lhs,
                dimension_numbers,
                weight_is_rhs=weight_is_rhs,
                preferred_element_type=preferred_element_type,
            )
        return _fp8_dot(
            self, jnp.asarray(lhs), dimension_numbers, weight_is_rhs, preferred_element_type
        )

    def take(self, indices: ArrayLike, axis: int = 0) -> jax.Array:
        """``jnp.take(self.dequantize(), indices, axis)``, scaling only the rows it takes."""
        return take_rows(self, indices, axis)


def _to_float8(x: jax.Array, store: np.dtype, contracting: tuple[int, ...]):
    """``(float8(clip(x / s, +-fmax)), s)`` with ``s`` the abs-max of each row over the
    ``contracting`` axes divided by ``fmax`` (kept as size-1 axes; 1 for an all-zero row)."""
    fmax = float(jnp.finfo(store).max)
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=contracting, keepdims=True)
    scale = jnp.where(absmax > 0, absmax * jnp.float32(1 / fmax), jnp.ones((), jnp.float32))
    return jnp.clip(x / scale, -fmax, fmax).astype(store), scale


def _fp8_dot(leaf, lhs, dimension_numbers, weight_is_rhs, preferred_element_type):
    """``mode="fp8"``: see :meth:`Float8Array.dot_general`."""
    from jcompress.runtime._explain import kernel_scope

    (a_c, b_c), (a_b, b_b) = dimension_numbers
    x_c, w_c, w_b = (a_c, b_c, b_b) if weight_is_rhs else (b_c, a_c, a_b)
    out_dtype = preferred_element_type or jnp.promote_types(lhs.dtype, leaf.dtype)
    name = leaf.format.lower()
    x8, sx = _to_float8(lhs, FLOAT8[leaf.format], tuple(x_c))
    if any(leaf.scale.shape[a] != 1 for a in w_c):  # per-group: no scale after the dot
        with kernel_scope(f"{name}_activations", "float"):
            x = x8.astype(jnp.float32) * sx
            w = leaf.dequantize().astype(jnp.float32)
            ops = (x, w) if weight_is_rhs else (w, x)
            out = jax.lax.dot_general(*ops, dimension_numbers, preferred_element_type=jnp.float32)
            return out.astype(out_dtype)
    # the scales as operands of the same dot_general: their contracting axes have size 1, so
    # it is their outer product laid out as the output (batch axes broadcast to full size)
    sw = jnp.broadcast_to(
        leaf.scale, [leaf.shape[a] if a in w_b else n for a, n in enumerate(leaf.scale.shape)]
    )
    with kernel_scope(f"{name}_dot", "fp8"):
        ops = (x8, leaf.values) if weight_is_rhs else (leaf.values, x8)
        out = jax.lax.dot_general(*ops, dimension_numbers, preferred_element_type=jnp.float32)
        scales = (sx, sw) if weight_is_rhs else (sw, sx)
        out = out * jax.lax.dot_general(*scales, dimension_numbers)
        return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("spec", "blocks"))
def float8_leaf(w: jax.Array, *, spec: QuantSpec, blocks: ScaleBlocks) -> Float8Array:
    """The :class:`Float8Array` of one leaf for an ``E4M3`` / ``E5M2`` spec (see the module
    docstring for the rounding)."""
    name = "E4M3" if isinstance(spec.format, E4M3) else "E5M2"
    store = FLOAT8[name]
    fmax = float(jnp.finfo(store).max)
    x = w.astype(jnp.float32).reshape(blocks.split_shape)
    absmax = jnp.max(jnp.abs(x), axis=blocks.reduce_axes, keepdims=True)
    bad = ~jnp.isfinite(absmax)
    scale = absmax * jnp.float32(1 / fmax)
    scale = jnp.where(scale > 0, jnp.maximum(scale, jnp.float32(_TINY)), jnp.ones((), jnp.float32))
    scale = jnp.where(bad, jnp.float32(jnp.nan), scale)
    r = jnp.clip(x * (1 / scale), -fmax, fmax)  # saturate: no Inf, no NaN from finite weights
    r = jnp.where(bad, jnp.zeros((), jnp.float32), r)
    values = r.astype(store).reshape(w.shape)
    return Float8Array(values, scale.reshape(blocks.scale_shape), dtype=w.dtype, format=name)
