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
* per group, group-major (``GroupMajor``, made once by :func:`runtime_layout` for groups of 128
  or more: ``(..., G, out, g)``): up to 4 activation rows (12 limb rows) ONE batched integer
  dot over all groups (``limbs_groups`` / ``int8_groups``: ``(G, out, g) x (G, rows, g) ->
  (G, out, rows)``, the limbs computed directly in that layout), each group's partial sums
  scaled and summed in one fusion; more rows: one dot per group in a loop, each reading its
  contiguous block;
* per group, other layouts: one group per loop step, its scales applied to its integer partial
  sum; ``"chunked"`` once ``2·rows`` exceeds the group size (accumulating ``rows x out``
  partial sums per group then costs more than dequantizing chunks) and at every batch for
  groups of 32 or fewer;
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
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jcompress.quantization._dispatch import FORMULATIONS, MODES, formulation
from jcompress.quantization._qarray import GroupMajor, QArray, dequantize_blocks  # noqa: F401

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


def _row_step(x: jax.Array) -> jax.Array:
    """The limb step of rows ``x (..., K)``: their absolute maximum / 127 (1/127 for zero rows;
    NaN/Inf for rows holding them)."""
    a = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    return jnp.where(a > 0, a, 1.0) / 127.0


def _limbs(r: jax.Array, n: int, axis: int = 0) -> tuple[jax.Array, list[float]]:
    """Split ``r = x / step`` (``|r| <= 127``) into ``n`` int8 limbs stacked along ``axis``:
    ``r ≈ Σ_i weights[i]·q_i`` (one limb: ``round(r)`` clipped, a static step's saturation)."""
    qs, weights = [], []
    for i in range(n):
        q = jnp.clip(jnp.round(r), -127, 127)
        qs.append(q)
        weights.append(_LIMB_BASE ** (-i))
        r = (r - q) * _LIMB_BASE
    return jnp.stack(qs, axis).astype(jnp.int8), weights


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
    if isinstance(getattr(qarray, "layout", None), GroupMajor):
        out = _group_major(
            qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, mode, batch_hint
        )
        if out is not None:
            return out
        qarray = qarray.canonical()  # a product the layout does not serve: canonical (a copy)
    qarray, dn, order = _stored_axes(qarray, dimension_numbers, weight_is_rhs)
    xc, wc, xb, wb = _split(dn, weight_is_rhs)
    if mode == "int8" and getattr(qarray, "act_scale", None) is not None:
        _check_static_step(qarray.act_scale, qarray.values.shape, wc, wb)
    rows = batch_hint or _rows(lhs, xc, xb)
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


def _rows(lhs, xc, xb) -> int:
    """Activation rows: the product of ``lhs``'s free axes."""
    return math.prod(lhs.shape[d] for d in range(lhs.ndim) if d not in xc and d not in xb)


def _group_major(qarray, lhs, dimension_numbers, weight_is_rhs, out_dtype, mode, batch_hint):
    """``dot_general`` of a ``GroupMajor`` weight when the product contracts its group axis
    alone, maps its leading axes to batch axes in order and leaves its output axes free, and the
    formulation is an integer one; ``None`` otherwise (the caller goes canonical)."""
    layout = qarray.layout
    (lc, rc), (lb, rb) = jax.tree.map(int, dimension_numbers, is_leaf=lambda x: x is None)
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    xc, wc, xb, wb = _split(dn, weight_is_rhs)
    shape = qarray.shape
    lead = len(shape) - layout.axes
    full = [d for d in range(len(shape)) if d != lead]  # scales there: shared or per element
    scale_shape = layout.canonical_shape(qarray.scale.shape)
    if (
        wc != [lead]
        or wb != list(range(lead))
        or any(scale_shape[d] not in (1, shape[d]) for d in full)
    ):
        return None
    if mode == "int8" and qarray.act_scale is not None:
        _check_static_step(qarray._to_canonical(qarray.act_scale), shape, wc, wb)
    rows = batch_hint or _rows(lhs, xc, xb)
    group = shape[lead] // layout.groups
    chosen = formulation(
        mode, rows, size=math.prod(shape), grouped=True, group=group, group_major=True
    )
    if chosen not in ("limbs", "int8") or group > _MAX_K:
        return None
    if (1 if chosen == "int8" else _N_LIMBS) * rows <= _GROUPS_MAX_ROWS:
        chosen += "_groups"  # one batched dot over every group
    from jcompress.runtime._explain import kernel_scope

    with kernel_scope(chosen, "int"):
        return _integer_dot(qarray, lhs, dn, weight_is_rhs, out_dtype, chosen)


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
        d_w = qarray._to_canonical(d_w)  # a GroupMajor weight keeps its layout here
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


