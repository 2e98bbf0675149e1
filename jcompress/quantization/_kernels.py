"""Matmul formulations for quantized weights (``QArray``), chosen per backend and batch size.

``QArray.dot_general`` delegates here. A ``QArray`` stands for ``(values - zero_point) * scale``
(``scale``/``zero_point`` of the same rank as ``values``, size 1 on reduced axes; per-group: the
group axis, the last contracting axis, has ``in / size`` entries).

Formulations (``mode=``):

* ``"dequantize"``: materialize the float weight, then a float ``dot_general``. Exact reference;
  on XLA:CPU converting a 4096² int8 weight costs several float matvecs, so this is slow there,
  while GPU/TPU compilers fuse the conversion into the dot.
* ``"limbs"`` (weight-only, exact to float rounding): each activation row is split into three
  int8 limbs ``x ≈ a·(q₀ + q₁/254 + q₂/254²)/127`` (``a`` the row's absolute maximum; residual
  ``<= a·2⁻²⁴``), the limbs are stacked as extra rows and multiplied by the int8 weight in ONE
  ``s8 x s8 -> s32`` dot; scales are applied after the integer reduction (per group for per-group
  scales). The integer GEMM of XLA:CPU is so much faster than its float GEMV/GEMM that three
  integer rows beat one float row.
* ``"int8"`` (weight and activation quantization, W8A8): one limb, i.e. dynamic per-token
  activation quantization ``x ≈ a·q/127``. Outputs change by the activation rounding
  (relative error ~``1/254`` per element): a different model, chosen explicitly.
* ``"weight_only"``: the measured dispatch table :data:`WEIGHT_ONLY` for the backend and batch.

Static activation steps (``mode="int8"`` only): a plain ``QArray`` whose ``act_scale`` is not
``None`` carries the calibrated activation step ``a`` (``float32``, ``values``' rank, size 1 on
every axis except stacked/batch axes, where it holds one step per layer). ``"int8"`` then
quantizes the activations as ``q = clip(round(x / a), -127, 127)`` (no per-token absmax pass) and
returns ``(q·a) @ dequantize(w)`` computed as ``acc·a·scale`` from the ``s8 x s8 -> s32``
accumulator ``acc``. Activations beyond ``127·a`` SATURATE (clip to ``±127·a``): that is what a
static range means, so calibrate ``a`` on representative inputs. Per-input-channel steps (size > 1
on a contracting axis) are rejected with a ``ValueError``: per-channel smoothing belongs in an
input scale folded into the weight (``AWQArray``, which divides the activations itself and hands a
plain ``QArray`` without ``act_scale`` to these kernels). A step that is not finite or not positive
gives NaN outputs. In the weight-only modes (``"weight_only"``, ``"limbs"``, ``"dequantize"``)
``act_scale`` is ignored, as by ``QArray.dequantize``; without it ``"int8"`` uses dynamic
per-token scales. In both ``"int8"`` variants the zero-point correction uses the quantized
activations, so the result is exactly ``(q·step) @ dequantize(w)`` up to float rounding.

Scales blocked along a non-contracting axis, or blocked along several contracting axes, use
``"dequantize"`` (in every mode: the activations are then not quantized).

Integer accumulation is exact while ``127·128·K < 2³¹`` (``K`` the contracted size per group
step, up to 131072); larger reductions fall back to ``"dequantize"``. Rows holding NaN/Inf give
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

__all__ = ["MODES", "WEIGHT_ONLY", "dot_general", "formulation"]

MODES = ("weight_only", "dequantize", "limbs", "int8")

# backend -> ((smallest weight size, smallest row count, formulation), ...): the last entry both
# thresholds admit wins. Measured on a shared 2-core x86 CPU (benchmarks/runtime.py): "limbs"
# beats float32 from batch 1 to 256 on 1024² and 4096² weights, while "dequantize" is ~0.1-0.6x
# there; below ~65k weights (the digits MLP) converting the weight costs less than the limbs'
# extra work. GPU/TPU compilers fuse the dequantization into the dot, so they keep it.
WEIGHT_ONLY: dict[str, tuple[tuple[int, int, str], ...]] = {
    "cpu": ((0, 0, "dequantize"), (1 << 16, 1, "limbs")),
    "gpu": ((0, 0, "dequantize"),),
    "tpu": ((0, 0, "dequantize"),),
}
_LIMB_BASE = 254.0
_MAX_K = (2**31 - 1) // (127 * 128)
_N_LIMBS = 3


def formulation(mode: str, rows: int, backend: str | None = None, size: int | None = None) -> str:
    """The formulation ``mode`` resolves to for ``rows`` activation rows and a weight of ``size``
    elements on ``backend`` (default: the default backend).

    >>> formulation("weight_only", 4, "cpu", size=4096 * 4096)
    'limbs'
    >>> formulation("weight_only", 4, "gpu", size=4096 * 4096)
    'dequantize'
    >>> formulation("int8", 4, "cpu")
    'int8'
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "weight_only":
        return mode
    table = WEIGHT_ONLY.get(backend or jax.default_backend(), ((0, 0, "dequantize"),))
    size = (1 << 62) if size is None else size
    chosen = "dequantize"
    for min_size, min_rows, name in table:
        if size >= min_size and rows >= min_rows:
            chosen = name
    return chosen


