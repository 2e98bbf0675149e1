"""Exact pruning counts and exact selection of the lowest scores: the one place for both.

Two shared mechanisms, and the selections built on them:

* :func:`exact_count`: ``k = round(float32(s) * S)`` with round-half-to-even, computed exactly in
  32-bit integers (x64 is off) from the float32's mantissa and exponent, so it is right for
  ``S > 2**24`` and for a traced ``s`` inside ``jit``.
* :func:`prune_lowest`: keep masks that remove exactly ``k`` entries with the lowest scores, by
  a two-pass histogram refinement over monotone integer keys (no sort): pass 1 counts the top
  15 bits of each key in 32768 buckets and finds the bucket holding the ``k``-th smallest key;
  pass 2 counts the low 16 bits inside that bucket, which pins the exact ``k``-th key ``T``.
  Everything below ``T`` is removed; among keys equal to ``T`` the lowest positions (in the
  documented order) go first, so the count is exact even when every score is equal.

* :func:`lowest` (a pool per row, exact count by :func:`exact_count`), :func:`lowest_sorted`
  (the same by a stable sort, for the small pools of channel groups), :func:`keep_largest` (a
  traced ``k`` per row, sort-based), :func:`nm_keep` (``n`` kept in every ``m``) and
  :func:`kth_smallest` (an order statistic, by the same two histogram passes).

Keys: a non-negative float32's bit pattern read as an int32 is monotone in its value, so
``key = bitcast(abs(score))`` orders scores exactly (``-0.0`` becomes ``+0.0``; NaN keys sort
above ``+inf``). Key ``-1`` marks an entry that must be removed first (already pruned). Ties are
always broken the same way: among equal keys the lowest positions are removed first.
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

__all__ = [
    "PRUNED_KEY",
    "and_previous",
    "exact_count",
    "from_rows",
    "keep_largest",
    "keys_of",
    "kth_smallest",
    "lowest",
    "lowest_sorted",
    "nm_keep",
    "prune_lowest",
    "to_rows",
    "with_previous",
]

PRUNED_KEY = -1
"""The key of an entry that is already pruned: lower than every score's key."""

_MAX_COUNT = 2**31 - 1
_LEVELS = ((16, 15), (0, 16))  # (shift, bits): top 15 bits, then the low 16 bits
_PAIRWISE_MAX_M = 16  # N:M ranks by pairwise comparison up to this m, by a sort above it


def keys_of(scores: jax.Array) -> jax.Array:
    """Monotone int32 keys of ``abs(scores)`` (any float dtype, upcast exactly to float32).

    >>> keys_of(jnp.array([0.0, -0.0, 1.0, -2.0])).tolist()
    [0, 0, 1065353216, 1073741824]
    """
    mag = jnp.abs(jnp.asarray(scores).astype(jnp.float32))
    return lax.bitcast_convert_type(mag, jnp.int32)