def _check_static_step(a, shape, wc, wb) -> None:
    """``act_scale`` ``a`` (canonical axes of a weight of ``shape``) as a static activation
    step: size 1 except on stacked (batch) axes."""
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


def _steps(act_scale, shape, wb, xk) -> tuple[jax.Array, jax.Array]:
    """``(step, finite)`` of the activation rows ``xk (bt, m, K)``, both ``(bt, m or 1, 1)``:
    the static step ``act_scale`` (canonical axes, one per stacked slice: calibrated and
    saturating) when given, else each row's own (:func:`_row_step`); ``finite`` flags the rows
    that give numbers."""
    if act_scale is None:
        step = _row_step(xk)
        return step, jnp.isfinite(step)
    a = act_scale.astype(jnp.float32)
    a = jnp.broadcast_to(a, [shape[d] if d in wb else 1 for d in range(a.ndim)])
    a = jnp.transpose(a, [*wb, *(d for d in range(a.ndim) if d not in wb)])
    step = a.reshape(xk.shape[0], 1, 1)
    return step, jnp.all(jnp.isfinite(xk), axis=2, keepdims=True) & (step > 0)


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
    if isinstance(getattr(qarray, "layout", None), GroupMajor):
        return _group_major_dot(
            qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen
        )
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
        return _to_output(y, values.shape, lhs, wb, wf, xf, weight_is_rhs, out_dtype)

    n_limbs = 1 if chosen == "int8" else _N_LIMBS
    xk = x.reshape(bt, m, k_total)
    act = getattr(qarray, "act_scale", None) if chosen == "int8" else None
    step, finite = _steps(act, values.shape, wb, xk)
    q, weights = _limbs(xk / step, n_limbs)  # (L, bt, m, K)
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
    if zp is not None:
        zp = _canonical(zp.astype(jnp.float32), values.shape, wb, wf)[:, :, 0]  # (G, bt, n)
    sums = lambda t: _group_sums(t, kshape, j, n_groups)
    y = _combine(y, weights, step, finite, m, xq, xk, sums, zp, s[:, :, 0])
    return _to_output(y, values.shape, lhs, wb, wf, xf, weight_is_rhs, out_dtype)


def _combine(y, weights, step, finite, m, xq, xk, group_sums, zp, s) -> jax.Array:
    """The float result ``(bt, m, n)`` of the scaled integer sums ``y (bt, rows, n)`` (limb
    ``i`` in rows ``i·m ..``): limbs weighted and summed, times the row step; the zero point's
    share ``Σ_G xsum[G]·z[G]·s[G]`` subtracted (``zp``, ``s``: ``(G, bt, n)``, ``group_sums``
    of ``(bt, m, K)`` rows: ``(bt, m, G)``); NaN rows where the activations were not finite."""
    bt, n = y.shape[0], y.shape[-1]
    y = y[:, : len(weights) * m].reshape(bt, len(weights), m, n)
    y = sum(y[:, i] * w for i, w in enumerate(weights)) * step
    if zp is not None:
        if len(weights) == 1:  # the quantized activations, exactly: (q·step) @ dequantize(w)
            xsum = group_sums(xq.astype(jnp.int32)).astype(jnp.float32) * step
        else:
            xsum = group_sums(xk)  # (bt, m, G)
        y = y - jnp.einsum("bmg,gbn->bmn", xsum, zp * s)
    return jnp.where(finite, y, jnp.nan)


# An activation's limb rows up to which a GroupMajor weight is multiplied by one batched integer
# dot over every group (batch 1-4 with three limbs); more rows loop over the groups. Measured
# with forced formulations on 4096x4096 PerGroup(128) chains (2-core x86, one process): the
# batched dot 1.8-1.9x float32 at batch 1 where the loop runs 1.0-1.2x, equal at batch 4, 0.9x
# at batch 16 where the loop runs 2.5x; ``benchmarks/runtime.py`` measures the dispatch.
_GROUPS_MAX_ROWS = 12
# Up to this many groups the batched dot's scaled partial sums are added in one unrolled fusion
# (faster on XLA:CPU than a reduction over the group axis); more groups: a reduction.
_UNROLL_GROUPS = 128


