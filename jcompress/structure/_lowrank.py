"""Low-rank factorization of matmul kernels: ``W ≈ a @ b``, plain or activation-aware SVD.

A kernel ``W (in, out)`` becomes ``a (in, r) @ b (r, out)``: ``x @ W`` turns into the two
matmuls ``(x @ a) @ b``, which costs fewer multiply-adds **and** fewer bytes exactly when
``r·(in + out) < in·out``; :func:`low_rank` factorizes a layer only then.

* Plain truncated SVD keeps the best rank-``r`` approximation in Frobenius norm
  (Eckart-Young): ``‖W - Ŵ‖² = Σ_{i ≥ r} σᵢ²``.
* With ``stats`` (``XᵀX`` of each layer's input, from ``jcompress.runtime.capture(...,
  gram=True)``) the SVD is *whitened* (SVD-LLM): with the Cholesky factor ``S`` of the dampened
  Gram matrix ``G + λI = S Sᵀ``, ``‖XW - XŴ‖² + λ‖W - Ŵ‖² = ‖Sᵀ(W - Ŵ)‖²``, so truncating the
  SVD of ``Sᵀ W`` and un-whitening (``Ŵ = S⁻ᵀ · trunc_r(Sᵀ W)``) minimises the layer *output*
  error rather than the weight error.

References:
  C. Eckart, G. Young, "The approximation of one matrix by another of lower rank",
  Psychometrika 1936.
  X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value Decomposition
  for Large Language Model Compression", ICLR 2025 (arXiv:2403.07378).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jcompress import tree as jtree

__all__ = ["LayerSavings", "LowRank", "LowRankReport", "low_rank", "low_rank_report"]

RankRules = int | Mapping[str, int | None] | Sequence[tuple[str, int | None]]
"""A rank: one ``int`` for every selected layer, or ordered ``(regex, rank)`` rules (a dict or a
sequence of pairs) matched with ``re.fullmatch`` against the path, first match wins; a ``None``
rank, or no matching rule, leaves the layer dense."""


def _compute_dtype(*dtypes: Any) -> np.dtype:
    """The float dtype two operands meet in, without implicit promotion (strict-safe)."""
    ds = {np.dtype(d) for d in dtypes}
    if len(ds) == 1:
        return ds.pop()
    return max(ds | {np.dtype(np.float32)}, key=lambda d: d.itemsize)


def _nbytes(x: Any) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _dequantize(a, b, dtype, layer_shape, contracting, output) -> jax.Array:
    ns = a.ndim - 2
    m = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    order = contracting + output
    m = m.reshape(*m.shape[:ns], *(layer_shape[d] for d in order))
    inverse = [order.index(d) for d in range(len(order))]
    m = jnp.transpose(m, [*range(ns), *(ns + i for i in inverse)])
    return m.astype(dtype)


# ----------------------------------------------------------------------------------------------
# The compressed leaf
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_with_keys_class
class LowRank(jtree.Compressed):
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

    __slots__ = ("_a", "_b", "_contracting", "_dtype", "_layer_shape", "_output")

    array_fields = ("a", "b")
    static_fields = ("dtype", "layer_shape", "contracting", "output")

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
        self._set(a, b, dtype, layer_shape, contracting, output)

    # -- fields ----------------------------------------------------------------------------------

    @property
    def a(self) -> jax.Array:
        """The left factor ``(*stacked, in, r)``."""
        return self._a

    @property
    def b(self) -> jax.Array:
        """The right factor ``(*stacked, r, out)``."""
        return self._b

    @property
    def rank(self) -> int:
        return int(self._a.shape[-1])

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self._layer_shape

    @property
    def contracting(self) -> tuple[int, ...]:
        return self._contracting

    @property
    def output(self) -> tuple[int, ...]:
        return self._output

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._a.shape[:-2]) + self._layer_shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self._a) + _nbytes(self._b)

    def __repr__(self) -> str:
        return (
            f"LowRank(shape={self.shape}, rank={self.rank}, dtype={self._dtype.name}, "
            f"a={tuple(self._a.shape)}, b={tuple(self._b.shape)})"
        )

    def __getitem__(self, index: int | slice | tuple[int | slice, ...]) -> LowRank:
        """Index stacked (leading) axes: ``lr[i]`` is layer ``i`` of a stacked ``LowRank``."""
        index = index if isinstance(index, tuple) else (index,)
        ns = self._a.ndim - 2
        if len(index) > ns or not all(isinstance(i, int | np.integer | slice) for i in index):
            raise IndexError(
                f"LowRank indexing takes ints and slices on its {ns} stacked axes, got {index!r}; "
                "dequantize() first to index the layer's own axes"
            )
        out = object.__new__(LowRank)
        out._set(
            self._a[index],
            self._b[index],
            self._dtype,
            self._layer_shape,
            self._contracting,
            self._output,
        )
        return out

    # -- computation -----------------------------------------------------------------------------

    @property
    def _stacked(self) -> int:
        return self._a.ndim - 2

    def dequantize(self) -> jax.Array:
        """The kernel ``a @ b`` (float32 products at full precision), cast to ``dtype``."""
        return _dequantize(
            self._a, self._b, self._dtype, self._layer_shape, self._contracting, self._output
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
        dtype = _compute_dtype(lhs.dtype, self._a.dtype, self._b.dtype)
        out_dtype = preferred_element_type or dtype
        ns = self._stacked
        layer_c = {ns + c for c in self._contracting}
        layer_o = {ns + o for o in self._output}
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
        a, b = self._a.astype(dtype), self._b.astype(dtype)
        # x's contracted axes, ordered like the layer axes they meet, flattened into one axis
        group, free = (
            (self._contracting, self._output) if contract_in else (self._output, self._contracting)
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
        return y.reshape(*y.shape[:-1], *(self._layer_shape[f] for f in free))


# ----------------------------------------------------------------------------------------------
# Factorization
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a kernel maps to ``(*stacked, in, out)``, or why it does not."""

    stacked: int = 0
    contracting: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    reason: str | None = None

    def matrix(self, w: jax.Array) -> jax.Array:
        ns = self.stacked
        order = [*range(ns), *(ns + c for c in self.contracting), *(ns + o for o in self.output)]
        w = jnp.transpose(w, order)
        k = math.prod(w.shape[ns : ns + len(self.contracting)])
        return w.reshape(*w.shape[:ns], k, -1)


