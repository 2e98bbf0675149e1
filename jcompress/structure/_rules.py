"""What each primitive does to channel facts: one rule per primitive the analysis knows.

A rule takes the :class:`~jcompress.structure._facts.Algebra`, the equation, its operands' axis
facts and shapes, and ``why`` (the primitive and its module, from JAX's name stack, for blocked
reasons), and returns one axis-fact tuple per output. Elementwise ops tie their operands' axes;
contractions tie the contracted axes; reductions, cumulative ops, pooling, slices, pads,
reverses, gathers and splits block the axes they act along; reshapes, concatenations and
broadcasts re-lay channels out (``Member`` offsets, strides and units). A primitive without a
rule blocks every axis that reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from jcompress.runtime import _interpret as ip
from jcompress.structure._facts import Algebra, Fact, is_claim, is_layout
from jcompress.structure._spaces import Seg

__all__ = ["at", "free_broadcast", "rule"]

ELEMENTWISE = {
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "cbrt", "ceil", "clamp", "convert_element_type", "copy", "copy_p", "cos", "cosh", "digamma",
    "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt", "max", "min",
    "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision", "rem",
    "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh",
    "xor", "sharding_constraint", "stop_gradient",
}  # fmt: skip
REDUCTIONS = {
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin",
}  # fmt: skip
CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
WINDOWED = {"reduce_window_sum", "reduce_window_max", "reduce_window_min"}
# primitives that follow free (broadcast) axes; any other use of one blocks it, as a constant
FREE_AWARE = ELEMENTWISE | {"broadcast_in_dim", "transpose", "dot_general"}

Axes = tuple[Any, ...]
Rule = Callable[[Algebra, Any, list[Axes], list[tuple[int, ...]], str], list[Axes]]


def at(eqn: Any) -> str:
    """``why`` for an equation: the primitive and, where JAX recorded it, the module."""
    stack = str(eqn.source_info.name_stack)
    return f"`{eqn.primitive.name}`" + (f" in {stack}" if stack else "")


def rule(alg: Algebra, eqn: Any, infacts: list[Fact | None]) -> list[Fact | None]:
    """Output facts of a first-order equation some of whose inputs carry facts."""
    name = eqn.primitive.name
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    axes = [f.axes if f is not None else (None,) * len(s) for f, s in zip(infacts, shapes)]
    param = all(f is None or f.param for f in infacts)
    why = at(eqn)
    if name not in FREE_AWARE:
        axes = [tuple(alg.unfree(f, why) for f in a) for a in axes]
    out = RULES.get(name, _unknown)(alg, eqn, axes, shapes, why)
    facts: list[Fact | None] = []
    for o, v in zip(out, eqn.outvars):
        if not param:
            o = tuple(alg.born(f, n) for f, n in zip(o, v.aval.shape))
        facts.append(Fact(tuple(o), param))
    return facts


def free_broadcast(alg: Algebra, eqn: Any) -> Fact | None:
    """Facts of a ``broadcast_in_dim`` of a fact-less value (a constant): its free axes, or
    ``None`` when it makes none."""
    shape = eqn.invars[0].aval.shape
    [axes] = _broadcast_in_dim(alg, eqn, [(None,) * len(shape)], [shape], "")
    return Fact(axes, True) if any(a is not None for a in axes) else None


# -- elementwise, reductions, pooling ---------------------------------------------------------


def _elementwise(alg, eqn, axes, shapes, why):
    rank = len(eqn.outvars[0].aval.shape)
    out = []
    for d in range(rank):
        f, n = None, 1
        first = True
        for a, s in zip(axes, shapes):
            if len(s) != rank:
                continue  # a scalar operand
            if first:
                f, n, first = a[d], s[d], False
            else:
                f = alg.meet(f, a[d], n, s[d], why)
                n = max(n, s[d])
        out.append(f)
    return [tuple(out)]


def _reduction(alg, eqn, axes, shapes, why):
    reduced = eqn.params["axes"]
    for d in reduced:
        alg.drop(
            axes[0][d],
            f"is reduced over by {why} (a norm, softmax or sum over channels depends on the width)",
        )
    return [tuple(f for d, f in enumerate(axes[0]) if d not in reduced)]


def _cumulative(alg, eqn, axes, shapes, why):
    d = eqn.params["axis"]
    alg.drop(axes[0][d], f"is accumulated along by {why}")
    return [tuple(None if k == d else f for k, f in enumerate(axes[0]))]


def _windowed(alg, eqn, axes, shapes, why):
    p = eqn.params
    out = []
    for d, f in enumerate(axes[0]):
        trivial = (
            p["window_dimensions"][d] == 1
            and p["window_strides"][d] == 1
            and tuple(p["padding"][d]) == (0, 0)
            and p["base_dilation"][d] == 1
            and p["window_dilation"][d] == 1
        )
        if not trivial:
            alg.drop(f, f"is pooled over by {why}")
        out.append(f if trivial else None)
    return [tuple(out)]


# -- contractions -----------------------------------------------------------------------------


def _dot_general(alg, eqn, axes, shapes, why):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    la, ra = axes
    ls, rs = shapes
    for i, j in zip(lc, rc):
        alg.contract(la[i], ra[j], ls[i], f"contracted by {why}")
    batch = [alg.meet(la[i], ra[j], ls[i], rs[j], why) for i, j in zip(lb, rb)]
    lfree = [la[d] for d in range(len(ls)) if d not in lc and d not in lb]
    rfree = [ra[d] for d in range(len(rs)) if d not in rc and d not in rb]
    return [tuple(batch + lfree + rfree)]


def _conv_general_dilated(alg, eqn, axes, shapes, why):
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    la, ra = axes
    ls, rs = shapes
    out: list[Any] = [None] * len(eqn.outvars[0].aval.shape)
    for s in lhs_spec[2:]:
        alg.drop(la[s], f"is a spatial axis of {why}")
    groups, lf, rin, rout = p["feature_group_count"], lhs_spec[1], rhs_spec[1], rhs_spec[0]
    if p["batch_group_count"] != 1:
        for f in (*la, *ra):
            alg.drop(f, f"feeds {why} with batch_group_count={p['batch_group_count']}")
        return [tuple(out)]
    out[out_spec[0]] = la[lhs_spec[0]]
    if groups == 1:
        alg.contract(la[lf], ra[rin], ls[lf], f"contracted by {why}")
        out[out_spec[1]] = ra[rout]
    elif rs[rin] == 1 and rs[rout] == ls[lf] == groups:  # depthwise, multiplier 1
        out[out_spec[1]] = alg.meet(la[lf], ra[rout], groups, groups, why)
    else:
        _grouped_input(alg, la[lf], ra[rin], ra[rout], rs[rin], groups, why)
        out[out_spec[1]] = alg.born(ra[rout], rs[rout])
        if is_layout(out[out_spec[1]]):
            for seg in out[out_spec[1]]:
                alg.spaces.constrain(seg.space, groups)
        else:
            alg.drop(out[out_spec[1]], f"is the output of {why} from a non-parameter kernel")
    return [tuple(out)]


def _grouped_input(alg, f, rows, cols, per_group, groups, why):
    """The input channels of a grouped convolution: ``groups`` blocks of ``per_group``.

    Each block must lose equally many channels (the groups keep one width); channel ``c``
    is kernel row ``c % per_group`` for the output columns of block ``c // per_group`` only
    (a ``Member`` with ``blocks=groups``; the kernel is re-gathered per block by shrink).
    """
    if not is_claim(rows) or not is_claim(cols):
        alg.drop(f, f"feeds {why}, whose kernel is not a parameter")
        return
    if f is None:
        alg.drop(rows, f"meets an axis that cannot lose channels (model input or constant) {why}")
        return
    col_axis = {p: a for p, a in cols}
    pairs = [(p, a) for p, a in rows if p in col_axis]
    # every convolution group must lose as many channels: the input must be one space
    # spanning the whole axis (parts of other spaces or of the model input could not follow)
    if len(pairs) < len(rows) or not (
        is_layout(f)
        and len(f) == 1
        and (f[0].offset, f[0].stride) == (0, 0)
        and alg.spaces.size[f[0].space] == groups * per_group
    ):
        reason = (
            f"feeds a grouped convolution {why} (feature_group_count={groups}) unaligned "
            "(its input is not one whole channel space)"
        )
        alg.drop(f, reason)
        alg.drop(rows, reason)
        return
    for seg in f:
        alg.spaces.constrain(seg.space, groups)
        for p, a in pairs:
            alg.spaces.add(seg, frozenset({(p, a)}), blocks=groups, block_axis=col_axis[p])


# -- layout changes ---------------------------------------------------------------------------


def _transpose(alg, eqn, axes, shapes, why):
    return [tuple(axes[0][d] for d in eqn.params["permutation"])]


def _broadcast_in_dim(alg, eqn, axes, shapes, why):
    out_shape = eqn.outvars[0].aval.shape
    # axes made from nothing (or from a fact-less size-1 axis) are free: the same value at
    # every index, so they take whatever width the channels they meet keep
    out: list[Any] = [(Seg(alg.spaces.new(n, free=True)),) if n > 1 else None for n in out_shape]
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if shapes[0][i] == 1 and out_shape[d] != 1:
            if axes[0][i] is not None:
                alg.drop(axes[0][i], f"is broadcast by {why}")
                out[d] = None
        else:
            out[d] = axes[0][i]
    return [tuple(out)]


def _squeeze(alg, eqn, axes, shapes, why):
    drop = {d % len(shapes[0]) for d in eqn.params["dimensions"]}
    for d in drop:
        alg.drop(axes[0][d], f"is squeezed by {why}")
    return [tuple(f for d, f in enumerate(axes[0]) if d not in drop)]


def _reshape(alg, eqn, axes, shapes, why):
    if eqn.params.get("dimensions") is not None:
        return _unknown(alg, eqn, axes, shapes, why)
    ins, outs, a = shapes[0], tuple(eqn.outvars[0].aval.shape), axes[0]
    groups = ip.reshape_groups(ins, outs)
    for gi, gj in groups:
        if not gj:  # a size-1 axis removed
            alg.drop(a[gi[0]], f"is dropped by {why}")
    new: list[Any] = []
    for gi, gj in groups:
        if not gj:
            continue
        live = [k for k in gi if a[k] is not None]
        if not gi:
            new.append(None)  # a size-1 axis added
        elif len(gi) == 1 and len(gj) == 1:
            new.append(a[gi[0]])
        elif not live:
            new.extend([None] * len(gj))
        elif len(gj) == 1 and live == [gi[-1]]:
            outer = math.prod(ins[k] for k in gi[:-1])
            new.append(alg.flatten(a[gi[-1]], outer, ins[gi[-1]], why))
        elif len(gj) == 1 and live == [gi[0]]:
            inner = math.prod(ins[k] for k in gi[1:])
            new.append(alg.refine(a[gi[0]], inner, why))
        elif len(gi) == 1:
            inner = math.prod(outs[k] for k in gj[1:])
            new.append(alg.split(a[gi[0]], inner, why))
            new.extend([None] * (len(gj) - 1))
        else:
            for k in live:
                alg.drop(a[k], f"is split or merged with inner axes by {why}")
            new.extend([None] * len(gj))
    return [tuple(new)]


def _concatenate(alg, eqn, axes, shapes, why):
    dim = eqn.params["dimension"]
    rank = len(shapes[0])
    out: list[Any] = []
    for d in range(rank):
        if d != dim:
            f = axes[0][d]
            for a, s in zip(axes[1:], shapes[1:]):
                f = alg.meet(f, a[d], shapes[0][d], s[d], why)
            out.append(f)
            continue
        segs: list[Seg] = []
        offset = 0
        for k, (a, s) in enumerate(zip(axes, shapes)):
            f = a[d]
            if is_layout(f) and (k == len(axes) - 1 or all(x.stride == 0 for x in f)):
                segs += [Seg(x.space, x.offset + offset, x.stride) for x in f]
            elif f is not None:
                alg.drop(f, f"is concatenated by {why}")
            offset += s[d]
        out.append(tuple(segs) or None)
    return [tuple(out)]


# -- slicing and indexing ---------------------------------------------------------------------


def _full_or_drop(alg, a, full, why):
    return tuple(f if ok else alg.drop(f, f"is sliced by {why}") for f, ok in zip(a, full))


def _slice(alg, eqn, axes, shapes, why):
    p = eqn.params
    strides = p["strides"] or (1,) * len(shapes[0])
    full = [
        s == 0 and e == n and st == 1
        for s, e, st, n in zip(p["start_indices"], p["limit_indices"], strides, shapes[0])
    ]
    return [_full_or_drop(alg, axes[0], full, why)]


def _dynamic_slice(alg, eqn, axes, shapes, why):
    for a in axes[1:]:
        for f in a:
            alg.drop(f, f"indexes {why}")
    full = [s == n for s, n in zip(eqn.params["slice_sizes"], shapes[0])]
    return [_full_or_drop(alg, axes[0], full, why)]


def _pad(alg, eqn, axes, shapes, why):
    full = [tuple(c) == (0, 0, 0) for c in eqn.params["padding_config"]]
    return [_full_or_drop(alg, axes[0], full, why)]


def _rev(alg, eqn, axes, shapes, why):
    full = [d not in eqn.params["dimensions"] for d in range(len(shapes[0]))]
    return [_full_or_drop(alg, axes[0], full, why)]


def _split(alg, eqn, axes, shapes, why):
    d = eqn.params["axis"]
    alg.drop(axes[0][d], f"is split by {why}")
    kept = tuple(None if k == d else f for k, f in enumerate(axes[0]))
    return [kept] * len(eqn.outvars)


def _gather(alg, eqn, axes, shapes, why):
    p = eqn.params
    dn = p["dimension_numbers"]
    for f in axes[1]:
        alg.drop(f, f"indexes {why}")
    if dn.operand_batching_dims:
        return _unknown(alg, eqn, axes, shapes, why)
    out: list[Any] = [None] * len(eqn.outvars[0].aval.shape)
    window = [d for d in range(len(shapes[0])) if d not in dn.collapsed_slice_dims]
    for d in dn.collapsed_slice_dims:
        alg.drop(axes[0][d], f"is indexed by {why}")
    for d, o in zip(window, dn.offset_dims):
        if p["slice_sizes"][d] == shapes[0][d]:
            out[o] = axes[0][d]
        else:
            alg.drop(axes[0][d], f"is sliced by {why}")
    return [tuple(out)]


def _unknown(alg, eqn, axes, shapes, why):
    for a in axes:
        for f in a:
            alg.drop(f, f"passes through {why}, which the dependency analysis does not know")
    return [(None,) * len(v.aval.shape) for v in eqn.outvars]


RULES: dict[str, Rule] = {
    **dict.fromkeys(ELEMENTWISE, _elementwise),
    **dict.fromkeys(REDUCTIONS, _reduction),
    **dict.fromkeys(CUMULATIVE, _cumulative),
    **dict.fromkeys(WINDOWED, _windowed),
    "dot_general": _dot_general,
    "conv_general_dilated": _conv_general_dilated,
    "transpose": _transpose,
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": _squeeze,
    "reshape": _reshape,
    "concatenate": _concatenate,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "pad": _pad,
    "rev": _rev,
    "split": _split,
    "gather": _gather,
}
