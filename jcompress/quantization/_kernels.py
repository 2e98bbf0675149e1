"""Matmul formulations for quantized weights (``QArray``); which one runs per backend, batch size
and layout is decided in ``_dispatch.py``.

``QArray.dot_general`` delegates here. A ``QArray`` stands for ``(values - zero_point) * scale``
(``scale``/``zero_point`` of the same rank as ``values``, size 1 on reduced axes; per-group: the
group axis, the last contracting axis, has ``in / size`` entries).

Formulations (``mode=`` / ``formulation=``):

* ``"dequantize"``: materialize the float weight, then a float ``dot_general``. Exact reference;
  on XLA:CPU converting a whole weight costs more than a float matvec reads, while GPU/TPU
  compilers fuse the conversion into the dot.
* ``"chunked"`` (weight-only, exact to float rounding): the same, one K-chunk at a time inside
  a loop (512 rows of the weight per step), so each float chunk stays in cache. The CPU choice
  for per-group weights at larger batches, and on CPUs without an int8 dot instruction.
* ``"limbs"`` (weight-only, exact to float rounding): each activation row is split into three
  int8 limbs ``x ≈ a·(q₀ + q₁/254 + q₂/254²)/127`` (``a`` the row's absolute maximum; residual
  ``<= a·2⁻²⁴``), the limbs are stacked as extra rows and multiplied by the int8 weight in
  ``s8 x s8 -> s32`` dots; scales are applied after the integer reduction. XLA:CPU's integer
  dots (int8 dot-product instructions) are so much faster than its float GEMV/GEMM that three
  integer rows beat one float row.
* ``"int8"`` (weight and activation quantization, W8A8): one limb, i.e. dynamic per-token
  activation quantization ``x ≈ a·q/127`` (or a static step, below). Outputs change by the
  activation rounding (relative error ~``1/254`` per element): a different model, chosen
  explicitly.
* ``"weight_only"``: the dispatch of :func:`formulation` for the backend, batch, weight size,
  granularity and CPU.

How the integer formulations run on CPU depends on the weight's layout (``QArray.layout``):

* output-major (``OutMajor``, made once by :func:`runtime_layout`; or a weight whose contracting
  axes already come last, as Equinox's ``(out, in)``), per-channel scales: ONE integer dot
  over the whole contracting size (reported as ``limbs_nk`` / ``int8_nk``): each output reads
  a contiguous row, and XLA:CPU reads the weight at memory speed;
* contracting-major (Flax's ``(in, out)`` as stored), per channel: a loop over 512-wide K-chunks
  accumulating ``int32`` (exact): one whole-K dot of a K-major int8 weight is slower on XLA:CPU
  than the chunks;
* per group (any layout): one group per loop step, its scales applied to its integer partial
  sum; ``"chunked"`` once ``2·rows`` exceeds the group size (accumulating ``rows x out``
  partial sums per group then costs more than dequantizing chunks);
* sub-byte values are widened to int8 inside the kernel, slowly on XLA:CPU: keep 4-bit values
  in int8 containers at run time (:func:`runtime_layout` or ``widen``: the same RAM as int4
  buffers on XLA:CPU, int8 speed).

Convolutions have no integer path: ``jc.compressed`` dequantizes their kernels
(``QArray.no_conv_reason``).

Static activation steps (``mode="int8"`` only): a plain ``QArray`` whose ``act_scale`` is not
``None`` carries the calibrated activation step ``a`` (``float32``, ``values``' rank, size 1 on
every axis except stacked/batch axes, where it holds one step per layer). ``"int8"`` then
quantizes the activations as ``q = clip(round(x / a), -127, 127)`` (no per-token absmax pass) and
returns ``(q·a) @ dequantize(w)`` computed as ``acc·a·scale`` from the ``s8 x s8 -> s32``
accumulator ``acc``. Activations beyond ``127·a`` SATURATE (clip to ``±127·a``): that is what a
static range means, so calibrate ``a`` on representative inputs. Per-input-channel steps (size > 1
on a contracting axis) are rejected with a ``ValueError``: per-channel smoothing belongs in an
input scale folded into the weight (``AWQArray``, a wrapper that divides the activations by its
``input_scale`` and hands them to its inner ``QArray``, which has no ``act_scale``). A step that
is not finite or not positive gives NaN outputs. In the weight-only modes (``"weight_only"``,
``"limbs"``, ``"chunked"``, ``"dequantize"``) ``act_scale`` is ignored, as by
``QArray.dequantize``; without it ``"int8"`` uses dynamic per-token scales. In both ``"int8"``
variants the zero-point correction uses the quantized activations, so the result is exactly
``(q·step) @ dequantize(w)`` up to float rounding.

Scales blocked along a non-contracting axis, or blocked along several contracting axes, use
``"dequantize"`` (in every mode: the activations are then not quantized).

Integer accumulation is exact while ``127·128·K < 2³¹`` (``K`` the contracted size per group,
up to 131072); larger reductions fall back to ``"dequantize"``. Rows holding NaN/Inf give
NaN rows (the float reference gives NaN or Inf there).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jcompress.quantization._dispatch import FORMULATIONS, MODES, formulation
from jcompress.quantization._qarray import QArray, dequantize_blocks  # noqa: F401 (doctests)

__all__ = ["dot_general"]

_LIMB_BASE = 254.0
# K-chunks of the loop formulations (CPU) over weights whose contracting axes are not the
# trailing ones: XLA:CPU multiplies a whole K-major int8 weight several times slower than the
# same work in 512-row chunks, while an output-major weight is fastest in one dot.
_CHUNK = 512
_MIN_CHUNK = 128
_LOOP_BACKENDS = ("cpu",)
_MAX_K = (2**31 - 1) // (127 * 128)
_N_LIMBS = 3


def _split(dimension_numbers, weight_is_rhs):
    (lc, rc), (lb, rb) = dimension_numbers
    if weight_is_rhs:
        return list(lc), list(rc), list(lb), list(rb)
    return list(rc), list(lc), list(rb), list(lb)


def _dequantized(qarray, lhs, dimension_numbers, weight_is_rhs, out_dtype, w=None):
    """``dot_general`` of ``lhs`` with ``qarray.dequantize()`` (or with ``w`` when given)."""
    w = qarray.dequantize() if w is None else w
    operands = (lhs, w) if weight_is_rhs else (w, lhs)
    dtype = jnp.promote_types(lhs.dtype, w.dtype)
    operands = tuple(o.astype(dtype) for o in operands)
    return lax.dot_general(*operands, dimension_numbers, preferred_element_type=out_dtype)


def _group_axis(qarray, wc) -> int | str | None:
    """The contracting axis carrying per-group scales, ``None`` (per channel) or ``"bad"``."""
    grouped = [a for a in wc if qarray.scale.shape[a] != 1]
    if len(grouped) > 1:
        return "bad"
    return grouped[0] if grouped else None


def _limbs(x: jax.Array, n: int) -> tuple[jax.Array, jax.Array, list[float]]:
    """Split rows ``x (..., K)`` into ``n`` int8 limbs: returns (limbs, row step, limb weights)."""
    a = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    a = jnp.where(a > 0, a, 1.0)
    step = a / 127.0
    r = x / step
    qs, weights = [], []
    for i in range(n):
        q = jnp.clip(jnp.round(r), -127, 127)
        qs.append(q.astype(jnp.int8))
        weights.append(_LIMB_BASE ** (-i))
        r = (r - q) * _LIMB_BASE
    return jnp.stack(qs), step, weights


def dot_general(
    qarray: Any,
    lhs: jax.Array,
    dimension_numbers: Any,
    *,
    weight_is_rhs: bool = True,
    preferred_element_type: Any = None,
    mode: str = "weight_only",
    formulation: str | None = None,
    batch_hint: int | None = None,
) -> jax.Array:
    """``lax.dot_general(lhs, w, dimension_numbers)`` for a quantized weight ``w = qarray``.

    Args:
      qarray: a ``QArray`` in any layout (``values``, ``scale``, optional ``zero_point`` /
        ``act_scale``, ``dequantize()``).
      lhs: the float operand.
      dimension_numbers: as for ``lax.dot_general`` with the weight on the right
        (``weight_is_rhs=True``) or on the left, in the float array's axes (``qarray.shape``).
      weight_is_rhs: which side the weight is on; the output order follows ``lax.dot_general``
        (batch, left free, right free).
      preferred_element_type: the output dtype (default: the promoted float dtype).
      mode: ``"weight_only"`` (dispatch, or the forced ``formulation``) or ``"int8"``; a
        formulation name is accepted here too (``mode="limbs"``).
      formulation: force a weight-only formulation (``"dequantize"``, ``"chunked"``,
        ``"limbs"``) instead of the dispatch: for benchmarks and tests.
      batch_hint: the number of activation rows to dispatch on (default: read from ``lhs``).

    Returns:
      The product, in ``lax.dot_general``'s output layout.

    Raises:
      ValueError: an unknown ``mode`` or ``formulation``, ``formulation`` with ``mode="int8"``,
        or a static activation step of the wrong shape.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QArray
    >>> w = QArray(jnp.array([[1, -2], [3, 4]], jnp.int8), jnp.array([[0.5, 0.25]]), bits=8,
    ...            dtype=jnp.float32)
    >>> dot_general(w, jnp.array([[1.0, 2.0]]), (((1,), (0,)), ((), ())), formulation="limbs")
    Array([[3.5, 1.5]], dtype=float32)
    """
    if formulation is not None:
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        if mode != "weight_only":
            raise ValueError(f"formulation= applies to mode='weight_only' only, got {mode!r}")
        mode = formulation
    elif mode == "fp8":
        raise ValueError(
            "mode='fp8' multiplies 8-bit float weights (QuantSpec(format=E4M3()) or E5M2(), "
            f"Float8Array leaves); this integer QArray takes mode {MODES}: quantize this leaf "
            "to E4M3, or give it another mode"
        )
    elif mode not in MODES and mode not in FORMULATIONS:
        raise ValueError(f"mode must be one of {MODES} (or 'fp8' for FP8 leaves), got {mode!r}")
    qarray, dn, order = _stored_axes(qarray, dimension_numbers, weight_is_rhs)
    xc, wc, xb, wb = _split(dn, weight_is_rhs)
    if mode == "int8" and getattr(qarray, "act_scale", None) is not None:
        _check_static_step(qarray, wc, wb)
    rows = batch_hint or int(
        np.prod([lhs.shape[d] for d in range(lhs.ndim) if d not in xc and d not in xb])
    )
    chosen = _resolve(qarray, lhs, dn, weight_is_rhs, mode, rows)
    name = f"{chosen}_nk" if chosen in ("limbs", "int8") and _one_dot(qarray, wc) else chosen
    if chosen in ("limbs", "int8"):
        path = "int"
    else:
        path = "float" if chosen == "dequantize" and jax.default_backend() == "cpu" else "fused"
    from jcompress.runtime._explain import kernel_scope

    with kernel_scope(name, path):
        if chosen in ("dequantize", "chunked"):  # differentiable as they are
            out = _dot(qarray, lhs, dn, weight_is_rhs, preferred_element_type, chosen)
        else:
            out = _integer_dot(qarray, lhs, dn, weight_is_rhs, preferred_element_type, chosen)
    return _free_axes_back(out, order, lhs.ndim, xc, xb, wc, wb, weight_is_rhs)


def _stored_axes(qarray, dimension_numbers, weight_is_rhs):
    """``(q, dn, order)``: ``qarray`` as a canonical-layout ``QArray`` over its stored arrays
    (no copy), the dimension numbers in stored axes (hashable nested tuples), and ``order``
    (stored axis ``i`` is float-array axis ``order[i]``; ``None`` when already canonical)."""
    (lc, rc), (lb, rb) = jax.tree.map(int, dimension_numbers, is_leaf=lambda x: x is None)
    layout = getattr(qarray, "layout", None)
    order = None
    if layout is not None:
        order = layout.stored_order(len(qarray.shape))
        where = {axis: i for i, axis in enumerate(order)}
        if weight_is_rhs:
            rc, rb = [where[a] for a in rc], [where[a] for a in rb]
        else:
            lc, lb = [where[a] for a in lc], [where[a] for a in lb]
        qarray = qarray.replace(layout=None)
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return qarray, dn, order


def _free_axes_back(out, order, lhs_ndim, xc, xb, wc, wb, weight_is_rhs):
    """The weight's free axes of ``out`` from stored order to the float array's order."""
    if order is None:
        return out
    w_free = [order[d] for d in range(len(order)) if d not in wc and d not in wb]
    perm = sorted(range(len(w_free)), key=lambda k: w_free[k])
    if perm == list(range(len(perm))):
        return out
    nb, nx = len(wb), lhs_ndim - len(xc) - len(xb)
    start = nb + nx if weight_is_rhs else nb
    axes = list(range(out.ndim))
    axes[start : start + len(perm)] = [start + k for k in perm]
    return jnp.transpose(out, axes)


def _one_dot(qarray, wc) -> bool:
    """Whether the integer formulations run as one dot (no K loop): per-channel scales and the
    contracting axes last in ``values`` (output-major), so each output reads contiguous rows."""
    n = qarray.values.ndim
    return _group_axis(qarray, wc) is None and sorted(wc) == list(range(n - len(wc), n))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _integer_dot(qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen):
    """The integer formulations, with the float derivative
    ``d(lhs) @ dequantize(w) + lhs @ ((values - zero_point) * d(scale))``.

    Rounding the activations into limbs has a zero derivative; the tangent rule gives the
    derivative of the float product they stand for (for ``"int8"``: a straight-through
    estimator). The integer values have none; the scale has its exact one (trained through
    ``jc.tree.partition(..., scales=True)``), computed only when the scale is differentiated.
    """
    return _dot(qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen)


@functools.partial(_integer_dot.defjvp, symbolic_zeros=True)
def _integer_dot_jvp(dimension_numbers, weight_is_rhs, preferred_element_type, chosen, p, t):
    qarray, lhs = p
    t_qarray, t_lhs = t
    out = _integer_dot(
        qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen
    )
    tangent = jnp.zeros(out.shape, out.dtype)
    if not isinstance(t_lhs, SymbolicZero):
        tangent += _dequantized(qarray, t_lhs, dimension_numbers, weight_is_rhs, out.dtype)
    t_scale = t_qarray.scale
    if not isinstance(t_scale, SymbolicZero):
        d_w = dequantize_blocks(qarray.values, t_scale, qarray.zero_point, qarray.dtype)
        tangent += _dequantized(qarray, lhs, dimension_numbers, weight_is_rhs, out.dtype, d_w)
    return out, tangent


def _resolve(qarray, lhs, dimension_numbers, weight_is_rhs, mode, rows) -> str:
    """The formulation actually used: the dispatch, then what the weight's layout allows."""
    values = qarray.values
    _, wc, _, wb = _split(dimension_numbers, weight_is_rhs)
    wf = [d for d in range(values.ndim) if d not in wc and d not in wb]
    ga = _group_axis(qarray, wc)
    k_total = math.prod(values.shape[a] for a in wc)
    group = k_total if ga in (None, "bad") else k_total // qarray.scale.shape[ga]
    grouped = ga is not None and ga != "bad"
    chosen = formulation(mode, rows, size=math.prod(values.shape), grouped=grouped, group=group)
    if (
        ga == "bad"
        or any(qarray.scale.shape[d] not in (1, values.shape[d]) for d in (*wb, *wf))
        or (group > _MAX_K and chosen != "chunked")
        or not jnp.issubdtype(values.dtype, jnp.integer)
    ):
        return "dequantize"
    return chosen