def _layout(role: jtree.Role, ndim: int) -> _Layout:
    if role.kind != "matmul":
        return _Layout(
            reason=f"kind {role.kind!r}: only matmul kernels are factorized (a rank-r conv is a "
            "different layer, a factored embedding a different gather)"
        )
    ns = len(role.stacked)
    if sorted(role.stacked) != list(range(ns)):
        return _Layout(
            reason=f"stacked axes {role.stacked} do not lead the kernel; LowRank keeps stacked "
            "axes first"
        )
    if len(role.contracting) + len(role.output) + ns != ndim:
        return _Layout(
            reason=f"role {role} leaves axes of this rank-{ndim} kernel without a meaning"
        )
    return _Layout(
        stacked=ns,
        contracting=tuple(sorted(c - ns for c in role.contracting)),
        output=tuple(sorted(o - ns for o in role.output)),
    )


def _rank_rules(rank: Any) -> list[tuple[re.Pattern | None, int | None]]:
    def check(r: Any, where: str) -> int | None:
        if r is None and where:
            return None
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r <= 0:
            raise ValueError(
                f"low_rank: rank{where} must be a positive int, got {r!r}; pass e.g. rank=16 or "
                "energy=0.9"
            )
        return int(r)

    if not isinstance(rank, Mapping | list | tuple):
        return [(None, check(rank, ""))]
    pairs = list(rank.items()) if isinstance(rank, Mapping) else list(rank)
    rules = []
    for item in pairs:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"low_rank: rank rules are (regex, rank) pairs or a {{regex: rank}} dict, got "
                f"{item!r}"
            )
        try:
            rx = re.compile(item[0])
        except re.error as e:
            raise ValueError(f"low_rank: rank rule {item[0]!r} is not a valid regex: {e}") from None
        rules.append((rx, check(item[1], f" for rule {item[0]!r}")))
    if not rules:
        raise ValueError("low_rank: rank= rules are empty; give at least one (regex, rank) pair")
    return rules