def exact_count(sparsity: jax.typing.ArrayLike, size: int) -> jax.Array:
    """``round(float32(sparsity) * size)`` (half to even), exact in int32 arithmetic.

    Args:
      sparsity: a scalar in ``[0, 1]``; concrete or traced. It is read as a float32; values
        below 0 (and NaN) count as 0, values above 1 as 1 (callers validate concrete values).
      size: the static number of entries ``S``, ``0 <= S < 2**31``.

    Returns:
      An int32 scalar ``k``, ``0 <= k <= size``.

    The float32 is ``M * 2**-q`` with a 24-bit integer mantissa ``M`` and ``q >= 24`` for values
    below 1. The product ``M * S`` (up to 55 bits) is built from 12-bit limbs with int32 partial
    products, split into ``hi * 2**24 + lo``; ``k = hi >> (q - 24)`` and the discarded bits are
    compared with one half for the rounding.

    >>> int(exact_count(0.5, 5)), int(exact_count(0.5, 7)), int(exact_count(0.3, 2**24 + 3))
    (2, 4, 5033166)
    """
    size = int(size)
    if not 0 <= size <= _MAX_COUNT:
        raise ValueError(
            f"exact_count: {size} entries exceed the int32 range of the count; prune fewer "
            "weights together (scope='layer' or a narrower where=)"
        )
    s = jnp.asarray(sparsity, jnp.float32)
    bits = lax.bitcast_convert_type(jnp.clip(s, 0.0, 1.0), jnp.int32)
    exponent = (bits >> 23) & 0xFF
    fraction = bits & 0x7FFFFF
    mant = jnp.where(exponent > 0, fraction | 0x800000, fraction)  # < 2**24
    q = jnp.where(exponent > 0, 150 - exponent, 149)  # value = mant * 2**-q
    m0, m1 = mant & 0xFFF, mant >> 12
    s0, s1, s2 = size & 0xFFF, (size >> 12) & 0xFFF, size >> 24  # s2 < 2**7
    # 12-bit limbs of mant * size; every partial product and carry stays below 2**27.
    p0 = m0 * s0
    p1 = m0 * s1 + m1 * s0 + (p0 >> 12)
    p2 = m0 * s2 + m1 * s1 + (p1 >> 12)
    p3 = m1 * s2 + (p2 >> 12)
    lo = (p0 & 0xFFF) | ((p1 & 0xFFF) << 12)  # the low 24 bits
    hi = (p2 & 0xFFF) | (p3 << 12)  # the rest: < 2**31
    t = jnp.clip(q - 24, 0, 31)  # q >= 24 below 1; hi < 2**31 so a shift by 31 leaves 0
    k = hi >> t
    hi_rest = hi - (k << t)
    # Compare the discarded part (hi_rest * 2**24 + lo) with one half (2**(q - 1)).
    half_hi = jnp.where(t > 0, jnp.int32(1) << jnp.maximum(t - 1, 0), 0)
    half_lo = jnp.where(t > 0, 0, 1 << 23)
    above = (hi_rest > half_hi) | ((hi_rest == half_hi) & (lo > half_lo))
    tie = (hi_rest == half_hi) & (lo == half_lo)
    k = k + (above | (tie & ((k & 1) == 1))).astype(jnp.int32)
    k = jnp.where(q > 55, 0, k)  # mant * size < 2**55 <= 2**(q - 1): rounds to 0
    k = jnp.where(s >= 1.0, size, k)
    return jnp.where(jnp.isnan(s) | (s <= 0.0), 0, k).astype(jnp.int32)


def _block_width(n: int, widest: int = 4096) -> int:
    """The largest divisor of ``n`` not above ``widest``: rows of blocks for tie-breaking."""
    for width in range(min(n, widest), 0, -1):
        if n % width == 0:
            return width
    return 1


