"""The tables of the lookup formats: ``NF4`` (abs-max blocks, nearest of 16 fixed levels) and
``Codebook`` (Lloyd's k-means per tensor or output channel). Traceable, jitted, vectorised over
channels; never the integer kernels.

Conventions (all arithmetic in ``float32``):

* NF4 (Dettmers et al., QLoRA, 2023): ``scale = absmax(block)`` (an all-zero block gets 1, a
  subnormal one ``finfo(float32).tiny``), ``index = nearest level of w * (1 / scale)`` (a value
  exactly between two levels takes the lower one), ``dequantize = level[index] * scale``.
* Codebook (Han et al., "Deep Compression", ICLR 2016): each table's weights are divided by
  their abs-max (so sums never overflow), clustered into ``2**bits`` entries by Lloyd's
  algorithm (assign each weight to its nearest entry, move each entry to the mean of its
  weights; an entry left without weights stays where it is), and the entries are multiplied back.
  A table whose weights hold exact zeros fixes entry 0 at ``0.0``: the zeros are assigned to it
  and never move an entry (pruned weights stay exactly zero and take no centroid); non-zero
  weights may still round to it when it is their nearest entry.

Edge cases: a block or table holding NaN/Inf gets a NaN scale (NF4) or table (Codebook) and
dequantizes to NaN, as ``QArray`` blocks do (:func:`jcompress.quantization.nonfinite`).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.quantization._lookup import NF4_LEVELS, LookupArray, index_dtype
from jcompress.quantization._scales import ScaleBlocks
from jcompress.quantization._spec import NF4, Codebook, QuantSpec

__all__ = ["codebook_table", "leaf_key", "lookup_leaf"]

_TINY = float(np.finfo(np.float32).tiny)
_NF4_ZERO = int(np.flatnonzero(NF4_LEVELS == 0.0)[0])


def _nearest(x: jax.Array, sorted_table: jax.Array) -> jax.Array:
    """Index of the nearest entry of an ascending ``sorted_table`` for every element of ``x``
    (ties between two entries: the lower one)."""
    mids = sorted_table[:-1] * 0.5 + sorted_table[1:] * 0.5  # no overflow for huge entries
    return jnp.searchsorted(mids, x, side="left").astype(jnp.int32)


def _abs_scale(absmax: jax.Array) -> jax.Array:
    """A positive finite scale for a block's abs-max (1 for all-zero blocks, NaN for NaN/Inf)."""
    one = jnp.ones((), jnp.float32)
    scale = jnp.where(absmax > 0, jnp.maximum(absmax, jnp.float32(_TINY)), one)
    return jnp.where(jnp.isfinite(absmax), scale, jnp.float32(jnp.nan))


@functools.partial(jax.jit, static_argnames=("blocks",))
def _nf4_leaf(w: jax.Array, *, blocks: ScaleBlocks) -> LookupArray:
    x = w.astype(jnp.float32).reshape(blocks.split_shape)
    scale = _abs_scale(jnp.max(jnp.abs(x), axis=blocks.reduce_axes, keepdims=True))
    r = x * (1 / scale)
    levels = jnp.asarray(NF4_LEVELS)
    idx = jnp.where(jnp.isnan(r), _NF4_ZERO, _nearest(r, levels))
    indices = idx.reshape(w.shape).astype(jnp.uint8).astype(index_dtype(4))
    # the 16 levels, repeated per stacked layer (every child carries the layer axes)
    layers = tuple(w.shape[a] if a in blocks.stacked else 1 for a in range(w.ndim))
    table = jnp.broadcast_to(levels, (*layers, levels.size))
    return LookupArray(
        indices, table, scale.reshape(blocks.scale_shape), bits=4, dtype=w.dtype, format="NF4"
    )


# ----------------------------------------------------------------------------------------------
# Codebooks: 1-D k-means of one table's weights
# ----------------------------------------------------------------------------------------------


def _init(x, nz, key, *, n: int, init: str, zero_centre: bool) -> jax.Array:
    """``n`` initial entries from the non-zero weights ``x[nz]`` (``x``: 1-D, in [-1, 1]).

    ``zero_centre``: an entry at 0.0 exists already (k-means++ counts it as chosen).
    """
    m = jnp.sum(nz)
    if init == "linear":
        lo = jnp.min(jnp.where(nz, x, jnp.inf))
        hi = jnp.max(jnp.where(nz, x, -jnp.inf))
        t = jnp.linspace(0.0, 1.0, n, dtype=jnp.float32) if n > 1 else jnp.full((1,), 0.5)
        c = lo * (1 - t) + hi * t
    elif init == "density":
        ordered = jnp.sort(jnp.where(nz, x, jnp.inf))
        q = (jnp.arange(n, dtype=jnp.float32) + 0.5) * jnp.float32(1 / n)
        pos = jnp.floor(q * m.astype(jnp.float32)).astype(jnp.int32)
        c = ordered[jnp.clip(pos, 0, jnp.maximum(m - 1, 0))]
    else:  # "kmeans++": D² sampling (Arthur and Vassilvitskii, 2007)
        d = jnp.square(x) if zero_centre else jnp.full(x.shape, jnp.inf)

        def pick(i, carry):
            c, d, key = carry
            key, sub = jax.random.split(key)
            # no entry yet: uniform over the non-zero weights; else proportional to D²
            logits = jnp.where(jnp.isinf(d), 0.0, jnp.log(d + jnp.float32(1e-30)))
            j = jax.random.categorical(sub, jnp.where(nz, logits, -jnp.inf))
            return c.at[i].set(x[j]), jnp.minimum(d, jnp.square(x - x[j])), key

        c, _, _ = jax.lax.fori_loop(0, n, pick, (jnp.zeros(n, jnp.float32), d, key))
    return jnp.where(m > 0, c, jnp.zeros((), jnp.float32))