def _rank_for(path: str, rules) -> int | None:
    for rx, r in rules:
        if rx is None or rx.fullmatch(path):
            return r
    return None


def _energy_rank(sigma: np.ndarray, energy: float) -> int:
    """Smallest ``r`` whose leading ``σ²`` reach ``energy`` of the total, in every slice."""
    s2 = np.asarray(sigma, np.float64) ** 2
    total = s2.sum(-1, keepdims=True)
    cum = np.cumsum(s2, -1)
    # a relative tolerance of 1e-9 absorbs the summation order (energy=1 keeps the numerical rank)
    r = 1 + np.sum(cum < energy * total - 1e-9 * total, axis=-1)
    return int(min(np.max(r), s2.shape[-1]))


def _gram_of(path: str, stats: Mapping[str, Any], shape: tuple[int, ...]) -> jax.Array:
    if path not in stats:
        near = difflib.get_close_matches(path, [str(k) for k in stats], n=3, cutoff=0.5)
        raise ValueError(
            f"{path}: low_rank(stats=...) has no statistics for this selected kernel"
            + (f" (nearest: {near})" if near else "")
            + "; capture them for every selected layer (jcompress.runtime.capture(fn, params, "
            "*args, gram=True)) or narrow where="
        )
    gram = getattr(stats[path], "gram", None)
    if gram is None:
        raise ValueError(
            f"{path}: the statistics hold no Gram matrix XᵀX; capture them with gram=True"
        )
    if tuple(gram.shape) != shape:
        raise ValueError(
            f"{path}: the Gram matrix has shape {tuple(gram.shape)}, expected {shape} "
            "(*stacked, in, in) for this kernel; were the statistics captured on this model?"
        )
    jtree.check_finite(path, gram, what="low_rank (the Gram statistics)")
    return jnp.asarray(gram, jnp.float32)


@jax.jit
def _plain_svd(m: jax.Array):
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    return u, s, vt, None


@jax.jit
def _whitened_svd(m: jax.Array, gram: jax.Array, damp: jax.Array):
    gram = 0.5 * (gram + jnp.swapaxes(gram, -1, -2))
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
    mean = jnp.mean(diag, axis=-1)[..., None, None]
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    # an all-zero input carries no information: whiten with the identity (plain SVD)
    gram = jnp.where(mean == 0, eye, gram + damp * mean * eye)
    chol = jnp.linalg.cholesky(gram)  # lower: G = S Sᵀ
    u, s, vt = jnp.linalg.svd(jnp.swapaxes(chol, -1, -2) @ m, full_matrices=False)
    return u, s, vt, chol


@functools.partial(jax.jit, static_argnums=4)
def _factors(u, s, vt, chol, r: int):
    root = jnp.sqrt(s[..., :r])
    a = u[..., :, :r] * root[..., None, :]
    if chol is not None:  # un-whiten: a = S⁻ᵀ a
        a = lax.linalg.triangular_solve(chol, a, left_side=True, lower=True, transpose_a=True)
    b = root[..., :, None] * vt[..., :r, :]
    return a, b


