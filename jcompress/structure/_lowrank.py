"""Low-rank factorization of matmul kernels: ``W ≈ a @ b``, plain or activation-aware SVD.

A kernel ``W (in, out)`` becomes a :class:`~jcompress.structure.LowRank` leaf ``a (in, r) @ b
(r, out)``, worth it exactly when ``r·(in + out) < in·out``; :func:`low_rank` factorizes a layer
only then. A kernel of any layout is seen as stacked ``(in, out)`` matrices by its role
(:class:`jcompress.calibration.LeafMatrices`, shared with the calibrated methods).

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

from jcompress import tree as jtree
from jcompress.calibration import LeafMatrices
from jcompress.structure._lowrank_leaf import LowRank, factorable

__all__ = ["low_rank"]

RankRules = int | Mapping[str, int | None] | Sequence[tuple[str, int | None]]
"""A rank: one ``int`` for every selected layer, or ordered ``(regex, rank)`` rules (a dict or a
sequence of pairs) matched with ``re.fullmatch`` against the path, first match wins; a ``None``
rank, or no matching rule, leaves the layer dense."""


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


def _gram_of(path: str, stats: Mapping[str, Any], matrices: LeafMatrices) -> jax.Array:
    """The Gram matrices ``(*stacked, in, in)`` of a kernel, checked (present, shape, finite)."""
    if path not in stats:
        near = difflib.get_close_matches(path, [str(k) for k in stats], n=3, cutoff=0.5)
        raise ValueError(
            f"{path}: low_rank(stats=...) has no statistics for this selected kernel"
            + (f" (nearest: {near})" if near else "")
            + "; capture them for every selected layer (jcompress.runtime.capture(fn, params, "
            "*args, gram=True)) or narrow where="
        )
    matrices.check_gram(stats[path])
    gram = stats[path].gram
    jtree.check_finite(path, gram, what="low_rank (the Gram statistics)")
    _, k, _ = matrices.dims
    return jnp.asarray(gram, jnp.float32).reshape(*matrices.sizes(matrices.stacked), k, k)


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
    >>> lr = out["Dense_0"]["kernel"]
    >>> type(lr).__name__, lr.shape, lr.rank, lr.a.shape, lr.b.shape
    ('LowRank', (64, 32), 8, (64, 8), (8, 32))
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

    chosen = jtree.selection(params, where, roles=roles, kinds=("matmul",), what="low_rank")
    layers: dict[str, tuple[LeafMatrices, jax.Array | None]] = {}
    for path, role in chosen.roles.items():
        leaf = chosen.leaves[path]
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
        matrices, _ = factorable(path, role, tuple(np.shape(leaf)))
        if matrices is not None:
            gram = None if stats is None else _gram_of(path, stats, matrices)
            layers[path] = (matrices, gram)

    def factor(path: str, leaf: Any) -> Any:
        if path not in layers:
            return leaf
        matrices, gram = layers[path]
        r_fixed = _rank_for(path, rules) if rules is not None else None
        if rules is not None and r_fixed is None:
            return leaf
        stacked = matrices.sizes(matrices.stacked)
        _, k, n = matrices.dims
        if r_fixed is not None and r_fixed * (k + n) >= k * n:
            return leaf  # not worth it: skip the SVD
        m = matrices.to_matrices(jnp.asarray(leaf).astype(jnp.float32)).reshape(*stacked, k, n)
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
        ns = len(matrices.stacked)
        return LowRank(
            a.astype(dtype),
            b.astype(dtype),
            dtype=dtype,
            layer_shape=matrices.shape[ns:],
            contracting=tuple(c - ns for c in matrices.contracting),
            output=tuple(o - ns for o in matrices.output),
        )

    return jtree.map_with_paths(factor, params)