def _split(dimension_numbers, weight_is_rhs):
    (lc, rc), (lb, rb) = dimension_numbers
    if weight_is_rhs:
        return list(lc), list(rc), list(lb), list(rb)
    return list(rc), list(lc), list(rb), list(lb)


def _dequantized(qarray, lhs, dimension_numbers, weight_is_rhs, out_dtype):
    w = qarray.dequantize()
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
    batch_hint: int | None = None,
) -> jax.Array:
    """``lax.dot_general(lhs, w, dimension_numbers)`` for a quantized weight ``w = qarray``.

    Args:
      qarray: a ``QArray`` (``values``, ``scale``, optional ``zero_point`` / ``act_scale``,
        ``dequantize()``).
      lhs: the float operand.
      dimension_numbers: as for ``lax.dot_general`` with the weight on the right
        (``weight_is_rhs=True``) or on the left.
      weight_is_rhs: which side the weight is on; the output order follows ``lax.dot_general``
        (batch, left free, right free).
      preferred_element_type: the output dtype (default: the promoted float dtype).
      mode: ``"weight_only"`` (dispatch), ``"dequantize"``, ``"limbs"`` or ``"int8"`` (see the
        module docstring).
      batch_hint: the number of activation rows to dispatch on (default: read from ``lhs``).

    Returns:
      The product, in ``lax.dot_general``'s output layout.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QArray
    >>> w = QArray(jnp.array([[1, -2], [3, 4]], jnp.int8), jnp.array([[0.5, 0.25]]), bits=8,
    ...            dtype=jnp.float32)
    >>> dot_general(w, jnp.array([[1.0, 2.0]]), (((1,), (0,)), ((), ())), mode="limbs")
    Array([[3.5, 1.5]], dtype=float32)
    """
    xc, wc, xb, wb = _split(dimension_numbers, weight_is_rhs)
    if mode == "int8" and getattr(qarray, "act_scale", None) is not None:
        _check_static_step(qarray, wc, wb)
    rows = batch_hint or int(
        np.prod([lhs.shape[d] for d in range(lhs.ndim) if d not in xc and d not in xb])
    )
    chosen = _resolve(qarray, lhs, dimension_numbers, weight_is_rhs, mode, rows)
    dn = jax.tree.map(int, dimension_numbers)  # hashable nested tuples
    dn = tuple(tuple(tuple(side) for side in pair) for pair in dn)
    with jax.named_scope(f"jc.kernel={chosen}"):
        if chosen == "dequantize":  # differentiable as it is
            return _dot(qarray, lhs, dn, weight_is_rhs, preferred_element_type, chosen)
        return _integer_dot(qarray, lhs, dn, weight_is_rhs, preferred_element_type, chosen)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _integer_dot(qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen):
    """The integer formulations, with the float derivative ``d(lhs) @ dequantize(w)``.

    Rounding the activations into limbs has a zero derivative; the tangent rule gives the
    derivative of the float product they stand for (for ``"int8"``: a straight-through
    estimator). No derivative flows into the compressed weight.
    """
    return _dot(qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen)


@_integer_dot.defjvp
def _integer_dot_jvp(dimension_numbers, weight_is_rhs, preferred_element_type, chosen, p, t):
    qarray, lhs = p
    out = _integer_dot(
        qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen
    )
    tangent = _dequantized(qarray, t[1], dimension_numbers, weight_is_rhs, out.dtype)
    return out, tangent.astype(out.dtype)


def _resolve(qarray, lhs, dimension_numbers, weight_is_rhs, mode, rows) -> str:
    """The formulation actually used: the dispatch, then what the weight's layout allows."""
    values = qarray.values
    chosen = formulation(mode, rows, size=math.prod(values.shape))
    _, wc, _, wb = _split(dimension_numbers, weight_is_rhs)
    wf = [d for d in range(values.ndim) if d not in wc and d not in wb]
    ga = _group_axis(qarray, wc)
    k_total = math.prod(values.shape[a] for a in wc)
    group = k_total if ga in (None, "bad") else values.shape[ga] // qarray.scale.shape[ga]
    n_groups = k_total // group
    if (
        ga == "bad"
        or any(qarray.scale.shape[d] not in (1, values.shape[d]) for d in (*wb, *wf))
        or group > _MAX_K
        or not jnp.issubdtype(values.dtype, jnp.integer)
    ):
        return "dequantize"
    if mode == "weight_only" and chosen == "limbs" and n_groups > 1 and rows > 1:
        # per-group scales need a (groups, rows, out) integer intermediate: measured on 4096²
        # and 1024² weights with groups of 64 and 128, only a single row beats the float path
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