def low_rank(
    params: jtree.Params,
    *,
    rank: RankRules | None = None,
    energy: float | None = None,
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
    stats: Mapping[str, Any] | None = None,
    damp: float = 0.01,
) -> jtree.Params:
    """Replace matmul kernels by :class:`LowRank` factors from a truncated (whitened) SVD.

    Each selected kernel is laid out as ``(*stacked, in, out)`` (its contracting axes flattened
    into ``in``, its output axes into ``out``; attention ``DenseGeneral`` kernels and Equinox
    ``(out, in)`` weights included) and factorized per stacked slice. A layer is factorized only
    when the factors cost fewer multiply-adds and bytes than the kernel, ``r·(in + out) <
    in·out``; the others stay dense (see :func:`low_rank_report`). Kernels of kind ``conv`` or
    ``gather`` (selected explicitly with ``where=``), and roles whose stacked axes do not lead,
    stay dense too, with the reason in the report.

    Runs eagerly on concrete parameters (ranks come from singular values; NaN/Inf are checked);
    the returned tree works under ``jit``/``vmap``/``scan`` like any pytree.

    Args:
      params: the parameter tree (linen dict, ``nnx.State``, Equinox arrays, ...).
      rank: a positive int, or ordered ``(regex, rank)`` rules (first match wins; ``None`` or
        no match: dense). Exactly one of ``rank`` and ``energy``.
      energy: keep the smallest rank whose leading squared singular values reach this fraction
        of the total, in ``(0, 1]`` (per stacked slice; a stack takes its largest such rank).
        With ``stats`` these are the whitened singular values: the fraction of output energy.
      where: selection (default: floating matmul kernels; see ``jcompress.tree.select``).
      roles: ``{path: Role}`` (from ``jc.roles``); required for non-Flax layouts and stacks.
      stats: ``{path: InputStats}`` with ``gram`` ``(*stacked, in, in)`` = ``XᵀX`` of each
        selected layer's input (``jcompress.runtime.capture(fn, params, *args, gram=True)``),
        for the activation-aware (whitened) SVD.
      damp: with ``stats``, ``λ = damp · mean(diag(XᵀX))`` is added to the Gram diagonal before
        the Cholesky factorization (the objective becomes ``‖XW - XŴ‖² + λ‖W - Ŵ‖²``); >= 0.

    Returns:
      A tree of ``params``' structure with :class:`LowRank` leaves (factors in the kernel's
      dtype, balanced: ``a = U√Σ``, ``b = √Σ Vᵀ``, whitened ``a = S⁻ᵀU√Σ``).

    Raises:
      ValueError: both or neither of ``rank`` and ``energy``; ``rank <= 0``; ``energy`` outside
        ``(0, 1]``; a selected leaf with NaN/Inf, traced, or missing from ``stats``; a Gram
        matrix of the wrong shape or without ``gram``; a selection that picks nothing.

    >>> import jax, jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)),
    ...                       "bias": jnp.zeros(32)}}
    >>> out = low_rank(params, rank=8)
    >>> out["Dense_0"]["kernel"]
    LowRank(shape=(64, 32), rank=8, dtype=float32, a=(64, 8), b=(8, 32))
    >>> low_rank(params, rank=30)["Dense_0"]["kernel"].shape   # 30·96 >= 64·32: left dense
    (64, 32)
    """
    if (rank is None) == (energy is None):
        raise ValueError(
            "low_rank: give exactly one of rank= (e.g. rank=16) and energy= (e.g. energy=0.9), "
            f"got rank={rank!r}, energy={energy!r}"
        )
    rules = _rank_rules(rank) if rank is not None else None
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, int | float | np.floating):
            raise TypeError(f"low_rank: energy must be a float in (0, 1], got {energy!r}")
        if not 0.0 < float(energy) <= 1.0:
            raise ValueError(
                f"low_rank: energy={energy} is outside (0, 1]; it is the fraction of squared "
                "singular values kept (e.g. energy=0.9)"
            )
    if not (isinstance(damp, int | float) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"low_rank: damp must be a finite float >= 0, got {damp!r}")
    if stats is not None and not isinstance(stats, Mapping):
        raise TypeError(
            f"low_rank: stats must be a {{path: InputStats}} dict, got {type(stats).__name__}"
        )

    selection = jtree.select(params, where, roles=roles, kinds=("matmul",), what="low_rank")
    chosen = jtree.resolve_roles(params, selection, roles)
    plans = {}
    for path, leaf in jtree.leaves_with_paths(params):
        if path not in chosen:
            continue
        if jtree.is_compressed(leaf):
            raise ValueError(
                f"{path}: low_rank needs a float kernel, got a compressed leaf "
                f"{type(leaf).__name__}; dequantize it first or exclude it with where="
            )
        if not jtree.is_concrete(leaf):
            raise ValueError(
                f"{path}: low_rank runs eagerly on concrete parameters (it picks ranks from "
                "singular values and checks NaN/Inf); call it outside jit"
            )
        jtree.check_finite(path, leaf, what="low_rank")
        layout = _layout(chosen[path], np.ndim(leaf))
        gram = None
        if layout.reason is None and stats is not None:
            shape = tuple(np.shape(leaf))
            ns = layout.stacked
            k = math.prod(shape[ns + c] for c in layout.contracting)
            gram = _gram_of(path, stats, (*shape[:ns], k, k))
        plans[path] = (layout, gram)

    def factor(path: str, leaf: Any) -> Any:
        if path not in plans:
            return leaf
        layout, gram = plans[path]
        if layout.reason is not None:
            return leaf
        r_fixed = _rank_for(path, rules) if rules is not None else None
        if rules is not None and r_fixed is None:
            return leaf
        m = layout.matrix(jnp.asarray(leaf).astype(jnp.float32))
        k, n = m.shape[-2:]
        if r_fixed is not None and r_fixed * (k + n) >= k * n:
            return leaf  # not worth it: skip the SVD
        if gram is None:
            u, s, vt, chol = _plain_svd(m)
        else:
            u, s, vt, chol = _whitened_svd(m, gram, jnp.float32(damp))
        if chol is not None and not bool(jnp.all(jnp.isfinite(chol))):
            raise ValueError(
                f"{path}: the dampened Gram matrix is not positive definite (Cholesky failed); "
                f"raise damp= (now {damp}) or check the statistics"
            )
        r = r_fixed if r_fixed is not None else _energy_rank(np.asarray(s), float(energy))
        if r * (k + n) >= k * n:
            return leaf
        a, b = _factors(u, s, vt, chol, r)
        dtype = np.dtype(leaf.dtype)
        shape = tuple(np.shape(leaf))[layout.stacked :]
        return LowRank(
            a.astype(dtype),
            b.astype(dtype),
            dtype=dtype,
            layer_shape=shape,
            contracting=layout.contracting,
            output=layout.output,
        )

    return jtree.map_with_paths(factor, params)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSavings:
    """One kernel in a :class:`LowRankReport`.

    Attributes:
      path: the leaf's path.
      shape: the kernel's shape.
      rank: the factor rank, or ``None`` when the kernel stayed dense.
      params, params_after: parameter counts before and after.
      nbytes, nbytes_after: stored bytes before and after.
      flops, flops_after: multiply-adds per input row, summed over stacked slices
        (``in·out`` dense, ``r·(in + out)`` factored).
      reason: why the kernel stayed dense (``None`` when factored).
    """

    path: str
    shape: tuple[int, ...]
    rank: int | None
    params: int
    params_after: int
    nbytes: int
    nbytes_after: int
    flops: int
    flops_after: int
    reason: str | None = None