def codebook_table(
    w: jax.Array, key: jax.Array | None, *, k: int, init: str, iters: int | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(table (k,), indices int32 like w)``: Lloyd's k-means of one table's 1-D weights ``w``.

    >>> import jax.numpy as jnp
    >>> table, idx = codebook_table(jnp.array([0.0, 1.0, 1.2, -2.0, 0.0]), None, k=4,
    ...                             init="density", iters=10)
    >>> table[idx]   # the zeros kept exactly (entry 0), three entries for the non-zero weights
    Array([ 0. ,  1. ,  1.2, -2. ,  0. ], dtype=float32)
    """
    finite = jnp.all(jnp.isfinite(w))
    w = jnp.where(jnp.isfinite(w), w.astype(jnp.float32), jnp.zeros((), jnp.float32))
    nz = w != 0
    has_zero = jnp.any(~nz)
    scale = _abs_scale(jnp.max(jnp.abs(w)))
    x = w * (1 / scale)
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    full = _init(x, nz, k1, n=k, init=init, zero_centre=False)
    rest = _init(x, nz, k2, n=k - 1, init=init, zero_centre=True)
    c = jnp.where(has_zero, jnp.concatenate([jnp.zeros(1, jnp.float32), rest]), full)
    fixed = has_zero & (jnp.arange(k) == 0)
    weight = nz.astype(jnp.float32)

    def assign(c):
        order = jnp.argsort(c)
        a = order[_nearest(x, c[order])]
        return jnp.where(has_zero & ~nz, 0, a)

    def step(_, c):
        a = assign(c)
        sums = jax.ops.segment_sum(x * weight, a, num_segments=k)
        counts = jax.ops.segment_sum(weight, a, num_segments=k)
        mean = sums / jnp.maximum(counts, 1.0)
        return jnp.where((counts > 0) & ~fixed, mean, c)

    c = jax.lax.fori_loop(0, iters, step, c)
    idx = jnp.where(finite, assign(c), 0)
    return jnp.where(finite, c * scale, jnp.float32(jnp.nan)), idx


@functools.partial(jax.jit, static_argnames=("bits", "init", "blocks"))
def _codebook_leaf(w, key, iters, *, bits: int, init: str, blocks: ScaleBlocks) -> LookupArray:
    # ``iters`` is traced: specs differing only in it share one compiled program
    reduce = blocks.reduce_axes
    kept = tuple(a for a in range(w.ndim) if a not in reduce)
    perm = kept + reduce
    rows = int(np.prod([w.shape[a] for a in kept], dtype=np.int64))
    x = jnp.transpose(w, perm).reshape(rows, -1)
    keys = None if key is None else jax.random.split(key, rows)
    k = 2**bits
    one = functools.partial(codebook_table, k=k, init=init, iters=iters)
    tables, idx = jax.vmap(one, in_axes=(0, None if keys is None else 0))(x, keys)
    idx = jnp.transpose(idx.reshape([w.shape[a] for a in perm]), np.argsort(perm))
    indices = idx.astype(jnp.uint8).astype(index_dtype(bits))
    table = tables.reshape((*blocks.scale_shape, k))
    return LookupArray(indices, table, bits=bits, dtype=w.dtype, format="Codebook")


def leaf_key(key: jax.Array | None, path: str) -> jax.Array | None:
    """The key of one leaf: ``key`` folded with a hash of its path (stable across trees)."""
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def lookup_leaf(
    w: jax.Array, key: jax.Array | None, *, spec: QuantSpec, blocks: ScaleBlocks
) -> LookupArray:
    """The :class:`LookupArray` of one leaf for an ``NF4`` or ``Codebook`` spec (``key``: the
    leaf's own, for ``Codebook(init="kmeans++")``)."""
    if isinstance(spec.format, NF4):
        return _nf4_leaf(w, blocks=blocks)
    fmt = spec.format
    if isinstance(fmt, Codebook):
        key = key if fmt.init == "kmeans++" else None
        iters = jnp.asarray(fmt.iters, jnp.int32)
        return _codebook_leaf(w, key, iters, bits=spec.bits, init=fmt.init, blocks=blocks)
    raise ValueError(f"{spec.format!r} is not a lookup format")  # pragma: no cover
