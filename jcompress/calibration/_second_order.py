"""The second-order maths shared by GPTQ and SparseGPT (Optimal Brain Surgeon updates).

Both methods solve the same layer-wise problem: change a kernel ``W`` so the layer output on
calibration inputs ``X`` moves as little as possible, ``min ||X W - X W'||²``, one input row of
``W`` at a time, feeding each row's error back into the rows not yet processed. The objective's
Hessian is ``H = 2 XᵀX / n`` (``(in, in)``); what the methods need from it is the upper Cholesky
factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``): row ``j`` of ``U`` holds the OBS update of the rows
after ``j`` once rows ``< j`` are fixed, and ``U[j, j]`` the matching diagonal, so no inverse is
ever re-computed.

Layout: kernels are handled in Flax's ``(in, out)`` orientation, so the rows of ``W`` are the
input (contracting) channels that the papers call columns (:class:`LeafMatrices` brings any
leaf there). Everything below is ``float32`` and traceable.

* :func:`hessian`: ``2 · gram / count`` from accumulated ``XᵀX`` (``jc.capture(..., gram=True)``).
* :func:`prepare`: dead inputs (``H[j, j] == 0``: the weight row is zeroed, ``H[j, j] := 1``),
  optional activation order (rows by descending ``diag H``), dampening ``λ = percdamp ·
  mean(diag H)``, padding to whole blocks and the factor ``U`` (with a flag that it is finite:
  a Hessian that is not positive definite after dampening gives a NaN factor).
* :func:`sweep`: the lazy-batch loop of both papers' Algorithm 1. Blocks of ``block`` rows are
  processed row by row with immediate error feedback inside the block; the rows after the block
  receive the block's accumulated errors in one matrix product when it ends. Each block is split
  into segments (a quantization group, an N:M group, or the whole block) and a caller hook runs
  at each segment start on the *current* (updated) rows of the segment: that is where GPTQ
  computes a group's scales and SparseGPT selects a mask adaptively.

References:
  Frantar, Ashkboos, Hoefler, Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers", arXiv:2210.17323 (Algorithm 1).
  Frantar, Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", arXiv:2301.00774 (Algorithm 1).
  Hassibi, Stork, 1993, "Second order derivatives for network pruning: Optimal Brain Surgeon".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jcompress.tree import check_finite

__all__ = [
    "LayerStats",
    "Prepared",
    "block_rows",
    "check_layer",
    "check_options",
    "hessian",
    "output_error",
    "prepare",
    "raise_if_any_failed",
    "raise_if_failed",
    "sweep",
]

_HIGHEST = lax.Precision.HIGHEST


class LayerStats(NamedTuple):
    """What a layer-level calibrated method reports (every field a ``float32``/``bool`` array).

    Attributes:
      loss: the methods' own objective, ``Σ_j ||w_j - ŵ_j||² / (2 U[j, j]²)`` summed over rows
        (GPTQ's "error" printout; the OBS saliency of SparseGPT's pruned weights).
      output_error: ``tr(ΔWᵀ H ΔW) / 2`` with the undamped ``H`` given, ``ΔW = W - Ŵ``: with
        ``H = 2 XᵀX / n`` it is the mean squared layer-output error ``||X ΔW||² / n``.
      ok: ``False`` if ``H`` was not positive definite after dampening (the result is then not
        usable; eagerly this is an error, inside ``jit`` read this flag).
      fallback: ``True`` where the method's plain baseline (GPTQ: round to nearest) had the
        lower ``output_error`` and was returned instead; ``False`` for SparseGPT.
    """

    loss: jax.Array
    output_error: jax.Array
    ok: jax.Array
    fallback: jax.Array = np.False_


class Prepared(NamedTuple):
    """A layer ready for :func:`sweep` (from :func:`prepare`).

    Attributes:
      w: ``(in_pad, out)`` float32, rows in processing order, dead rows zeroed, zero padding.
      u: ``(in_pad, in_pad)`` upper Cholesky factor of the dampened ``H⁻¹`` (identity on padding).
      perm: ``(in,)`` int32, the processing order (``w[r] = W[perm[r]]``); ``arange`` without
        activation order.
      ok: scalar bool, ``u`` is finite.
    """

    w: jax.Array
    u: jax.Array
    perm: jax.Array
    ok: jax.Array


def hessian(gram: ArrayLike, count: ArrayLike) -> jax.Array:
    """``H = 2 · XᵀX / n`` from an accumulated ``gram = XᵀX`` (``(in, in)``) over ``count`` rows.

    >>> import jax.numpy as jnp
    >>> hessian(jnp.eye(2) * 4.0, 8).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    gram = jnp.asarray(gram, jnp.float32)
    return gram * (jnp.float32(2.0) / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0))