def _check_static_step(qarray, wc, wb) -> None:
    """``act_scale`` as a static activation step: size 1 except on stacked (batch) axes."""
    a, shape = qarray.act_scale, qarray.values.shape
    if len(a.shape) != len(shape):
        raise ValueError(
            f"act_scale of shape {tuple(a.shape)} must have the weight's rank {len(shape)} "
            "(size 1 on every axis except stacked layer axes)"
        )
    for d, size in enumerate(a.shape):
        if size == 1 or (d in wb and size == shape[d]):
            continue
        if d in wc:
            raise ValueError(
                f"act_scale of shape {tuple(a.shape)} has {size} entries on contracting axis {d}: "
                "per-input-channel static activation steps are not supported by the integer path "
                "of mode='int8'; give one step per layer (size 1 on every non-stacked axis), and "
                "put per-channel smoothing in an input scale folded into the weight (AWQArray)"
            )
        raise ValueError(
            f"act_scale of shape {tuple(a.shape)} has {size} entries on axis {d} of a weight of "
            f"shape {tuple(shape)}: a static activation step has size 1 on every axis except "
            "stacked layer axes (full size there)"
        )


def _static_step(qarray, wb, bt: int) -> jax.Array:
    """The static activation step as ``(bt, 1, 1)`` float32 (one per stacked slice)."""
    a = qarray.act_scale.astype(jnp.float32)
    a = jnp.broadcast_to(a, [qarray.values.shape[d] if d in wb else 1 for d in range(a.ndim)])
    a = jnp.transpose(a, [*wb, *(d for d in range(a.ndim) if d not in wb)])
    return a.reshape(bt, 1, 1)