def _total(field: str) -> property:
    return property(
        lambda self: sum(getattr(layer, field) for layer in self.layers),
        doc=f"``{field}`` summed over the layers.",
    )


@dataclasses.dataclass(frozen=True)
class LowRankReport:
    """Per-layer ranks and savings of a :func:`low_rank` result, with totals.

    Attributes:
      layers: one :class:`LayerSavings` per selected or factored kernel, in tree order.
    """

    layers: tuple[LayerSavings, ...]

    params = _total("params")
    params_after = _total("params_after")
    nbytes = _total("nbytes")
    nbytes_after = _total("nbytes_after")
    flops = _total("flops")
    flops_after = _total("flops_after")

    @property
    def dense(self) -> dict[str, str]:
        """``{path: reason}`` of the kernels left dense."""
        return {layer.path: layer.reason for layer in self.layers if layer.rank is None}

    def __str__(self) -> str:
        rows = [f"{'path':<36} {'shape':<18} {'rank':>5} {'params':>17} {'MACs/row':>17}"]
        for x in self.layers:
            rank = "-" if x.rank is None else str(x.rank)
            rows.append(
                f"{x.path:<36} {x.shape!s:<18} {rank:>5} {x.params:>8}->{x.params_after:<8} "
                f"{x.flops:>8}->{x.flops_after:<8}"
            )
        rows.append(
            f"{'total':<36} {'':<18} {'':>5} {self.params:>8}->{self.params_after:<8} "
            f"{self.flops:>8}->{self.flops_after:<8}"
        )
        for path, reason in self.dense.items():
            rows.append(f"dense {path}: {reason}")
        return "\n".join(rows)


