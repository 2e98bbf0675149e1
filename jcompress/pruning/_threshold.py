"""Exact pruning counts and exact, sort-free selection of the lowest scores.

Two shared mechanisms (DESIGN §4: "exact thresholds exist once"):

* :func:`exact_count`: ``k = round(float32(s) * S)`` with round-half-to-even, computed exactly in
  32-bit integers (x64 is off) from the float32's mantissa and exponent, so it is right for
  ``S > 2**24`` and for a traced ``s`` inside ``jit``.
* :func:`prune_lowest`: keep masks that remove exactly ``k`` entries with the lowest scores, by
  a two-pass histogram refinement over monotone integer keys (no sort): pass 1 counts the top
  15 bits of each key in 32768 buckets and finds the bucket holding the ``k``-th smallest key;
  pass 2 counts the low 16 bits inside that bucket, which pins the exact ``k``-th key ``T``.
  Everything below ``T`` is removed; among keys equal to ``T`` the lowest positions (in the
  documented order) go first, so the count is exact even when every score is equal.

Keys: a non-negative float32's bit pattern read as an int32 is monotone in its value, so
``key = bitcast(abs(score))`` orders scores exactly (``-0.0`` becomes ``+0.0``; NaN keys sort
above ``+inf``). Key ``-1`` marks an entry that must be removed first (already pruned).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["PRUNED_KEY", "exact_count", "keys_of", "prune_lowest"]

PRUNED_KEY = -1
"""The key of an entry that is already pruned: lower than every score's key."""

_MAX_COUNT = 2**31 - 1
_LEVELS = ((16, 15), (0, 16))  # (shift, bits): top 15 bits, then the low 16 bits


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
    rank = k
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