def _chunk(size: int, multiple: int = 1) -> int:
    """The K-chunk of the loop formulations along a contracting axis of ``size``: the largest
    divisor <= 512 that is a multiple of ``multiple`` (the group size; a larger group is one
    chunk), or the whole axis when there is none >= 128 or the backend does not loop."""
    if jax.default_backend() not in _LOOP_BACKENDS or size <= _CHUNK:
        return size
    if multiple >= _CHUNK:
        return multiple
    best = max(c for c in range(multiple, _CHUNK + 1, multiple) if size % c == 0)
    return best if best >= _MIN_CHUNK or multiple > 1 else size


def _canonical(t, values_shape, wb, wf) -> jax.Array:
    """A scale-like array (size 1 or blocks on contracting axes, size 1 or full elsewhere) as
    ``(groups, bt, 1, n)``, broadcast over stacked and output axes."""
    wc = [d for d in range(t.ndim) if d not in wb and d not in wf]
    t = jnp.broadcast_to(t, [t.shape[d] if d in wc else values_shape[d] for d in range(t.ndim)])
    g = math.prod(t.shape[d] for d in wc)
    bt = math.prod(values_shape[d] for d in wb)
    return jnp.transpose(t, [*wc, *wb, *wf]).reshape(g, bt, 1, -1)


