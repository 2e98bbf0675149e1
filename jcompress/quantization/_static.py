"""Static activation ranges for W8A8: one calibrated int8 step per quantized matmul.

``jc.compressed(fn, mode="int8")`` multiplies int8 weights by int8 activations. Without
calibration it quantizes every activation row on the fly (dynamic per-token scales: an abs-max
reduction over each row before every matmul). With a *static* step ``a`` stored in a plain
:class:`QArray`'s ``act_scale`` the activations are ``clip(round(x / a), -127, 127)`` directly:
no reduction at run time, and the same integer grid for every row, as integer-only inference
engines require. :func:`calibrate_activations` measures the input range ``r`` of every selected
quantized matmul on calibration batches and sets ``a = r / 127``:

* :class:`AbsMax` (default): ``r = max |X|`` over all rows, channels and batches (nothing
  saturates on the calibration data; one outlier stretches the grid for everyone);
* :class:`Percentile` ``(q)``: ``r`` = the ``q``-th percentile of ``|X|`` over the rows and
  channels of each batch, averaged over the batches weighted by their row counts (values above
  ``r`` saturate; the grid is finer for the rest).

Stacked layers (``nn.scan`` stacks, batch axes of the product) get one step per layer; a leaf
consumed by several products (a tied embedding's logits) gets one range over all its uses; a
``scan`` that reuses one leaf in every iteration merges the iterations like batches.

References:
  Jacob et al., 2018, "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR (static activation ranges).
  Wu, Judd, Zhang, Isaev, Micikevicius, 2020, "Integer Quantization for Deep Learning
  Inference: Principles and Empirical Evaluation", arXiv:2004.09602 (max and percentile
  calibration of activations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.calibration import check_batches
from jcompress.pruning._threshold import kth_smallest
from jcompress.quantization._awq import AWQArray
from jcompress.quantization._qarray import QArray
from jcompress.quantization._spec import AbsMax, Percentile

__all__ = ["calibrate_activations"]

_WHAT = "calibrate_activations"
_LEVELS = 127.0
_ABSMAX = AbsMax()


@dataclasses.dataclass(frozen=True)
class _Range:
    """A ``jc.capture`` summary: ``(range, rows)`` of ``|X|`` per stacked slice.

    ``q=None``: the maximum (merged by ``max``); else the ``q``-th percentile over rows and
    channels (merged as the row-weighted mean).
    """

    q: float | None
    primitives: ClassVar[tuple[str, ...]] = ("dot_general",)

    def of(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = jnp.abs(x.astype(jnp.float32)).reshape(*x.shape[:-2], -1)
        r = jnp.max(a, axis=-1) if self.q is None else _percentile(a, self.q)
        return r, jnp.full(r.shape, x.shape[-2], jnp.float32)

    def merge(self, a: tuple, b: tuple) -> tuple[jax.Array, jax.Array]:
        n = a[1] + b[1]
        if self.q is None:
            return jnp.maximum(a[0], b[0]), n
        return (a[0] * a[1] + b[0] * b[1]) / jnp.maximum(n, 1.0), n

    def over_iterations(self, value: tuple) -> tuple[jax.Array, jax.Array]:
        r, n = value
        total = jnp.sum(n, axis=0)
        if self.q is None:
            return jnp.max(r, axis=0), total
        return jnp.sum(r * n, axis=0) / jnp.maximum(total, 1.0), total


def _percentile(a: jax.Array, q: float) -> jax.Array:
    """``np.percentile(a, q, axis=-1)`` (linear interpolation) of ``a >= 0``, NaN if any NaN."""
    n = a.shape[-1]
    position = q / 100.0 * (n - 1)
    below = int(np.floor(position))
    frac = np.float32(position - below)
    bits = jax.lax.bitcast_convert_type(a, jnp.int32).reshape(-1, n)  # monotone for a >= 0

    def order_statistic(rank: int) -> jax.Array:
        k = kth_smallest(bits, rank).reshape(a.shape[:-1])
        return jax.lax.bitcast_convert_type(k, jnp.float32)

    low = order_statistic(below)
    high = order_statistic(min(below + 1, n - 1)) if frac else low
    r = low + (high - low) * frac
    return jnp.where(jnp.any(jnp.isnan(a), axis=-1), jnp.float32(jnp.nan), r)


def _chosen(qparams: jtree.Params, where: jtree.Where) -> tuple[dict[str, QArray], bool]:
    """``{path: QArray}`` selected, and whether the selection was explicit (then every one
    must work)."""
    if where is None:
        pairs = jtree.leaves_with_paths(qparams)
        return {p: x for p, x in pairs if type(x) is QArray}, False
    chosen = jtree.selection(qparams, where, kinds=("matmul",), what=_WHAT)
    for path, leaf in chosen.leaves.items():
        if isinstance(leaf, AWQArray):
            raise TypeError(
                f"{path}: a {type(leaf).__name__} divides its inputs by its own per-input-channel "
                "input_scale (AWQ) before its QArray; quantize this leaf with quantize/gptq for "
                "static W8A8, or exclude it with where="
            )
        if type(leaf) is not QArray:
            raise TypeError(
                f"{path}: {_WHAT} sets the static activation step of QArray leaves, got "
                f"{type(leaf).__name__}; quantize the parameters first "
                "(jc.quantization.quantize / gptq) or exclude this leaf with where="
            )
    return dict(chosen.leaves), True


def _ranges(fn, qparams, batches, paths, q) -> dict[str, tuple[jax.Array, jax.Array]]:
    from jcompress.runtime._capture import collect_inputs  # calibration imports runtime

    summary = _Range(None if q is None else float(q))
    total: dict[str, tuple[jax.Array, jax.Array]] | None = None
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        got = collect_inputs(fn, qparams, args, summary, paths)
        if total is None:
            total = dict(got)
        else:
            total = {k: summary.merge(total[k], v) for k, v in got.items()}
    if total is None:
        raise ValueError(
            f"{_WHAT}: batches gave no batch; pass a re-iterable of argument tuples (a list)"
        )
    return total


def calibrate_activations(
    fn: Callable[..., Any],
    qparams: jtree.Params,
    batches: Iterable[Any],
    *,
    calibration: AbsMax | Percentile = _ABSMAX,
    where: jtree.Where = None,
) -> jtree.Params:
    """Static int8 activation steps for the quantized matmuls of ``fn`` (W8A8 static).

    Runs ``fn(qparams, *batch)`` (weights dequantized, activations float) over the calibration
    batches, measures the range ``r`` of each selected ``QArray``'s matmul input, and returns
    ``qparams`` with ``act_scale = r / 127`` set on those leaves: ``float32``, ``values``' rank,
    size 1 on every axis except stacked layer axes (one step per layer). Then
    ``jc.compressed(fn, mode="int8")(result, x)`` quantizes those activations as
    ``clip(round(x / act_scale), -127, 127)`` (saturating beyond the calibrated range) instead
    of per token; weight-only modes and ``dequantize`` ignore ``act_scale``. An input that was
    exactly zero on every batch gets the smallest positive normal step (its range is ``[0, 0]``).

    Args:
      fn: ``fn(params, *args)`` (linen: ``lambda p, x: model.apply({"params": p}, x)``).
      qparams: a parameter tree with :class:`QArray` leaves (``quantize`` / ``gptq``).
      batches: a re-iterable (a list) of argument tuples (a bare array is one argument).
      calibration: :class:`AbsMax` (``max |X|`` over every batch) or :class:`Percentile`
        ``(q)`` (the ``q``-th percentile of ``|X|`` per batch, averaged over the batches).
      where: which leaves; default: every plain ``QArray`` that ``fn`` multiplies with
        ``dot_general`` (others are left alone). An explicit selection must name such leaves.

    Returns:
      ``qparams`` with the selected ``QArray`` leaves carrying ``act_scale``; the rest is
      unchanged (the same objects).

    Raises:
      TypeError: a selected leaf that is not a plain ``QArray`` (float leaves; ``AWQArray``,
        which scales its inputs per channel itself), a calibration other than ``AbsMax`` /
        ``Percentile``.
      ValueError: a selected leaf that ``fn`` does not multiply with ``dot_general`` (a
        gather-only embedding, a convolution), NaN/Inf activations (the path named), no batch,
        nothing to calibrate.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec, quantize
    >>> q = quantize({"Dense_0": {"kernel": jnp.ones((3, 2))}}, QuantSpec(bits=8))
    >>> xs = [(jnp.array([[1.0, -2.0, 0.5]]),), (jnp.array([[0.0, 3.0, 1.0]]),)]
    >>> out = calibrate_activations(lambda p, x: x @ p["Dense_0"]["kernel"], q, xs)
    >>> out["Dense_0"]["kernel"].act_scale   # max |x| = 3 over both batches, / 127
    Array([[0.02362205]], dtype=float32)
    """
    if not isinstance(calibration, AbsMax | Percentile):
        raise TypeError(
            f"{_WHAT}: calibration must be AbsMax() or Percentile(q) for activation ranges, "
            f"got {calibration!r}"
        )
    check_batches(batches, None, _WHAT)
    leaves, explicit = _chosen(qparams, where)
    paths = list(leaves)
    if not paths:
        raise ValueError(
            f"{_WHAT}: qparams hold no plain QArray leaf; quantize the matmul weights first "
            "(jc.quantization.quantize(params, QuantSpec(bits=8)))"
        )
    q = calibration.q if isinstance(calibration, Percentile) else None
    ranges = _ranges(fn, qparams, batches, paths, q)
    missing = [p for p in paths if p not in ranges]
    if explicit and missing:
        raise ValueError(
            f"{_WHAT}: {missing[:5]} {'is' if len(missing) == 1 else 'are'} not multiplied by "
            "fn with dot_general (a gather-only embedding, a convolution, an unused leaf): "
            "static activation steps belong to matmul inputs; exclude with where="
        )
    if not ranges:
        raise ValueError(
            f"{_WHAT}: fn multiplies none of the QArray leaves {paths[:5]} with dot_general; "
            "check fn and qparams"
        )
    first = next(iter(batches))
    from jcompress.runtime import roles as infer_roles

    roles = infer_roles(fn, qparams, *(first if isinstance(first, tuple) else (first,)))
    steps = {}
    for path, (r, _) in ranges.items():
        r = np.asarray(r, np.float32)
        if not np.all(np.isfinite(r)):
            raise ValueError(
                f"{path}: {_WHAT} found NaN/Inf in this matmul's inputs on the calibration "
                f"batches (range {r.tolist()}); check the batches and the layers before it"
            )
        leaf = leaves[path]
        stacked = roles[path].stacked
        shape = tuple(leaf.shape[d] if d in stacked else 1 for d in range(len(leaf.shape)))
        step = np.where(r > 0, r / np.float32(_LEVELS), np.finfo(np.float32).tiny)
        steps[path] = QArray(
            leaf.values,
            leaf.scale,
            leaf.zero_point,
            jnp.asarray(step.astype(np.float32).reshape(shape)),
            bits=leaf.bits,
            dtype=leaf.dtype,
        )
    return jtree.map_with_paths(lambda p, x: steps.get(p, x), qparams)
