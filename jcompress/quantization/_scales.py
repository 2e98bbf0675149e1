"""Scales: which elements share a scale (scale blocks), how the clipping range is chosen
(calibration), and rounding to integers. Everything here is traceable and vectorised over
channels/groups.

Conventions (``qmin, qmax = spec.levels``, all arithmetic in ``float32``):

* symmetric: ``scale = clip_hi * float32(1 / qmax)``,
  ``q = clip(round(w * (1 / scale)), -qmax, qmax)``;
* asymmetric: ``scale = (clip_hi - clip_lo) * float32(1 / (qmax - qmin))`` with
  ``clip_lo <= 0 <= clip_hi`` (so 0.0 is in range),
  ``zero_point = clip(qmin + round(-clip_lo * (1 / scale)), qmin, qmax)``,
  ``q = clip(round(w * (1 / scale)) + zero_point, qmin, qmax)``;
* ``dequantize = (q - zero_point) * scale``; rounding is half-to-even (``jnp.round``).

Reciprocals are written out (``1 / scale`` once per block, then multiplications) because XLA
rewrites a division by a broadcast into exactly that inside some fusions and not others, and no
product feeds an addition (XLA may contract it into a fused multiply-add); spelled out, jit, eager
and a NumPy float32 reference agree bit for bit. Unclipped elements satisfy
``|w - dequantize| <= scale / 2`` up to float32 rounding (a few ulp of ``|w|``).

Edge cases: an all-zero block gets ``scale = 1`` (values 0, exact zeros back); scales are at least
``finfo(float32).tiny`` (no subnormal scales, so ``w / scale`` never overflows); a block holding
NaN/Inf gets ``scale = NaN`` and values 0, so it dequantizes to NaN (visible, flagged by
:func:`jcompress.quantization.nonfinite`) instead of to finite garbage.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.quantization._qarray import broadcast_apply, dequantize_blocks, storage_dtype
from jcompress.quantization._spec import MSE, Percentile, PerChannel, PerGroup, QuantSpec

__all__ = ["ScaleBlocks", "Scales", "compute_scales", "fake_quant", "scale_blocks", "to_int"]

_TINY = float(np.finfo(np.float32).tiny)


class Scales(NamedTuple):
    """Frozen calibration of one leaf: ``scale`` (``float32``, the ``QArray.scale`` shape) and
    ``zero_point`` (``None`` when symmetric, else integers of the values' container dtype)."""

    scale: jax.Array
    zero_point: jax.Array | None = None


class ScaleBlocks(NamedTuple):
    """How a leaf of ``shape`` is split into blocks that share one scale (hashable, static).

    ``split_shape`` is ``shape`` with the group axis split into ``(n, size)`` (``PerGroup``) or
    ``shape`` itself; ``reduce_axes`` are the axes of ``split_shape`` each block spans;
    ``scale_shape`` is the ``QArray.scale`` shape; ``stacked`` the leaf's stacked (layer) axes,
    which every child of a compressed leaf carries at full size (``vmap``/``scan`` over layers).
    """

    split_shape: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    scale_shape: tuple[int, ...]
    stacked: tuple[int, ...] = ()


def scale_blocks(
    path: str, shape: tuple[int, ...], spec: QuantSpec, role: jtree.Role
) -> ScaleBlocks:
    """The blocks of a leaf that share one scale; a ``PerGroup`` size that does not divide is an
    error.

    >>> from jcompress.tree import Role
    >>> dense = Role("matmul", (0,), (1,))
    >>> scale_blocks("k", (64, 10), QuantSpec(granularity=PerGroup(16)), dense)
    ScaleBlocks(split_shape=(4, 16, 10), reduce_axes=(1,), scale_shape=(4, 10), stacked=())
    >>> conv = Role("conv", (0, 1, 2), (3,))
    >>> scale_blocks("k", (3, 3, 64, 8), QuantSpec(granularity=PerGroup(32)), conv).scale_shape
    (3, 3, 2, 8)
    """
    shape = tuple(int(d) for d in shape)
    kept = set(role.stacked)
    if isinstance(spec.granularity, PerChannel | PerGroup):
        kept |= set(role.output)
    if not isinstance(spec.granularity, PerGroup):
        scale_shape = tuple(d if a in kept else 1 for a, d in enumerate(shape))
        reduce_axes = tuple(a for a in range(len(shape)) if a not in kept)
        return ScaleBlocks(shape, reduce_axes, scale_shape, tuple(role.stacked))
    size = spec.granularity.size
    if not role.contracting:
        raise ValueError(
            f"{path}: PerGroup({size}) needs a contracting axis, but the leaf's role is {role}; "
            "pass roles= with its contracting axes, or give it PerChannel() with a rule"
        )
    g = role.group_axis
    if shape[g] % size:
        divisors = [d for d in range(2, min(shape[g], 512) + 1) if shape[g] % d == 0]
        raise ValueError(
            f"{path}: PerGroup({size}) needs the group axis {g} (the last contracting axis, size "
            f"{shape[g]}, leaf shape {shape}) divisible by {size}; use a size dividing "
            f"{shape[g]} (e.g. {divisors[-4:]}), or give this leaf another spec with a rule "
            f"like ({path!r}, QuantSpec(granularity=PerChannel())). No padding is done."
        )
    n = shape[g] // size
    split = (*shape[:g], n, size, *shape[g + 1 :])
    scale_shape = (*shape[:g], n, *shape[g + 1 :])
    return ScaleBlocks(split, (g + 1,), scale_shape, tuple(role.stacked))


# ----------------------------------------------------------------------------------------------
# Ranges and scales
# ----------------------------------------------------------------------------------------------


def _range(w: jax.Array, axes: tuple[int, ...], spec: QuantSpec):
    """``(lo, hi)`` per block (keepdims), ``lo <= 0 <= hi``; symmetric: ``lo == -hi``."""
    cal = spec.calibration
    zero = jnp.zeros((), jnp.float32)
    if isinstance(cal, Percentile) and cal.q < 100:
        q = float(cal.q)
        if spec.symmetric:
            hi = jnp.percentile(jnp.abs(w), q, axis=axes, keepdims=True)
            return -hi, hi
        hi = jnp.maximum(jnp.percentile(w, q, axis=axes, keepdims=True), zero)
        lo = jnp.minimum(jnp.percentile(w, 100.0 - q, axis=axes, keepdims=True), zero)
        return lo, hi
    if spec.symmetric:
        hi = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
        return -hi, hi
    hi = jnp.maximum(jnp.max(w, axis=axes, keepdims=True), zero)
    lo = jnp.minimum(jnp.min(w, axis=axes, keepdims=True), zero)
    return lo, hi


def _scale_zero_point(lo, hi, ratio, bad, spec: QuantSpec):
    """Scale and zero point (float32; ``None`` if symmetric) clipping at ``ratio * [lo, hi]``."""
    qmin, qmax = spec.levels
    hi = hi * ratio
    lo = lo * ratio
    one = jnp.ones((), jnp.float32)
    # Multiplications by float32 reciprocals, not divisions: XLA rewrites divisions by constants
    # and by broadcasts into these in some fusions, so writing them out keeps jit, eager and
    # NumPy identical (and leaves no a*b - c that a fused multiply-add could round differently).
    if spec.symmetric:
        scale = hi * jnp.float32(1 / qmax)
    else:
        inv_span = jnp.float32(1 / (qmax - qmin))
        span = hi - lo  # overflows only for ranges beyond float32's: then the slower form
        scale = jnp.where(jnp.isfinite(span), span * inv_span, hi * inv_span - lo * inv_span)
    scale = jnp.where(scale > 0, jnp.maximum(scale, jnp.float32(_TINY)), one)
    scale = jnp.where(bad, jnp.float32(jnp.nan), scale)
    if spec.symmetric:
        return scale, None
    # qmin + round(-lo / scale), not round(qmin - lo / scale): no multiply feeding an add, which
    # XLA may fuse into one multiply-add and round differently from NumPy (and jit from eager).
    zp = jnp.clip(jnp.float32(qmin) + jnp.round(-lo * (1 / scale)), qmin, qmax)
    return scale, jnp.where(bad, jnp.zeros((), jnp.float32), zp)


def _round(w, scale, zp, spec: QuantSpec):
    """Unclipped integer levels ``round(w * (1 / scale)) (+ zero_point)`` as ``float32``."""
    q = jnp.round(w * (1 / scale))
    return q if zp is None else q + zp


def _clip(q, spec: QuantSpec):
    qmin, qmax = spec.levels
    return jnp.where(jnp.isnan(q), jnp.zeros((), jnp.float32), jnp.clip(q, qmin, qmax))


def _block_error(w, lo, hi, ratio, bad, axes, spec: QuantSpec, dtype):
    """Squared reconstruction error per block of what ``dequantize`` returns (in ``dtype``),
    normalised by the block's range (no overflow)."""
    scale, zp = _scale_zero_point(lo, hi, ratio, bad, spec)
    q = _clip(_round(w, scale, zp, spec), spec)
    deq = ((q if zp is None else q - zp) * scale).astype(dtype).astype(jnp.float32)
    norm = jnp.maximum(hi, -lo)
    inv = jnp.where(norm > 0, 1 / norm, jnp.ones((), jnp.float32))
    return jnp.sum(jnp.square((deq - w) * inv), axis=axes, keepdims=True)


def _mse_ratio(w, lo, hi, bad, axes, spec: QuantSpec, dtype):
    """Per-block clipping ratio from ``spec.calibration.grid`` minimising the block error."""
    cal = spec.calibration
    step = jnp.float32((1.0 - cal.min_ratio) / (cal.grid - 1))
    one = jnp.ones(lo.shape, jnp.float32)
    best_err = _block_error(w, lo, hi, one, bad, axes, spec, dtype)

    def body(i, carry):
        best_ratio, best_err = carry
        ratio = 1 - i.astype(jnp.float32) * step
        err = _block_error(w, lo, hi, ratio, bad, axes, spec, dtype)
        better = err < best_err
        return jnp.where(better, ratio, best_ratio), jnp.where(better, err, best_err)

    ratio, _ = jax.lax.fori_loop(1, cal.grid, body, (one, best_err))
    return ratio


@functools.partial(jax.jit, static_argnames=("spec", "blocks"))
def compute_scales(w: jax.Array, *, spec: QuantSpec, blocks: ScaleBlocks) -> Scales:
    """Calibrate one leaf: :class:`Scales` of ``blocks.scale_shape`` (zero point in the container
    dtype)."""
    dtype = w.dtype
    w = w.astype(jnp.float32).reshape(blocks.split_shape)
    axes = blocks.reduce_axes
    if isinstance(spec.calibration, Percentile) and spec.calibration.q < 100:
        # Sorting ignores the NaN-propagation the max/min below rely on: check explicitly.
        bad = jnp.logical_not(jnp.all(jnp.isfinite(w), axis=axes, keepdims=True))
        lo, hi = _range(jnp.where(jnp.isfinite(w), w, jnp.zeros((), jnp.float32)), axes, spec)
    else:
        # max/min propagate NaN and keep Inf: a non-finite block has a non-finite extreme, so
        # one reduction pass finds both the range and the flag.
        lo, hi = _range(w, axes, spec)
        bad = jnp.logical_not(jnp.isfinite(lo) & jnp.isfinite(hi))
        lo = jnp.where(bad, jnp.zeros((), jnp.float32), lo)
        hi = jnp.where(bad, jnp.zeros((), jnp.float32), hi)
    if isinstance(spec.calibration, MSE):
        ratio = _mse_ratio(w, lo, hi, bad, axes, spec, dtype)
    else:
        ratio = jnp.ones((), jnp.float32)
    scale, zp = _scale_zero_point(lo, hi, ratio, bad, spec)
    scale = scale.reshape(blocks.scale_shape)
    if zp is not None:
        zp = zp.reshape(blocks.scale_shape).astype(jnp.int8).astype(storage_dtype(spec.bits))
    return Scales(scale, zp)


def to_int(w: jax.Array, scales: Scales, spec: QuantSpec):
    """``(values in the container dtype, inside)``: ``inside`` is False where ``w`` was clipped."""

    def fn(w, s, zp):
        return _round(w, s, None if zp is None else zp.astype(jnp.float32), spec)

    q = broadcast_apply(fn, w.astype(jnp.float32), scales.scale, scales.zero_point)
    qmin, qmax = spec.levels
    inside = (q >= qmin) & (q <= qmax)
    values = _clip(q, spec).astype(jnp.int8).astype(storage_dtype(spec.bits))
    return values, inside


def fake_quant(w: jax.Array, scales: Scales, spec: QuantSpec):
    """``(dequantize(quantize(w)) in w's dtype, inside)`` without building a ``QArray``."""
    values, inside = to_int(w, scales, spec)
    return dequantize_blocks(values, scales.scale, scales.zero_point, w.dtype), inside