def low_rank_report(
    params: jtree.Params,
    factored: jtree.Params,
    *,
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
) -> LowRankReport:
    """Ranks, parameter/byte/FLOP savings, and why kernels stayed dense, per layer.

    Compares ``params`` with ``factored = low_rank(params, ...)`` by path. Rows cover every
    :class:`LowRank` leaf of ``factored`` and every kernel the same ``where``/``roles`` select
    (pass those given to :func:`low_rank`). A selected matmul kernel left dense is reported with
    the largest rank that would have saved (``r·(in + out) < in·out``): ``low_rank`` leaves a
    kernel dense only when the rank asked for (or reached by ``energy=``) was not below it, or
    when a ``None`` / no rank rule applied.

    Args:
      params: the original tree.
      factored: the result of :func:`low_rank` on it.
      where: the selection given to :func:`low_rank`.
      roles: the roles given to :func:`low_rank`.

    Returns:
      A :class:`LowRankReport` (``str()`` gives a table).

    >>> import jax, jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.ones((64, 32))}, "b": {"kernel": jnp.ones((4, 4))}}
    >>> rep = low_rank_report(params, low_rank(params, rank=8))
    >>> [(x.path, x.rank, x.params, x.params_after) for x in rep.layers]
    [('a/kernel', 8, 2048, 768), ('b/kernel', None, 16, 16)]
    >>> rep.dense["b/kernel"]
    'no saving rank was chosen: a rank r saves only if r < 2.0 = in·out/(in + out) (in=4, out=4)'
    """
    selection = jtree.select(
        params, where, roles=roles, kinds=("matmul",), what="low_rank_report", allow_empty=True
    )
    chosen = jtree.resolve_roles(params, selection, roles)
    after = jtree.match_paths(params, factored, name="factored")
    layers = []
    for (path, leaf), new in zip(jtree.leaves_with_paths(params), after):
        if path not in chosen and not isinstance(new, LowRank):
            continue
        shape = tuple(np.shape(leaf))
        size = math.prod(shape)
        nbytes = size * np.dtype(leaf.dtype).itemsize
        if isinstance(new, LowRank):
            slices = math.prod(new.a.shape[:-2])
            k, n = new.a.shape[-2], new.b.shape[-1]
            layers.append(
                LayerSavings(
                    path,
                    shape,
                    new.rank,
                    size,
                    slices * new.rank * (k + n),
                    nbytes,
                    new.nbytes,
                    slices * k * n,
                    slices * new.rank * (k + n),
                )
            )
            continue
        role = chosen.get(path)
        layout = _layout(role, len(shape))
        if layout.reason is None:
            ns = layout.stacked
            k = math.prod(shape[ns + c] for c in layout.contracting)
            n = size // max(1, k * math.prod(shape[:ns]))
            reason = (
                f"no saving rank was chosen: a rank r saves only if r < {k * n / (k + n):.1f} "
                f"= in·out/(in + out) (in={k}, out={n})"
            )
        else:
            reason = layout.reason
        layers.append(
            LayerSavings(path, shape, None, size, size, nbytes, nbytes, size, size, reason)
        )
    return LowRankReport(tuple(layers))