def _dot(qarray, lhs, dimension_numbers, weight_is_rhs, preferred_element_type, chosen):
    xc, wc, xb, wb = _split(dimension_numbers, weight_is_rhs)
    values = qarray.values
    out_dtype = preferred_element_type or jnp.promote_types(lhs.dtype, qarray.dtype)
    if chosen == "dequantize":
        return _dequantized(qarray, lhs, dimension_numbers, weight_is_rhs, out_dtype)
    xf = [d for d in range(lhs.ndim) if d not in xc and d not in xb]
    wf = [d for d in range(values.ndim) if d not in wc and d not in wb]
    ga = _group_axis(qarray, wc)
    k_total = int(np.prod([values.shape[a] for a in wc], dtype=np.int64))
    group = k_total if ga is None else values.shape[ga] // qarray.scale.shape[ga]

    if ga is not None:  # the group axis goes last among the contracting pairs
        j = wc.index(ga)
        xc = xc[:j] + xc[j + 1 :] + [xc[j]]
        wc = wc[:j] + wc[j + 1 :] + [ga]
    bt = int(np.prod([values.shape[a] for a in wb], dtype=np.int64))
    n = int(np.prod([values.shape[a] for a in wf], dtype=np.int64))
    m = int(np.prod([lhs.shape[d] for d in xf], dtype=np.int64))
    n_groups = k_total // group

    def to_groups(t):
        """A weight-shaped tensor (scales: size 1 or groups on contracting axes) laid out as
        (bt, groups, per-group, n); non-group contracting axes broadcast so groups line up."""
        target = [
            values.shape[d] if d not in wc or (ga is not None and d != ga) else t.shape[d]
            for d in range(t.ndim)
        ]
        t = jnp.broadcast_to(t, target)
        t = jnp.transpose(t, [*wb, *wc, *wf])
        return t.reshape(bt, n_groups, -1, n)

    # sub-byte values are widened to int8 first: XLA:CPU's s4 x s8 dot is ~30x slower than this
    v = to_groups(values.astype(jnp.int8))  # (bt, G, g, n)
    s = to_groups(qarray.scale.astype(jnp.float32))  # (bt, G, 1, n)
    x = jnp.transpose(lhs.astype(jnp.float32), [*xb, *xf, *xc]).reshape(bt, m, n_groups, group)
    n_limbs = 1 if chosen == "int8" else _N_LIMBS
    if chosen == "int8" and getattr(qarray, "act_scale", None) is not None:
        step = _static_step(qarray, wb, bt)  # (bt, 1, 1): calibrated, saturating
        q = jnp.clip(jnp.round(x.reshape(bt, m, k_total) / step), -127, 127)
        q, weights = q.astype(jnp.int8)[None], [1.0]
        finite = jnp.all(jnp.isfinite(x), axis=(2, 3))[..., None] & (step > 0)
    else:
        q, step, weights = _limbs(x.reshape(bt, m, k_total), n_limbs)  # (L, bt, m, K)
        finite = jnp.isfinite(step)
    xq = q[0].reshape(bt, m, n_groups, group)
    q = jnp.moveaxis(q, 0, 1).reshape(bt, n_limbs * m, n_groups, group)
    pad = 2 - n_limbs * m  # XLA:CPU's one-row integer dot is slow: use two rows
    if pad > 0:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    acc = lax.dot_general(
        q, v, (((3,), (2,)), ((0, 2), (0, 1))), preferred_element_type=jnp.int32
    )  # (bt, G, L*m, n)
    y = acc.astype(jnp.float32) * s  # scales after the integer reduction
    y = jnp.sum(y, axis=1)[:, : n_limbs * m].reshape(bt, n_limbs, m, n)
    y = sum(y[:, i] * w for i, w in enumerate(weights)) * step
    zp = getattr(qarray, "zero_point", None)
    if zp is not None:
        z = to_groups(zp.astype(jnp.float32))  # (bt, G, 1, n)
        if n_limbs == 1:  # the quantized activations, exactly: (q·step) @ dequantize(w)
            xsum = jnp.sum(xq, axis=-1, dtype=jnp.int32).astype(jnp.float32) * step
        else:
            xsum = jnp.sum(x, axis=-1)  # (bt, m, G)
        y = y - jnp.einsum("bmg,bgn->bmn", xsum, (z * s)[:, :, 0])
    y = jnp.where(finite, y, jnp.nan)
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