def _group_major_dot(qarray, lhs, dimension_numbers, weight_is_rhs, out_dtype, chosen):
    """The integer formulations on a ``GroupMajor`` weight (``_group_major`` checked the axes):
    values ``(bt, G, n, g)``, activations ``(bt, m, K)`` split into limbs laid out ``(bt, G,
    rows, g)`` directly (XLA:CPU widens a batched int8 dot whose operand comes from a transpose
    to int32, slowly); one batched dot over the groups for few rows, else one dot per group."""
    xc, _, xb, _ = _split(dimension_numbers, weight_is_rhs)
    shape, layout = qarray.shape, qarray.layout
    lead = len(shape) - layout.axes
    n_groups = layout.groups
    bt = math.prod(shape[:lead])
    n = math.prod(shape[lead + 1 :])
    k_total = shape[lead]
    group = k_total // n_groups
    out_dtype = out_dtype or jnp.promote_types(lhs.dtype, qarray.dtype)
    xf = [d for d in range(lhs.ndim) if d not in xc and d not in xb]
    m = math.prod(lhs.shape[d] for d in xf)
    values = qarray.values.reshape(bt, n_groups, n, group)
    if values.dtype != jnp.int8:  # sub-byte values (int8 containers: no-op)
        values = values.astype(jnp.int8)
    per_group = (*qarray.values.shape[:-1], 1)  # (*lead, G, *out, 1): stored scales' shape
    s = jnp.broadcast_to(qarray.scale.astype(jnp.float32), per_group).reshape(bt, n_groups, n)
    n_limbs = 1 if chosen.startswith("int8") else _N_LIMBS
    xk = jnp.transpose(lhs.astype(jnp.float32), [*xb, *xf, *xc]).reshape(bt, m, k_total)
    act = qarray._to_canonical(qarray.act_scale) if chosen.startswith("int8") else None
    step, finite = _steps(act, shape, list(range(lead)), xk)
    xg = jnp.moveaxis(xk.reshape(bt, m, n_groups, group), 2, 1)  # (bt, G, m, g)
    q, weights = _limbs(xg / step[:, None], n_limbs, axis=2)  # (bt, G, L, m, g): no transpose
    rows = n_limbs * m
    q = q.reshape(bt, n_groups, rows, group)
    if rows < 2:  # XLA:CPU's one-row integer dot is slow: use two rows
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 2 - rows), (0, 0)))
    if chosen.endswith("_groups"):  # one batched dot: (bt, G, n, rows)
        acc = lax.dot_general(
            values, q, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.int32
        )
        acc = acc.astype(jnp.float32) * s[..., None]
        if n_groups <= _UNROLL_GROUPS:  # one fusion summing the groups (XLA:CPU: faster)
            y = functools.reduce(jnp.add, [acc[:, i] for i in range(n_groups)])
        else:
            y = jnp.sum(acc, axis=1)
        y = jnp.swapaxes(y, 1, 2)  # (bt, rows, n)
    else:  # one dot per group, its scale applied to its integer partial sum

        def body(i, y):
            a = lax.dot_general(
                q[:, i], values[:, i], (((2,), (2,)), ((0,), (0,))),
                preferred_element_type=jnp.int32,
            )  # fmt: skip
            return y + a.astype(jnp.float32) * s[:, i, None, :]

        y = _loop(n_groups, body, jnp.zeros((bt, q.shape[2], n), jnp.float32))
    zp = qarray.zero_point
    if zp is not None:
        zp = jnp.broadcast_to(zp.astype(jnp.float32), per_group).reshape(bt, n_groups, n)
        zp = jnp.swapaxes(zp, 0, 1)  # (G, bt, n)
    sums = lambda t: jnp.swapaxes(jnp.sum(t, axis=-1), 1, 2)  # (bt, G, m, g) -> (bt, m, G)
    xq = q[:, :, :m].reshape(bt, n_groups, m, group)  # the first limb
    y = _combine(y, weights, step, finite, m, xq, xg, sums, zp, jnp.swapaxes(s, 0, 1))
    wf = list(range(lead + 1, len(shape)))
    return _to_output(y, shape, lhs, list(range(lead)), wf, xf, weight_is_rhs, out_dtype)


def _group_sums(xk, kshape, j: int, n_groups: int) -> jax.Array:
    """Row sums of ``xk (bt, m, K)`` per group along contracting axis ``j``: ``(bt, m, G)``."""
    bt, m = xk.shape[:2]
    shape = [*kshape[:j], n_groups, kshape[j] // n_groups, *kshape[j + 1 :]]
    t = xk.reshape(bt, m, *shape)
    return jnp.sum(t, axis=[2 + a for a in range(len(shape)) if a != j])


def _to_output(y, shape, lhs, wb, wf, xf, weight_is_rhs, out_dtype) -> jax.Array:
    """``y (bt, m, n)`` in ``lax.dot_general``'s output layout and dtype (``shape``: the
    weight's, in the axes ``wb``/``wf`` name)."""
    out_shape = (
        *[shape[a] for a in wb],
        *[lhs.shape[d] for d in xf],
        *[shape[a] for a in wf],
    )
    y = y.reshape(out_shape)
    if not weight_is_rhs:
        nb, nx = len(wb), len(xf)
        perm = [*range(nb), *range(nb + nx, len(out_shape)), *range(nb, nb + nx)]
        y = jnp.transpose(y, perm)
    return y.astype(out_dtype)
