"""The ``LowRank`` compressed leaf: a kernel stored as two factors, ``W = a @ b``.

A kernel ``W (in, out)`` becomes ``a (in, r) @ b (r, out)``: ``x @ W`` turns into the two
matmuls ``(x @ a) @ b``, which costs fewer multiply-adds **and** fewer bytes exactly when
``r·(in + out) < in·out``. :func:`factorable` says which kernels one can stand for (a matmul
kernel of any layout, stacked axes leading); the factorisations that make these leaves are in
:mod:`jcompress.structure._lowrank`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jcompress import tree as jtree
from jcompress.calibration import LeafMatrices

__all__ = ["LowRank", "factorable"]


def _compute_dtype(*dtypes: Any) -> np.dtype:
    """The float dtype two operands meet in, without implicit promotion (strict-safe)."""
    ds = {np.dtype(d) for d in dtypes}
    if len(ds) == 1:
        return ds.pop()
    return max(ds | {np.dtype(np.float32)}, key=lambda d: d.itemsize)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _dequantize(a, b, dtype, layer_shape, contracting, output) -> jax.Array:
    ns = a.ndim - 2
    m = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    order = contracting + output
    m = m.reshape(*m.shape[:ns], *(layer_shape[d] for d in order))
    inverse = [order.index(d) for d in range(len(order))]
    m = jnp.transpose(m, [*range(ns), *(ns + i for i in inverse)])
    return m.astype(dtype)


class LowRank(jtree.Compressed, kind="LowRank"):
    """A kernel stored as two factors: ``dequantize() == a @ b`` (per stacked slice).

    Children (pytree leaves; ``jit``, ``vmap``, ``scan``, sharding and orbax see them):

    * ``a``: ``(*stacked, in, r)``, ``in`` the product of the layer's contracting axes;
    * ``b``: ``(*stacked, r, out)``, ``out`` the product of its output axes.

    Static (aux) data, all per *layer* (one stacked slice), so slicing the stacked axes with
    ``vmap``/``scan`` or ``lr[i]`` keeps them valid: the original ``dtype``, ``layer_shape`` (the
    kernel's shape without stacked axes), and the layer's ``contracting`` and ``output`` axes
    (ascending; together every axis of ``layer_shape``). A plain Dense kernel ``(in, out)`` has
    ``contracting=(0,)``, ``output=(1,)``; an attention ``DenseGeneral`` kernel ``(features,
    heads, head_dim)`` has ``contracting=(0,)``, ``output=(1, 2)`` and ``b: (r, heads·head_dim)``;
    an Equinox ``(out, in)`` weight has ``contracting=(1,)``, ``output=(0,)``.

    Invariants: ``shape == a.shape[:-2] + layer_shape``; ``in == prod(layer_shape[c] for c in
    contracting)`` (row-major, axes ascending, which is the channel order of
    ``jcompress.runtime.capture``); ``out`` likewise. ``nbytes`` is the bytes of both factors.

    ``dot_general`` computes ``x @ W`` as ``(x @ a) @ b`` when the matmul contracts exactly the
    layer's contracting axes (or exactly its output axes: ``x @ Wᵀ`` as ``(x @ bᵀ) @ aᵀ``) and
    every stacked axis is a batch axis; any other use (a contraction over part of the axes,
    stacked axes left free) falls back to ``dequantize()`` and one dense matmul, which is exact
    but saves nothing.

    >>> import jax.numpy as jnp
    >>> lr = LowRank(jnp.ones((4, 1)), jnp.full((1, 3), 2.0))
    >>> lr.shape, lr.nbytes            # 4·1 + 1·3 float32 values, instead of 4·3
    ((4, 3), 28)
    >>> lr.dequantize()[0]
    Array([2., 2., 2.], dtype=float32)
    >>> lr.dot_general(jnp.ones((2, 4)), (((1,), (0,)), ((), ())))
    Array([[8., 8., 8.],
           [8., 8., 8.]], dtype=float32)
    """

    a = jtree.field(trainable=True)
    """The left factor ``(*stacked, in, r)``."""
    b = jtree.field(trainable=True)
    """The right factor ``(*stacked, r, out)``."""
    dtype = jtree.field(static=True)
    layer_shape = jtree.field(static=True, repr=False)  # shape without the stacked axes
    contracting = jtree.field(static=True)
    output = jtree.field(static=True)

    def __init__(
        self,
        a: ArrayLike,
        b: ArrayLike,
        *,
        dtype: Any = None,
        layer_shape: Sequence[int] | None = None,
        contracting: Sequence[int] | None = None,
        output: Sequence[int] | None = None,
    ):
        a, b = jnp.asarray(a), jnp.asarray(b)
        if a.ndim < 2 or a.ndim != b.ndim:
            raise ValueError(
                f"LowRank: a (*stacked, in, r) and b (*stacked, r, out) need the same rank >= 2, "
                f"got a{tuple(a.shape)} and b{tuple(b.shape)}"
            )
        if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"LowRank: a{tuple(a.shape)} @ b{tuple(b.shape)} do not chain: stacked axes and "
                "the rank (a's last axis, b's second-to-last) must agree"
            )
        for name, x in (("a", a), ("b", b)):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"LowRank: factor {name} must be floating, got {x.dtype}")
        dtype = np.dtype(a.dtype if dtype is None else dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"LowRank.dtype must be a float dtype, got {dtype}")
        k, n = a.shape[-2], b.shape[-1]
        layer_shape = (k, n) if layer_shape is None else tuple(int(s) for s in layer_shape)
        nd = len(layer_shape)
        contracting = (
            tuple(range(nd - 1)) if contracting is None else tuple(int(c) for c in contracting)
        )
        output = (
            tuple(c for c in range(nd) if c not in contracting)
            if output is None
            else tuple(int(o) for o in output)
        )
        if (
            sorted(contracting + output) != list(range(nd))
            or list(contracting) != sorted(contracting)
            or list(output) != sorted(output)
            or not contracting
            or not output
        ):
            raise ValueError(
                f"LowRank: contracting={contracting} and output={output} must be non-empty, "
                f"ascending and together cover every axis of layer_shape={layer_shape} once"
            )
        kk = math.prod(layer_shape[c] for c in contracting)
        nn = math.prod(layer_shape[o] for o in output)
        if (kk, nn) != (k, n):
            raise ValueError(
                f"LowRank: layer_shape={layer_shape} with contracting={contracting} flattens to "
                f"({kk}, {nn}), but the factors give ({k}, {n})"
            )
        super().__init__(
            a=a, b=b, dtype=dtype, layer_shape=layer_shape, contracting=contracting, output=output
        )

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[:-2]) + self.layer_shape

    @property
    def leading_axes(self) -> int:
        """The stacked axes: ``lr[i]`` indexes them (the layer's own axes are in the factors)."""
        return self._stacked

    # -- computation -----------------------------------------------------------------------------

    @property
    def _stacked(self) -> int:
        return self.a.ndim - 2

    def dequantize(self) -> jax.Array:
        """The kernel ``a @ b`` (float32 products at full precision), cast to ``dtype``."""
        return _dequantize(
            self.a, self.b, self.dtype, self.layer_shape, self.contracting, self.output
        )

    def dot_general(
        self,
        lhs: ArrayLike,
        dimension_numbers: Any,
        *,
        weight_is_rhs: bool = True,
        preferred_element_type: Any = None,
        precision: Any = None,
        **options: Any,
    ) -> jax.Array:
        """``lax.dot_general`` with this kernel as one operand, as two thin matmuls.

        Args:
          lhs: the other (activation) operand.
          dimension_numbers: as for ``lax.dot_general``, in this leaf's axes (``shape``), with
            the weight on the right (``weight_is_rhs=True``) or on the left.
          weight_is_rhs: which side the weight is on; the output layout follows
            ``lax.dot_general``: (batch, left free, right free), free axes in operand order.
          preferred_element_type: the output dtype (default: the operands' common dtype).
          precision: passed to both ``lax.dot_general`` calls.
          **options: options the runtime passes to every compressed leaf (``mode=`` of
            quantized leaves); they do not apply to a factorization and are ignored.

        Returns:
          ``lax.dot_general(lhs, self.dequantize(), dimension_numbers)`` (or the transposed
          operand order), to float rounding. Fast path: contracting exactly the layer's
          contracting axes (``x @ W`` → ``(x @ a) @ b``) or exactly its output axes (``x @ Wᵀ``
          → ``(x @ bᵀ) @ aᵀ``) with every stacked axis a batch axis; otherwise it dequantizes.
        """
        del options
        lhs = jnp.asarray(lhs)
        (lc, rc), (lb, rb) = dimension_numbers
        if weight_is_rhs:
            xc, wc, xb, wb = tuple(lc), tuple(rc), tuple(lb), tuple(rb)
        else:
            xc, wc, xb, wb = tuple(rc), tuple(lc), tuple(rb), tuple(lb)
        dtype = _compute_dtype(lhs.dtype, self.a.dtype, self.b.dtype)
        out_dtype = preferred_element_type or dtype
        ns = self._stacked
        layer_c = {ns + c for c in self.contracting}
        layer_o = {ns + o for o in self.output}
        fast = set(wb) == set(range(ns)) and set(wc) in (layer_c, layer_o)
        if not fast:
            w = self.dequantize().astype(dtype)
            operands = (lhs.astype(dtype), w) if weight_is_rhs else (w, lhs.astype(dtype))
            return lax.dot_general(
                *operands,
                dimension_numbers,
                precision=precision,
                preferred_element_type=out_dtype,
            )
        y = self._chain(
            lhs.astype(dtype), xc, wc, xb, wb, set(wc) == layer_c, dtype, out_dtype, precision
        )
        if not weight_is_rhs:  # (batch, x free, w free) -> (batch, w free, x free)
            nb, nx = len(xb), lhs.ndim - len(xc) - len(xb)
            nw = y.ndim - nb - nx
            y = jnp.transpose(y, [*range(nb), *range(nb + nx, nb + nx + nw), *range(nb, nb + nx)])
        return y

    def _chain(self, x, xc, wc, xb, wb, contract_in, dtype, out_dtype, precision) -> jax.Array:
        """``(batch, x free, w free)`` of ``x · W`` through the factors; see ``dot_general``.

        The thin intermediate ``x · a`` (``(..., r)``) is kept in the operands' dtype, as a dense
        layer's output would be; the second product accumulates into ``out_dtype``.
        """
        ns = self._stacked
        a, b = self.a.astype(dtype), self.b.astype(dtype)
        # x's contracted axes, ordered like the layer axes they meet, flattened into one axis
        group, free = (
            (self.contracting, self.output) if contract_in else (self.output, self.contracting)
        )
        pairs = dict(zip(wc, xc))
        x_group = [pairs[ns + g] for g in group]
        rest = [d for d in range(x.ndim) if d not in x_group]
        x = jnp.transpose(x, [*rest, *x_group])
        x = x.reshape(*x.shape[: len(rest)], -1)
        xb2 = tuple(rest.index(d) for d in xb)
        first, k1, second, k2 = (a, ns, b, ns) if contract_in else (b, ns + 1, a, ns + 1)
        t = lax.dot_general(x, first, (((x.ndim - 1,), (k1,)), (xb2, wb)), precision=precision)
        # t: (batch, x free, r); the batch axes of ``second`` follow ``wb``'s order
        nb = len(wb)
        y = lax.dot_general(
            t,
            second,
            (((t.ndim - 1,), (k2,)), (tuple(range(nb)), wb)),
            precision=precision,
            preferred_element_type=out_dtype,
        )
        return y.reshape(*y.shape[:-1], *(self.layer_shape[f] for f in free))


def factorable(
    path: str, role: jtree.Role, shape: tuple[int, ...]
) -> tuple[LeafMatrices | None, str | None]:
    """The kernel as stacked ``(in, out)`` matrices, or ``None`` and why it stays dense."""
    if role.kind != "matmul":
        return None, (
            f"kind {role.kind!r}: only matmul kernels are factorized (a rank-r conv is a "
            "different layer, a factored embedding a different gather)"
        )
    ns = len(role.stacked)
    if sorted(role.stacked) != list(range(ns)):
        return None, (
            f"stacked axes {role.stacked} do not lead the kernel; LowRank keeps stacked axes first"
        )
    if len(role.contracting) + len(role.output) + ns != len(shape):
        return None, f"role {role} leaves axes of this rank-{len(shape)} kernel without a meaning"
    return LeafMatrices.of(path, shape, role), None