def _locate(counts: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of ``counts (B, n)``: the first index where the running total reaches ``rank``
    (index 0 for ``rank = 0``), and the total before that index."""
    cum = jnp.cumsum(counts, axis=1)
    index = jnp.sum(cum < rank[:, None], axis=1, dtype=jnp.int32)
    before = jnp.take_along_axis(cum, jnp.maximum(index - 1, 0)[:, None], axis=1)[:, 0]
    return index, jnp.where(index > 0, before, 0)


def _threshold(keys: list[jax.Array], rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row, the ``rank``-th smallest non-negative key (1-based) over every array, and how
    many keys equal to it are among the ``rank`` smallest: two histogram passes, no sort."""
    rows = keys[0].shape[0]
    prefix = jnp.zeros((rows,), jnp.int32)  # the bits of the threshold found so far
    row_base = jnp.arange(rows, dtype=jnp.int32)[:, None]
    for shift, nbits in _LEVELS:
        buckets = 1 << nbits
        hist = jnp.zeros((rows * buckets,), jnp.int32)
        for x in keys:
            inside = (x >= 0) & ((x >> (shift + nbits)) == prefix[:, None])
            bucket = row_base * buckets + ((x >> shift) & (buckets - 1))
            index = jnp.where(inside, bucket, rows * buckets)  # out of range: dropped
            hist = hist.at[index.reshape(-1)].add(1, mode="drop")
        bucket, before = _locate(hist.reshape(rows, buckets), rank)
        rank = rank - before
        prefix = (prefix << nbits) | bucket
    return prefix, rank


def kth_smallest(keys: jax.Array, rank: int) -> jax.Array:
    """The ``rank``-th smallest (0-based) of each row of non-negative int32 ``keys (B, N)``:
    ``(B,)``, by the histogram passes of :func:`prune_lowest` (no sort).

    >>> kth_smallest(jnp.array([[5, 1, 3, 1], [0, 7, 7, 2]], jnp.int32), 2).tolist()
    [3, 7]
    """
    keys = jnp.asarray(keys, jnp.int32)
    rank = jnp.full((keys.shape[0],), int(rank) + 1, jnp.int32)
    return _threshold([keys], rank)[0]


def prune_lowest(
    keys: Sequence[jax.Array], k: jax.typing.ArrayLike, *, maybe_pruned: bool = True
) -> list[jax.Array]:
    """Keep masks removing exactly ``k`` entries per row with the lowest keys, over all arrays.

    Args:
      keys: int32 arrays of shapes ``(B, N_i)``: ``B`` independent rows (stacked slices) shared
        by every array; the arrays of one row form one pool (global scope). Keys are
        :func:`keys_of` values or :data:`PRUNED_KEY`.
      k: int32 of shape ``()`` or ``(B,)``: entries to remove per row, ``0 <= k <= sum_i N_i``.
      maybe_pruned: whether any key may be :data:`PRUNED_KEY` (``False`` saves a pass).

    Returns:
      Bool arrays of the shapes of ``keys``, ``True`` where kept. Per row exactly
      ``max(k, n_pruned)`` entries are removed, ``n_pruned`` the entries with
      :data:`PRUNED_KEY` (they are always removed, first). The kept entries have the largest
      keys; among keys equal to the threshold the lowest positions are removed first, in the
      order: arrays in sequence order, then row-major position inside the array.

    Cost: two histogram passes (scatter-add), one pass counting the threshold's ties per block
    of at most 4096 entries, and the final comparison pass; no sort, no full prefix sum.

    >>> [m] = prune_lowest([jnp.array([[3, 1, 2, 1]], jnp.int32)], 2)
    >>> m.tolist()
    [[True, False, True, False]]
    """
    keys = [jnp.asarray(x, jnp.int32) for x in keys]
    rows = keys[0].shape[0]
    if any(x.ndim != 2 or x.shape[0] != rows for x in keys):
        shapes = [x.shape for x in keys]
        raise ValueError(f"prune_lowest: keys must be (B, N_i) with one B, got {shapes}")
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (rows,))
    if maybe_pruned:
        pruned = sum(jnp.sum(x < 0, axis=1, dtype=jnp.int32) for x in keys)
        k = jnp.maximum(k - pruned, 0)  # entries still to remove among non-negative keys
    prefix, rank = _threshold(keys, k)
    # Remove `rank` of the keys equal to `threshold`, lowest positions first: count the ties
    # per block of `width` entries, find the block where the count reaches `rank`, and rank the
    # ties inside that one block only.
    threshold = prefix[:, None, None]
    blocked = [x.reshape(rows, -1, _block_width(x.shape[1])) for x in keys]
    ties = jnp.concatenate(
        [jnp.sum(b == threshold, axis=2, dtype=jnp.int32) for b in blocked], axis=1
    )
    critical, before = _locate(ties, rank)  # (B,)
    left = (rank - before)[:, None, None]  # ties to remove inside the critical block
    out, offset = [], 0
    for x, b in zip(keys, blocked):
        nblocks = b.shape[1]
        local = critical - offset
        block = jnp.take_along_axis(b, jnp.clip(local, 0, nblocks - 1)[:, None, None], axis=1)
        tie = (block == threshold).astype(jnp.int32)
        inside = ((local >= 0) & (local < nblocks))[:, None, None]
        first = inside & (tie == 1) & (jnp.cumsum(tie, axis=2) - tie < left)  # (B, 1, width)
        position = offset + jnp.arange(nblocks, dtype=jnp.int32)[None, :, None]
        removed_tie = (b == threshold) & (
            (position < critical[:, None, None]) | ((position == critical[:, None, None]) & first)
        )
        out.append(((b > threshold) | ((b == threshold) & ~removed_tie)).reshape(x.shape))
        offset += nblocks
    return out


# ----------------------------------------------------------------------------------------------
# Selections built on the threshold: per row, pooled, sorted, N:M
# ----------------------------------------------------------------------------------------------


def to_rows(x: jax.Array, lead: tuple[int, ...]) -> tuple[jax.Array, tuple]:
    """``x`` with the ``lead`` axes moved first, as ``(prod(lead sizes), rest)``, and the
    layout :func:`from_rows` needs to undo it."""
    perm = tuple(lead) + tuple(a for a in range(x.ndim) if a not in lead)
    y = jnp.transpose(x, perm)
    rows = math.prod(y.shape[: len(lead)])
    return y.reshape(rows, math.prod(y.shape[len(lead) :])), (perm, y.shape)