def check_options(path: str, *, block_size: Any, percdamp: Any, what: str) -> None:
    """Raise ``ValueError`` naming ``path`` unless ``block_size`` is a positive int and
    ``percdamp`` a finite float ``>= 0``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{path}: {what} needs block_size a positive int, got {block_size!r}")
    if (
        isinstance(percdamp, bool)
        or not isinstance(percdamp, int | float)
        or not (0.0 <= float(percdamp) < float("inf"))
    ):
        raise ValueError(
            f"{path}: {what} needs percdamp a finite float >= 0 (e.g. 0.01), got {percdamp!r}"
        )


def check_layer(
    path: str, w: ArrayLike, h: ArrayLike, *, block_size: Any, percdamp: Any, what: str
) -> tuple[jax.Array, jax.Array]:
    """Validate a layer-level call eagerly; returns ``(w, h)`` as arrays.

    Raises ``ValueError`` / ``TypeError`` naming ``path`` unless ``W`` is a float ``(in, out)``
    kernel without NaN/Inf (checked when concrete), ``H`` is ``(in, in)``, ``block_size`` a
    positive int and ``percdamp`` a finite float ``>= 0``.
    """
    check_options(path, block_size=block_size, percdamp=percdamp, what=what)
    w, h = jnp.asarray(w), jnp.asarray(h)
    if w.ndim != 2 or h.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(
            f"{path}: {what} needs a kernel W of shape (in, out) and a Hessian H of shape "
            f"(in, in), got W {tuple(w.shape)} and H {tuple(h.shape)}; H must come from the "
            "inputs of this layer (jc.capture(..., gram=True)) and W be in Flax's (in, out) "
            "orientation (transpose Equinox (out, in) weights)"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{path}: {what} needs a float kernel, got {w.dtype}")
    check_finite(path, w, what=what)
    return w, h


def block_rows(n: int, block_size: int, segment: int) -> int:
    """``min(block_size, n)`` rounded down to a multiple of ``segment`` (at least ``segment``)."""
    block = min(block_size, n)
    return max(segment, block // segment * segment)


def _upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
    """The upper ``U`` with ``h⁻¹ = UᵀU`` (NaN if ``h`` is not positive definite).

    With ``J`` the order reversal and ``J h J = L Lᵀ`` (lower Cholesky), ``h = Ũ Ũᵀ`` with
    ``Ũ = J L J`` upper, so ``h⁻¹ = (Ũ⁻¹)ᵀ Ũ⁻¹`` and ``U = Ũ⁻¹ = J L⁻¹ J``: one Cholesky and one
    triangular solve, no explicit inverse (the factor is unique, so this is the paper's ``U``).
    """
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    return inv[::-1, ::-1]


def prepare(
    w: jax.Array, h: jax.Array, *, percdamp: float, block: int, act_order: bool
) -> Prepared:
    """Dead inputs, activation order, dampening, padding and ``U`` (traceable).

    Args:
      w: ``(in, out)`` kernel (any float dtype; computed in float32).
      h: ``(in, in)`` Hessian ``2 XᵀX / n`` (only its scale-free structure matters).
      percdamp: ``λ = percdamp · mean(diag H)`` is added to the diagonal.
      block: rows are padded to a multiple of ``block`` (zero weights, identity Hessian).
      act_order: process rows by descending ``diag H`` (stable, so ties keep their order).
    """
    n = w.shape[0]
    w = jnp.asarray(w).astype(jnp.float32)
    h = jnp.asarray(h).astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, jnp.float32(1), jnp.float32(0)))
    w = jnp.where(dead[:, None], jnp.float32(0), w)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True).astype(jnp.int32)
        w = w[perm]
        h = h[perm][:, perm]
    else:
        perm = jnp.arange(n, dtype=jnp.int32)
    damp = jnp.float32(percdamp) * jnp.mean(jnp.diagonal(h))
    h = h + damp * jnp.eye(n, dtype=jnp.float32)
    u = _upper_cholesky_of_inverse(h)
    pad = -n % block
    if pad:
        w = jnp.pad(w, ((0, pad), (0, 0)))
        u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
            jnp.concatenate([jnp.zeros((n,), jnp.float32), jnp.ones((pad,), jnp.float32)])
        )
    return Prepared(w, u, perm, jnp.all(jnp.isfinite(u)))


SegmentFn = Callable[[Any, jax.Array, jax.Array, jax.Array], Any]
ColumnFn = Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]]


def sweep(
    prep: Prepared,
    carry: Any,
    *,
    block: int,
    segment: int,
    on_segment: SegmentFn,
    on_row: ColumnFn,
) -> tuple[Any, jax.Array]:
    """Algorithm 1's loop: rows in order, OBS error feedback, lazy updates across blocks.

    For every block of ``block`` rows (``block % segment == 0``), for every segment of
    ``segment`` rows in it, ``carry = on_segment(carry, rows, start, diag)`` sees the current
    (fully updated) rows ``(segment, out)`` of the segment, the global index ``start`` of its
    first row and ``diag = U[start:start+segment]`` diagonal entries; then for each row ``r``
    ``carry, target = on_row(carry, row, r)`` returns the row's replacement (quantized, pruned),
    its error ``(row - target) / U[r, r]`` is subtracted from the later rows of the block along
    ``U[r]``, and at the block end from every later row at once (``W[i2:] -= U[i1:i2, i2:]ᵀ E``).

    Returns:
      ``(carry, loss)`` with ``loss = Σ ||row - target||² / (2 U[r, r]²)``.
    """
    rows_total = prep.w.shape[0]
    nblocks = rows_total // block
    nseg = block // segment
    u = prep.u
    iota = jnp.arange(rows_total)

    def block_body(b, state):
        w, carry, loss = state
        i1 = b * block
        w1 = lax.dynamic_slice_in_dim(w, i1, block, 0)
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))
        err1 = jnp.zeros_like(w1)

        def seg_body(s, st):
            w1, err1, carry, loss = st
            j0 = s * segment
            rows = lax.dynamic_slice_in_dim(w1, j0, segment, 0)
            diag = lax.dynamic_slice_in_dim(jnp.diagonal(u1), j0, segment, 0)
            carry = on_segment(carry, rows, i1 + j0, diag)

            def row_body(c, st):
                w1, err1, carry, loss = st
                j = j0 + c
                row = w1[j]
                d = u1[j, j]
                carry, target = on_row(carry, row, i1 + j)
                e = (row - target) / d
                w1 = w1 - u1[j][:, None] * e[None, :]
                err1 = err1.at[j].set(e)
                return w1, err1, carry, loss + jnp.sum(e * e) * jnp.float32(0.5)

            return lax.fori_loop(0, segment, row_body, (w1, err1, carry, loss))

        w1, err1, carry, loss = lax.fori_loop(0, nseg, seg_body, (w1, err1, carry, loss))
        later = lax.dynamic_slice_in_dim(u, i1, block, 0)
        later = jnp.where(iota[None, :] >= i1 + block, later, jnp.float32(0))
        w = w - jnp.matmul(later.T, err1, precision=_HIGHEST)
        return w, carry, loss

    _, carry, loss = lax.fori_loop(
        0, nblocks, block_body, (prep.w, carry, jnp.zeros((), jnp.float32))
    )
    return carry, loss


def output_error(w: jax.Array, w_new: jax.Array, h: jax.Array) -> jax.Array:
    """``tr(ΔWᵀ H ΔW) / 2`` (float32) for ``(in, out)`` kernels and an ``(in, in)`` Hessian."""
    delta = jnp.asarray(w).astype(jnp.float32) - jnp.asarray(w_new).astype(jnp.float32)
    hd = jnp.matmul(jnp.asarray(h).astype(jnp.float32), delta, precision=_HIGHEST)
    return jnp.sum(delta * hd) * jnp.float32(0.5)


def raise_if_failed(path: str, stats: LayerStats, what: str, percdamp: float) -> None:
    """Eagerly (concrete ``stats``), raise ``ValueError`` if ``H`` was not positive definite."""
    if isinstance(stats.ok, jax.core.Tracer):
        return
    if not bool(np.asarray(stats.ok)):
        raise ValueError(
            f"{path}: {what} found the Hessian not positive definite after dampening "
            f"(percdamp={percdamp}); it holds NaN/Inf or too few calibration samples for its "
            "size: raise percdamp (e.g. 0.1), calibrate on more data, or check the inputs"
        )


def raise_if_any_failed(path: str, stats: LayerStats, what: str, percdamp: float) -> None:
    """:func:`raise_if_failed` for stacked ``stats`` (one entry per slice), naming the slice."""
    ok = np.asarray(stats.ok).reshape(-1)
    if ok.all():
        return
    s = int(np.argmin(ok))
    one = jax.tree.map(lambda f: np.asarray(f).reshape(-1)[s], stats)
    raise_if_failed(path if ok.size == 1 else f"{path}[slice {s}]", one, what, percdamp)
