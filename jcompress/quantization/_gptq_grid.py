"""GPTQ for the non-integer formats: rows rounded to the nearest value the format can store.

``gptq`` with an ``NF4``, ``Codebook``, ``E4M3`` or ``E5M2`` spec. The round-to-nearest leaf of
the (masked) float weight fixes what can be stored: its tables (NF4's 16 levels, a codebook's
k-means centroids per tensor or output channel) and its scales (NF4's and FP8's abs-max per
block). GPTQ's sweep then rounds each input row in turn to the nearest stored value (nearest
table entry times the block's scale; or the 8-bit float of ``w / scale``) and spreads the
rounding error over the rows not yet rounded, exactly as for integers. The codes it picks
replace the round-to-nearest ones in that leaf, so layout, tables and scales are the ones
``quantize`` gives. Per slice, the round-to-nearest codes are kept where their output error on
the calibration inputs is lower (the integer path's guard).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import calibration
from jcompress import tree as jtree
from jcompress.quantization._float8 import FLOAT8, Float8Array
from jcompress.quantization._lookup import LookupArray, index_dtype
from jcompress.quantization._qarray import broadcast_apply
from jcompress.quantization._quantize import format_leaf
from jcompress.quantization._scales import scale_blocks
from jcompress.quantization._spec import Codebook, QuantSpec

__all__ = ["gptq_format_leaf"]


def _as_matrices(lay, leaf, x, k: int | None = None) -> jax.Array:
    """A per-block child of ``leaf`` (size 1 or full on each axis; blocked scales expanded) as
    ``(S, C, O)`` element-wise values; with ``k``: a table ``(*blocks, k)`` as ``(S, O, k)``
    (tables never vary along contracting axes)."""
    if k is None:
        full = broadcast_apply(lambda v, s: v * s, jnp.ones(leaf.shape, jnp.float32), x)
        return lay.to_matrices(full)
    shape = tuple(1 if a in lay.contracting else n for a, n in enumerate(leaf.shape))
    t = jnp.broadcast_to(x, (*shape, k))
    t = jnp.transpose(t, (*lay.perm, len(shape))).reshape(lay.dims[0], -1, lay.dims[2], k)
    return t[:, 0]


@functools.partial(jax.jit, static_argnames=("kind", "block_size", "percdamp", "act_order"))
def _sweep(w, h, scale, table, ref, mask, *, kind, block_size, percdamp, act_order):
    """GPTQ on one ``(C, O)`` slice: ``(codes (C, O), stats)``. ``scale`` ``(C, O)`` per element;
    ``table`` ``(O, k)`` (lookup formats) or ``(1, 1)`` unused; ``ref`` the round-to-nearest
    codes; ``kind``: ``"lookup"`` or a float8 dtype name."""
    n, out = w.shape
    table = jnp.broadcast_to(table, (out, table.shape[-1]))  # one table per output column
    w0 = jnp.asarray(w).astype(jnp.float32)
    if mask is not None:
        w0 = jnp.where(mask, w0, jnp.float32(0))
    block = calibration.block_rows(n, block_size, 1)
    # (prepare zeroes the rows of dead inputs itself)
    prep = calibration.prepare(w0, h, percdamp=percdamp, block=block, act_order=act_order)
    rows = prep.w.shape[0]
    perm, pad = prep.perm, rows - n
    s_rows = jnp.concatenate([scale[perm], jnp.ones((pad, out), jnp.float32)])
    keep = None
    if mask is not None:
        keep = jnp.concatenate([jnp.asarray(mask, bool)[perm], jnp.ones((pad, out), bool)])

    def encode(v):  # values w / scale -> (codes, the stored values they stand for)
        if kind == "lookup":
            code = jnp.argmin(jnp.abs(v[..., None] - table), axis=-1)
            return code, jnp.take_along_axis(table, code[..., None], axis=-1)[..., 0]
        store = np.dtype(kind)
        fmax = float(jnp.finfo(store).max)
        code = jnp.clip(v, -fmax, fmax).astype(store)
        return code, code.astype(jnp.float32)

    def on_row(codes, row, r):
        code, value = encode(row / s_rows[r])
        target = value * s_rows[r]
        if keep is not None:  # a pruned weight stays exactly zero (zero is stored exactly)
            target = jnp.where(keep[r], target, jnp.float32(0))
            code = jnp.where(keep[r], code, encode(jnp.zeros_like(row))[0])
        return jax.lax.dynamic_update_slice_in_dim(codes, code[None], r, 0), target

    init = jnp.zeros((rows, out), jnp.int32 if kind == "lookup" else np.dtype(kind))
    codes, loss = calibration.sweep(
        prep,
        init,
        block=block,
        segment=block,  # no per-segment work: tables and scales are fixed
        on_segment=lambda carry, *_: carry,
        on_row=on_row,
    )
    codes = codes[:n][jnp.argsort(perm)]

    def decoded(c):
        value = table[jnp.arange(out)[None, :], c] if kind == "lookup" else c
        return value.astype(jnp.float32) * scale

    err = calibration.output_error(w, decoded(codes), h)
    ref_err = calibration.output_error(w, decoded(ref), h)
    fallback = ref_err < err
    codes = jnp.where(fallback, ref, codes)
    err = jnp.minimum(err, ref_err)
    return codes, calibration.LayerStats(loss, err, prep.ok & jnp.isfinite(err), fallback)


@functools.partial(jax.jit, static_argnames=("lay", "kind", "block_size", "percdamp", "act_order"))
def _grid_stack(leaf, stats, extra, *, lay, kind, block_size, percdamp, act_order):
    """:func:`_sweep` on every stacked slice (one compiled program per shape, layout, kind)."""

    def one(w, h, s, t, r, m=None):
        return _sweep(
            w,
            h,
            s,
            t,
            r,
            m,
            kind=kind,
            block_size=block_size,
            percdamp=percdamp,
            act_order=act_order,
        )

    return calibration.per_slice(one, lay, leaf, stats, *extra)


def gptq_format_leaf(
    path: str, leaf: jax.Array, stats: Any, spec: QuantSpec, role: jtree.Role, mask, options
) -> LookupArray | Float8Array:
    """GPTQ on every stacked slice of one leaf for a non-integer ``spec`` (see the module)."""
    fmt = spec.format
    if isinstance(fmt, Codebook) and fmt.init == "kmeans++":
        raise ValueError(
            f"{path}: gptq with Codebook(init='kmeans++') needs a random key, which gptq does "
            "not take; use Codebook(init='density') or 'linear' (deterministic)"
        )
    lay = calibration.LeafMatrices.of(path, leaf.shape, role)
    lay.check_gram(stats)
    w = leaf if mask is None else jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))
    blocks = scale_blocks(path, tuple(leaf.shape), spec, role)
    ref = format_leaf(w, None, spec=spec, blocks=blocks)  # tables and scales: round to nearest
    if isinstance(ref, LookupArray):
        kind, k = "lookup", ref.table.shape[-1]
        table = _as_matrices(lay, ref, ref.table, k)
        scale = ref.scale
        codes = ref.indices.astype(jnp.int32)
    else:
        kind, k = np.dtype(FLOAT8[ref.format]).name, None
        table = jnp.zeros((lay.dims[0], 1, 1), jnp.float32)
        scale = ref.scale
        codes = ref.values
    scale_m = jnp.ones(lay.dims, jnp.float32) if scale is None else _as_matrices(lay, ref, scale)
    extra = [scale_m, table, lay.to_matrices(codes)]
    if mask is not None:
        extra.append(lay.to_matrices(jnp.broadcast_to(mask, leaf.shape)))
    shared = dataclasses.replace(lay, path="")  # one compiled program for every leaf alike
    out, st = _grid_stack(leaf, stats, tuple(extra), lay=shared, kind=kind, **options)
    calibration.raise_if_any_failed(path, st, "GPTQ", options["percdamp"])
    codes = shared.from_matrices(out)
    if isinstance(ref, LookupArray):
        return ref.replace(indices=codes.astype(jnp.uint8).astype(index_dtype(ref.bits)))
    return ref.replace(values=codes)