def from_rows(x: jax.Array, layout: tuple) -> jax.Array:
    """Undo :func:`to_rows`."""
    perm, shape = layout
    return jnp.transpose(x.reshape(shape), tuple(np.argsort(perm)))


def with_previous(keys: jax.Array, previous: Any) -> jax.Array:
    """``keys`` with the entries a previous mask pruned set to :data:`PRUNED_KEY`."""
    if previous is None:
        return keys
    alive = jnp.broadcast_to(jnp.asarray(previous, bool), keys.shape)
    return jnp.where(alive, keys, PRUNED_KEY)


def and_previous(mask: jax.Array, previous: Any) -> jax.Array:
    """``mask`` and a previous mask (``None``: nothing pruned before)."""
    return mask if previous is None else mask & jnp.asarray(previous, bool)


# The kernels are jitted on int32 keys (static layout arguments), so eager calls compile once
# per shape whatever the dtype, and a caller's jit simply inlines them.


@functools.partial(jax.jit, static_argnames=("pruned",))
def lowest(keys: list[jax.Array], sparsity: jax.Array, pruned: bool) -> list[jax.Array]:
    """Keep masks of ``(B, N_i)`` keys pooled per row, ``round(s * sum N_i)`` removed per row
    (:func:`prune_lowest`; ``pruned``: whether any key may be :data:`PRUNED_KEY`)."""
    total = sum(k.shape[1] for k in keys)
    return prune_lowest(keys, exact_count(sparsity, total), maybe_pruned=pruned)


def keep_largest(scores: jax.Array, k: jax.typing.ArrayLike, axis: int = -1) -> jax.Array:
    """Keep mask removing the ``k`` lowest ``scores`` along ``axis`` (ties: lowest index first).

    ``k`` may be traced and broadcasts against the other axes. A stable sort ranks the entries;
    NaN scores rank highest (kept).

    >>> keep_largest(jnp.array([[3.0, 1.0, 2.0, 1.0]]), 2).tolist()
    [[True, False, True, False]]
    """
    order = jnp.argsort(scores, axis=axis, stable=True)
    rank = jnp.argsort(order, axis=axis, stable=True)
    return rank >= jnp.asarray(k, jnp.int32)


def lowest_sorted(keys: list[jax.Array], sparsity: jax.Array) -> list[jax.Array]:
    """:func:`lowest` by a stable sort (:func:`keep_largest`), for small pools (channel groups).

    Same contract (``round(s * N)`` of each row's pooled ``(B, N_i)`` keys removed, or every
    :data:`PRUNED_KEY` if more; ties: lowest position first, arrays in order); a sort of a few
    thousand channels compiles several times faster than the histogram passes.
    """
    flat = jnp.concatenate(keys, axis=1)
    k = jnp.maximum(exact_count(sparsity, flat.shape[1]), jnp.sum(flat == PRUNED_KEY, axis=1))
    keep = keep_largest(flat, k[:, None], axis=1)
    return jnp.split(keep, np.cumsum([x.shape[1] for x in keys])[:-1].tolist(), axis=1)


@functools.partial(jax.jit, static_argnames=("axis", "n", "m"))
def nm_keep(keys: jax.Array, axis: int, n: int, m: int) -> jax.Array:
    """Keep mask of ``n`` in every ``m`` consecutive ``keys`` along ``axis`` (the largest; ties:
    the lowest positions pruned first); :data:`PRUNED_KEY` entries stay pruned.

    >>> nm_keep(jnp.array([1, 4, 3, 2, 0, 0, 0, 0], jnp.int32), 0, 2, 4).tolist()
    [False, True, True, False, False, False, True, True]
    """
    y = jnp.moveaxis(keys, axis, -1)
    grouped = y.reshape(*y.shape[:-1], y.shape[-1] // m, m)
    if m <= _PAIRWISE_MAX_M:
        # rank = how many in the group are kept before me: larger keys, or equal keys at a
        # higher position (equal keys: the lowest positions are pruned first).
        other, me = grouped[..., None, :], grouped[..., :, None]
        later = np.arange(m)[None, :] > np.arange(m)[:, None]
        rank = jnp.sum((other > me) | ((other == me) & later), axis=-1)
        keep = rank < n
    else:
        keep = keep_largest(grouped, m - n)
    keep = keep.reshape(y.shape) & (y != PRUNED_KEY)  # pruned before: stays pruned
    return jnp.moveaxis(keep, -1, axis)