def _loop(n: int, body, init):
    """``body(i, carry)`` for ``i < n``: a rolled loop (one compiled body), inline when n == 1."""
    if n == 1:
        return body(0, init)
    return lax.fori_loop(0, n, body, init)


def _dot(qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen):
    xc, wc, xb, wb = _split(dimension_numbers, weight_is_rhs)
    values = qarray.values
    out_dtype = preferred_element_type or jnp.promote_types(lhs.dtype, qarray.dtype)
    if chosen == "dequantize":
        return _dequantized(qarray, lhs, dimension_numbers, weight_is_rhs, out_dtype)
    xf = [d for d in range(lhs.ndim) if d not in xc and d not in xb]
    wf = [d for d in range(values.ndim) if d not in wc and d not in wb]
    ga = _group_axis(qarray, wc)
    bshape = [values.shape[a] for a in wb]
    kshape = [values.shape[a] for a in wc]
    bt, n, k_total = math.prod(bshape), math.prod(values.shape[a] for a in wf), math.prod(kshape)
    m = math.prod(lhs.shape[d] for d in xf)
    nb = len(wb)
    # the loop runs along one contracting axis: the group axis, else the longest one
    ka = ga if ga is not None else max(wc, key=lambda a: values.shape[a])
    j = wc.index(ka)
    n_groups = 1 if ga is None else qarray.scale.shape[ga]
    group = values.shape[ka] // n_groups
    s = _canonical(qarray.scale.astype(jnp.float32), values.shape, wb, wf)  # (G, bt, 1, n)
    zp = getattr(qarray, "zero_point", None)
    x = jnp.transpose(lhs.astype(jnp.float32), [*xb, *xf, *xc]).reshape(*bshape, m, *kshape)
    # contracting: x axes nb+1.. <-> wc, batch: x axes ..nb <-> wb; out (*b, rows, *free)
    dims = ((tuple(range(nb + 1, nb + 1 + len(wc))), tuple(wc)), (tuple(range(nb)), tuple(wb)))

    def w_slice(t, i, c, axis=ka):
        return lax.dynamic_slice_in_dim(t, i * c, c, axis=axis)

    if chosen == "chunked":  # float: dequantize one K-chunk at a time (cache-sized)
        c = _chunk(values.shape[ka], group if n_groups > 1 else 1)
        per = c // group  # scale entries per chunk along ka (1 for per-channel)
        n_s = qarray.scale.shape[ka] > 1

        def body(i, y):
            zc = None if zp is None else (w_slice(zp, i, per) if n_s else zp)
            sc = w_slice(qarray.scale, i, per) if n_s else qarray.scale
            w = dequantize_blocks(w_slice(values, i, c), sc, zc, jnp.float32)
            xi = w_slice(x, i, c, axis=nb + 1 + j)
            return y + lax.dot_general(xi, w, dims).reshape(bt, m, n)

        y = _loop(values.shape[ka] // c, body, jnp.zeros((bt, m, n), jnp.float32))
        return _to_output(y, values, lhs, wb, wf, xf, weight_is_rhs, out_dtype)

    n_limbs = 1 if chosen == "int8" else _N_LIMBS
    xk = x.reshape(bt, m, k_total)
    if chosen == "int8" and getattr(qarray, "act_scale", None) is not None:
        step = _static_step(qarray, wb, bt)  # (bt, 1, 1): calibrated, saturating
        q = jnp.clip(jnp.round(xk / step), -127, 127)
        q, weights = q.astype(jnp.int8)[None], [1.0]
        finite = jnp.all(jnp.isfinite(xk), axis=2, keepdims=True) & (step > 0)
    else:
        q, step, weights = _limbs(xk, n_limbs)  # (L, bt, m, K)
        finite = jnp.isfinite(step)
    xq = q[0]  # the quantized activations (int8 mode: all of them)
    rows = max(n_limbs * m, 2)  # XLA:CPU's one-row integer dot is slow: use two rows
    q = jnp.moveaxis(q, 0, 1).reshape(bt, n_limbs * m, k_total)
    q = jnp.pad(q, ((0, 0), (0, rows - n_limbs * m), (0, 0))).reshape(*bshape, rows, *kshape)

    def int_dot(i, c):
        v = w_slice(values, i, c)
        if v.dtype != jnp.int8:  # sub-byte values widen per chunk (int8 containers: no-op)
            v = v.astype(jnp.int8)
        acc = lax.dot_general(
            w_slice(q, i, c, axis=nb + 1 + j), v, dims, preferred_element_type=jnp.int32
        )
        return acc.reshape(bt, rows, n)

    if n_groups == 1:  # exact int32 accumulation across chunks, scales after the loop
        c = values.shape[ka] if _one_dot(qarray, wc) else _chunk(values.shape[ka])
        body = lambda i, acc: acc + int_dot(i, c)
        acc = _loop(values.shape[ka] // c, body, jnp.zeros((bt, rows, n), jnp.int32))
        y = acc.astype(jnp.float32) * s[0]
    else:  # one group per step: its scale applied to its integer partial sum
        body = lambda i, y: y + int_dot(i, group).astype(jnp.float32) * s[i]
        y = _loop(n_groups, body, jnp.zeros((bt, rows, n), jnp.float32))
    y = y[:, : n_limbs * m].reshape(bt, n_limbs, m, n)
    y = sum(y[:, i] * w for i, w in enumerate(weights)) * step
    if zp is not None:
        z = _canonical(zp.astype(jnp.float32), values.shape, wb, wf)[:, :, 0]  # (G, bt, n)
        if n_limbs == 1:  # the quantized activations, exactly: (q·step) @ dequantize(w)
            xsum = _group_sums(xq.astype(jnp.int32), kshape, j, n_groups).astype(jnp.float32)
            xsum = xsum * step
        else:
            xsum = _group_sums(xk, kshape, j, n_groups)  # (bt, m, G)
        y = y - jnp.einsum("bmg,gbn->bmn", xsum, z * s[:, :, 0])
    y = jnp.where(finite, y, jnp.nan)
    return _to_output(y, values, lhs, wb, wf, xf, weight_is_rhs, out_dtype)


def _group_sums(xk, kshape, j: int, n_groups: int) -> jax.Array:
    """Row sums of ``xk (bt, m, K)`` per group along contracting axis ``j``: ``(bt, m, G)``."""
    bt, m = xk.shape[:2]
    shape = [*kshape[:j], n_groups, kshape[j] // n_groups, *kshape[j + 1 :]]
    t = xk.reshape(bt, m, *shape)
    return jnp.sum(t, axis=[2 + a for a in range(len(shape)) if a != j])


def _to_output(y, values, lhs, wb, wf, xf, weight_is_rhs, out_dtype) -> jax.Array:
    """``y (bt, m, n)`` in ``lax.dot_general``'s output layout and dtype."""
    out_shape = (
        *[values.shape[a] for a in wb],
        *[lhs.shape[d] for d in xf],
        *[values.shape[a] for a in wf],
    )
    y = y.reshape(out_shape)
    if not weight_is_rhs:
        nb, nx = len(wb), len(xf)
        perm = [*range(nb), *range(nb + nx, len(out_shape)), *range(nb, nb + nx)]
        y = jnp.transpose(y, perm)
    return y.astype(out_dtype)
