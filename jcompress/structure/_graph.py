"""``dependencies``: which parameter axes must lose the same channels together.

The analysis runs the function's jaxpr forward on the runtime's jaxpr walker
(:class:`jcompress.runtime._interpret.Interpreter`) with a *channel fact* per variable axis:

* a **layout** (activations): the axis holds the channels of one or more *spaces*, each a run
  ``offset + c`` (``+ j * stride`` after a channel-last flatten) of the axis;
* a **claim** (parameter-derived values): the parameter ``(path, axis)`` pairs the axis comes
  from, not yet tied to a space;
* ``None``: no channels (batch, spatial and input-feature axes, constants).

An axis that a ``broadcast_in_dim`` makes from nothing or from size 1 (an attention mask
``mask[:, None]`` broadcast over the heads by ``jnp.where``, a scalar constant broadcast to an
activation's shape) is a layout of a *free* space: its values are the same at every index, so it
takes whatever width the channels it meets elementwise keep (``shrink`` re-emits the broadcast at
that width). A free space joins the group it meets; contracted or reduced over, it blocks as a
constant does.

A space is born where a parameter axis becomes an activation axis (a Dense/Conv kernel's output
axis). Spaces tied together form a group whose *units* (its channels for pruning) may be coarser
than a space's channels: a channel axis reshaped to ``(outer, inner)`` ties each run of ``inner``
channels to one outer index, so the run is the unit (whole GroupNorm groups, whole attention heads,
a key/value head with the query heads sharing it); merging ``(outer, inner)`` back gives a finer
space tied the same way. A grouped convolution adds *blocks*: its groups must each lose equally many
channels. Elementwise ops, contractions, concatenations and flattens tie facts together: a claim
meeting a layout makes the parameter axis a :class:`~jcompress.tree.Member` of the layout's spaces
(bias, norm scale and statistics, the next kernel's contracting rows), two layouts meeting merge
their spaces (both sides of a residual add; ``q``/``k`` head axes in ``q @ k``). Every space that
reaches something whose result depends on the width (a reduction over channels as in LayerNorm,
RMSNorm or softmax, the model output, a slice, a reshape that splits channels unevenly, an
unknown primitive) is *blocked* with the reason. A parameter axis that must keep its size for
another reason (contracted against the model input, indexed by a gather) blocks every group it is
in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jcompress.runtime import _interpret as ip
from jcompress.runtime._views import _reshape_rule
from jcompress.tree import Group, Member, Params, leaves_with_paths

__all__ = ["dependencies"]

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


@dataclasses.dataclass(frozen=True)
class Seg:
    """Channel ``c`` of ``space`` sits at ``offset + c (+ j * stride)`` along an axis."""

    space: int
    offset: int = 0
    stride: int = 0


@dataclasses.dataclass(frozen=True)
class Fact:
    """Channel facts of a variable: one per axis, and whether it derives only from parameters.

    An axis fact is ``None``, a layout (a tuple of :class:`Seg`) or a claim (a frozenset of
    ``(path, axis)``).
    """

    axes: tuple[Any, ...]
    param: bool


def _is_layout(f: Any) -> bool:
    return isinstance(f, tuple)


def _is_claim(f: Any) -> bool:
    return isinstance(f, frozenset)


class Spaces:
    """Union-find over channel spaces, with members, units, blocks and blocked reasons per root.

    Spaces in one set are *proportional*: channel ``c`` of a space of ``n`` channels belongs to
    unit ``c // (n // units)`` of the set, where ``units`` (the group's size) divides every
    member space's size. Equal-size spaces meeting elementwise are proportional with ratio 1; a
    channel axis split into ``(outer, inner)`` (GroupNorm's groups, heads out of one Dense, GQA's
    ``(kv_heads, rep)``) ties the outer axis's new space to the channels in runs of ``inner``.
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.units: list[int] = []
        self.blocks: list[int] = []
        self.members: list[list[tuple[Member, int, int]]] = []  # (member, space size, layers)
        self.reasons: list[list[str]] = []
        self.fixed: dict[tuple[str, int], str] = {}
        # parameters sliced by a scan's xs: {path: (stacked axis, layers)}; their axis sizes
        self.stacked: dict[str, tuple[int, int]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.scan: list[set[str]] = []  # the stacked paths of the scan bodies being analysed
        self.free: list[bool] = []  # made by broadcasting: the same value at every channel

    def new(self, size: int, *, free: bool = False) -> int:
        self.free.append(free)
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.units.append(size)
        self.blocks.append(1)
        self.members.append([])
        self.reasons.append([])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        """Tie two proportional spaces (equal sizes, or one a coarse view of the other)."""
        ra, rb = sorted((self.find(a), self.find(b)))
        if ra == rb:
            return
        self.parent[rb] = ra
        self.free[ra] = self.free[ra] and self.free[rb]
        self.units[ra] = math.gcd(self.units[ra], self.units[rb])
        self.blocks[ra] = math.lcm(self.blocks[ra], self.blocks[rb])
        self.members[ra] += self.members[rb]
        self.reasons[ra] += self.reasons[rb]
        self.members[rb], self.reasons[rb] = [], []

    def coarse(self, space: int, inner: int) -> int:
        """A new space of ``size // inner`` channels: runs of ``inner`` channels of ``space``."""
        out = self.new(self.size[space] // inner, free=self.free[self.find(space)])
        self.union(space, out)
        return out

    def fine(self, space: int, inner: int) -> int:
        """A new space of ``size * inner`` channels, ``inner`` per channel of ``space``."""
        out = self.new(self.size[space] * inner, free=self.free[self.find(space)])
        self.union(space, out)
        return out

    def constrain(self, space: int, blocks: int) -> None:
        """``space``'s channels fall in ``blocks`` runs that must lose equally many channels."""
        r = self.find(space)
        self.blocks[r] = math.lcm(self.blocks[r], blocks)

    def is_free(self, layout: tuple[Seg, ...]) -> bool:
        """Whether every space of ``layout`` is only a broadcast (no channels of its own)."""
        return all(self.free[self.find(s.space)] for s in layout)

    def add(self, seg: Seg, claim: frozenset, **kw: int) -> None:
        r = self.find(seg.space)
        self.free[r] = False  # parameter axes meeting it make it a channel space
        n = self.size[seg.space]
        inner = self.scan[-1] if self.scan else set()
        self.members[r] += [
            (Member(p, a, seg.offset, seg.stride, **kw), n, self.stacked[p][1] if p in inner else 0)
            for p, a in claim
        ]

    def block(self, layout: tuple[Seg, ...], reason: str) -> None:
        for s in layout:
            r = self.find(s.space)
            if reason not in self.reasons[r]:
                self.reasons[r].append(reason)

    def layers(self, root: int) -> int:
        """``L`` if every member of the set is a layer-stacked kernel axis of one ``scan`` of
        ``L`` layers (whole axis, no offset) and no grouped convolution constrains it: each
        layer may lose its own channels; else 1."""
        if self.blocks[root] > 1:
            return 1
        found = set()
        for m, n, layers in self.members[root]:
            if (
                layers < 2
                or m.offset
                or m.stride
                or m.blocks > 1
                or self.shapes[m.path][m.axis] != n
            ):
                return 1
            found.add(layers)
        return found.pop() if len(found) == 1 else 1

    def groups(self, order: dict[str, int]) -> dict[int, Group]:
        """``{root: Group}`` in creation order, members sorted by tree order, then axis."""
        out = {}
        for i in range(len(self.parent)):
            if self.find(i) != i or not self.members[i]:
                continue  # a broadcast that met no parameter: nothing to prune
            units, blocks = self.units[i], self.blocks[i]
            layers = self.layers(i)
            members = sorted(
                {
                    dataclasses.replace(
                        m,
                        width=m.width * n // units,
                        **(
                            {"blocks": layers, "block_axis": self.stacked[m.path][0]}
                            if layers > 1
                            else {}
                        ),
                    )
                    for m, n, _ in self.members[i]
                },
                key=lambda m: (order.get(m.path, len(order)), m.path, m.axis, m.offset),
            )
            reasons = list(self.reasons[i])
            if units % blocks:
                reasons.append(
                    f"its {units} channel units cannot be split into the {blocks} equal blocks "
                    "of its grouped convolutions (GroupNorm groups straddle convolution groups)"
                )
                blocks = 1
            elif blocks > 1 and blocks == units:
                reasons.append(
                    f"each of its {blocks} grouped-convolution blocks holds one channel (a "
                    "depthwise convolution with a channel multiplier): removing one would empty "
                    "a convolution group"
                )
            for m in members:
                why = self.fixed.get((m.path, m.axis))
                if why is not None and why not in reasons:
                    reasons.append(why)
            out[i] = Group(
                tuple(members), units * layers, "; ".join(reasons) or None, math.lcm(blocks, layers)
            )
        return out


def _at(eqn: Any) -> str:
    stack = str(eqn.source_info.name_stack)
    return f"`{eqn.primitive.name}`" + (f" in {stack}" if stack else "")


class Dependencies(ip.Interpreter):
    """The channel-dependency analysis: :meth:`rule` gives an equation's output facts."""

    def __init__(self) -> None:
        super().__init__()
        self.spaces = Spaces()

    # -- the walker hook ------------------------------------------------------------------------

    def step(self, eqn, invals, infacts):
        if all(f is None for f in infacts):
            vals = [self.materialize(v) for v in invals]
            free = self._free_broadcast(eqn) if eqn.primitive.name == "broadcast_in_dim" else None
            if free is not None:
                return self.bind(eqn, vals, [free]), [free]
            return ip._bind(eqn, vals), [None] * len(eqn.outvars)
        if eqn.primitive.name in ip.INLINED:
            return ip.inline(self, eqn, invals, infacts)
        if eqn.primitive.name == ip.SCAN:
            return self._scan_body(eqn, invals, infacts)
        outfacts = self.rule(eqn, infacts)
        return self.bind(eqn, [self.materialize(v) for v in invals], outfacts), outfacts

    def _scan_body(self, eqn, invals, infacts):
        """A ``scan`` (``nn.scan`` layer stacks, loops over steps): its body is analysed once.

        A parameter sliced by ``xs`` enters the body without its leading (layer) axis and is
        recorded as stacked (:meth:`Spaces.layers` lets a group of only such members lose
        different channels per layer). The carry's facts in and out of the body are tied (a
        residual stream threaded through the layers is one group with the layers writing into
        it). Channels in the stacked outputs ``ys`` (and on the ``xs`` slicing axis) are
        blocked.
        """
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        vals = [self.materialize(v) for v in invals]
        consts, carry, xs = vals[:nc], vals[nc : nc + nk], vals[nc + nk :]
        why = _at(eqn)
        facts_in = list(infacts)
        for i in range(nc + nk, len(facts_in)):
            f = facts_in[i]
            if f is not None:
                if _is_claim(f.axes[0]) and len(f.axes[0]) == 1:
                    [(path, axis)] = f.axes[0]
                    self.spaces.stacked.setdefault(path, (axis, p["length"]))
                self.drop(f.axes[0], f"is the axis {why} slices")
                facts_in[i] = Fact(f.axes[1:], f.param)
        seen: list[list[Fact | None]] = []
        sliced = {
            path
            for f in infacts[nc + nk :]
            if f is not None and _is_claim(f.axes[0])
            for path, _ in f.axes[0]
        }

        def fn(c, x):
            self.spaces.scan.append(sliced)
            try:
                outs, facts = self.run(p["jaxpr"], [*consts, *c, *x], facts_in)
            finally:
                self.spaces.scan.pop()
            seen.append(facts)
            return outs[:nk], outs[nk:]

        c_out, ys = jax.lax.scan(
            fn, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )
        if len(seen) != 1:
            raise RuntimeError(f"dependencies: the body of {why} was traced {len(seen)} times")
        [body_out] = seen
        outfacts: list[Fact | None] = []
        for k, (f_in, f_out, v) in enumerate(zip(facts_in[nc : nc + nk], body_out, carry)):
            shape = np.shape(v)
            a = f_in.axes if f_in is not None else (None,) * len(shape)
            b = f_out.axes if f_out is not None else (None,) * len(shape)
            tied = tuple(
                self.meet(x, y, n, n, f"(carry {k}) {why}") for x, y, n in zip(a, b, shape)
            )
            outfacts.append(Fact(tied, False))
        for f in body_out[nk:]:
            if f is not None:
                for a in f.axes:
                    self.drop(a, f"is stacked into the outputs of {why}")
            outfacts.append(None)
        return [*c_out, *ys], outfacts

    def bind(self, eqn: Any, invals: list[Any], outfacts: list[Fact | None]) -> list[Any]:
        """Evaluate the equation (the shrinking pass re-emits it with new shapes)."""
        del outfacts
        return ip._bind(eqn, invals)

    # -- fact algebra ---------------------------------------------------------------------------

    def drop(self, f: Any, why: str) -> None:
        """An axis fact that cannot survive: block its spaces, or fix its parameter axes."""
        if _is_layout(f):
            self.spaces.block(f, why)
        elif _is_claim(f):
            for key in f:
                self.spaces.fixed.setdefault(key, f"{key[0]} axis {key[1]} {why}")

    def meet(self, a: Any, b: Any, na: int, nb: int, why: str) -> Any:
        """Two axis facts that must agree index by index (elementwise ops, contractions)."""
        if na == 1 and nb != 1:
            self.drop(a, f"is broadcast {why}")
            return b
        if nb == 1 and na != 1:
            self.drop(b, f"is broadcast {why}")
            return a
        if a is None or b is None:
            x = a if b is None else b
            if x is None:
                return None
            self.drop(x, f"meets an axis that cannot lose channels (model input or constant) {why}")
            return x if _is_layout(x) and not self.spaces.is_free(x) else None
        if _is_claim(a) and _is_claim(b):
            return a | b
        if _is_claim(a) or _is_claim(b):
            claim, layout = (a, b) if _is_claim(a) else (b, a)
            for s in layout:
                self.spaces.add(s, claim)
            return layout
        sa, sb = sorted(a, key=lambda s: s.offset), sorted(b, key=lambda s: s.offset)
        sizes = self.spaces.size
        if len(sa) == len(sb) and all(
            x.offset == y.offset and x.stride == y.stride and sizes[x.space] == sizes[y.space]
            for x, y in zip(sa, sb)
        ):
            for x, y in zip(sa, sb):
                self.spaces.union(x.space, y.space)
            return a
        why = f"meets a differently laid-out channel axis {why}"
        self.spaces.block(a, why)
        self.spaces.block(b, why)
        return a

    def contract(self, a: Any, b: Any, n: int, why: str) -> None:
        """Two axes summed over together (a ``dot_general`` / ``conv`` contraction)."""
        free = [_is_layout(f) and self.spaces.is_free(f) for f in (a, b)]
        if any(free):  # a sum over channels weighted by a broadcast depends on the width
            for f in (a, b):
                self.drop(f, f"is contracted against a broadcast input or constant by {why}")
            return
        if _is_claim(a) and _is_claim(b):  # parameter @ parameter (a factorized weight)
            seg = Seg(self.spaces.new(n))
            self.spaces.add(seg, a | b)
            return
        self.meet(a, b, n, n, why)

    def born(self, f: Any, n: int) -> Any:
        """A claimed axis becoming an activation axis: a new space with the claim as members."""
        if not _is_claim(f):
            return f
        seg = Seg(self.spaces.new(n))
        self.spaces.add(seg, f)
        return (seg,)

    def flatten(self, f: Any, outer: int, channels: int, why: str) -> Any:
        """A channel-last flatten: ``outer`` positions of ``channels`` channels each."""
        if outer == 1:
            return f
        if _is_layout(f) and all(s.stride == 0 for s in f):
            return tuple(Seg(s.space, s.offset, channels) for s in f)
        self.drop(f, f"is merged with other axes by {why}")
        return None

    def split(self, f: Any, inner: int, why: str) -> Any:
        """A channel axis reshaped to ``(outer, inner...)``: the outer axis holds runs of ``inner``.

        Every later use of the inner axes stays inside one run, so the runs are the pruning unit
        (whole GroupNorm groups, whole heads, a key/value head with its query heads).
        """
        sizes = self.spaces.size
        if _is_layout(f) and all(
            s.stride == 0 and s.offset % inner == 0 and sizes[s.space] % inner == 0 for s in f
        ):
            return tuple(Seg(self.spaces.coarse(s.space, inner), s.offset // inner) for s in f)
        self.drop(f, f"is split into runs of {inner} that do not align with its channels by {why}")
        return None

    def refine(self, f: Any, inner: int, why: str) -> Any:
        """``(outer, inner...)`` merged with channels only on the outer axis: ``inner`` per channel
        (GroupNorm statistics repeated over a group, ``jnp.repeat`` of key/value heads, a
        channel-first flatten)."""
        if inner == 1:
            return f
        if _is_layout(f) and all(s.stride == 0 for s in f):
            return tuple(Seg(self.spaces.fine(s.space, inner), s.offset * inner) for s in f)
        self.drop(f, f"is merged with inner axes by {why}")
        return None

    # -- rules ----------------------------------------------------------------------------------

    def rule(self, eqn: Any, infacts: list[Fact | None]) -> list[Fact | None]:
        """Output facts of a first-order equation some of whose inputs carry facts."""
        name = eqn.primitive.name
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
        axes = [f.axes if f is not None else (None,) * len(s) for f, s in zip(infacts, shapes)]
        param = all(f is None or f.param for f in infacts)
        why = _at(eqn)
        if name not in FREE_AWARE:
            axes = [tuple(self._unfree(f, why) for f in a) for a in axes]
        method = getattr(self, f"_rule_{name}", None)
        if name in ELEMENTWISE:
            out = [self._elementwise(eqn, axes, shapes, why)]
        elif name in REDUCTIONS:
            kept = [d for d in range(len(shapes[0])) if d not in eqn.params["axes"]]
            for d in eqn.params["axes"]:
                self.drop(
                    axes[0][d],
                    f"is reduced over by {why} (a norm, softmax or sum over channels depends on "
                    "the width)",
                )
            out = [tuple(axes[0][d] for d in kept)]
        elif name in CUMULATIVE:
            d = eqn.params["axis"]
            self.drop(axes[0][d], f"is accumulated along by {why}")
            out = [tuple(None if k == d else f for k, f in enumerate(axes[0]))]
        elif name in WINDOWED:
            out = [self._windowed(eqn, axes[0], why)]
        elif method is not None:
            out = method(eqn, axes, shapes, why)
        else:
            for a in axes:
                for f in a:
                    self.drop(
                        f, f"passes through {why}, which the dependency analysis does not know"
                    )
            out = [(None,) * len(v.aval.shape) for v in eqn.outvars]
        facts = []
        for o, v in zip(out, eqn.outvars):
            if not param:
                o = tuple(self.born(f, n) for f, n in zip(o, v.aval.shape))
            facts.append(Fact(tuple(o), param))
        return facts

    def _elementwise(self, eqn, axes, shapes, why):
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
                    f = self.meet(f, a[d], n, s[d], why)
                    n = max(n, s[d])
            out.append(f)
        return tuple(out)

    def _windowed(self, eqn, a, why):
        p = eqn.params
        out = []
        for d, f in enumerate(a):
            trivial = (
                p["window_dimensions"][d] == 1
                and p["window_strides"][d] == 1
                and tuple(p["padding"][d]) == (0, 0)
                and p["base_dilation"][d] == 1
                and p["window_dilation"][d] == 1
            )
            if not trivial:
                self.drop(f, f"is pooled over by {why}")
            out.append(f if trivial else None)
        return tuple(out)

    def _rule_dot_general(self, eqn, axes, shapes, why):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        la, ra = axes
        ls, rs = shapes
        for i, j in zip(lc, rc):
            self.contract(la[i], ra[j], ls[i], f"contracted by {why}")
        batch = [self.meet(la[i], ra[j], ls[i], rs[j], why) for i, j in zip(lb, rb)]
        lfree = [la[d] for d in range(len(ls)) if d not in lc and d not in lb]
        rfree = [ra[d] for d in range(len(rs)) if d not in rc and d not in rb]
        return [tuple(batch + lfree + rfree)]

    def _rule_conv_general_dilated(self, eqn, axes, shapes, why):
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        la, ra = axes
        ls, rs = shapes
        out: list[Any] = [None] * len(eqn.outvars[0].aval.shape)
        for s in lhs_spec[2:]:
            self.drop(la[s], f"is a spatial axis of {why}")
        groups, lf, rin, rout = p["feature_group_count"], lhs_spec[1], rhs_spec[1], rhs_spec[0]
        if p["batch_group_count"] != 1:
            for f in (*la, *ra):
                self.drop(f, f"feeds {why} with batch_group_count={p['batch_group_count']}")
            return [tuple(out)]
        out[out_spec[0]] = la[lhs_spec[0]]
        if groups == 1:
            self.contract(la[lf], ra[rin], ls[lf], f"contracted by {why}")
            out[out_spec[1]] = ra[rout]
        elif rs[rin] == 1 and rs[rout] == ls[lf] == groups:  # depthwise, multiplier 1
            out[out_spec[1]] = self.meet(la[lf], ra[rout], groups, groups, why)
        else:
            self._grouped_input(la[lf], ra[rin], ra[rout], rs[rin], groups, why)
            out[out_spec[1]] = self.born(ra[rout], rs[rout])
            if _is_layout(out[out_spec[1]]):
                for seg in out[out_spec[1]]:
                    self.spaces.constrain(seg.space, groups)
            else:
                self.drop(out[out_spec[1]], f"is the output of {why} from a non-parameter kernel")
        return [tuple(out)]

    def _grouped_input(self, f, rows, cols, per_group, groups, why):
        """The input channels of a grouped convolution: ``groups`` blocks of ``per_group``.

        Each block must lose equally many channels (the groups keep one width); channel ``c``
        is kernel row ``c % per_group`` for the output columns of block ``c // per_group`` only
        (a ``Member`` with ``blocks=groups``; the kernel is re-gathered per block by shrink).
        """
        if not _is_claim(rows) or not _is_claim(cols):
            self.drop(f, f"feeds {why}, whose kernel is not a parameter")
            return
        if f is None:
            self.drop(
                rows, f"meets an axis that cannot lose channels (model input or constant) {why}"
            )
            return
        col_axis = {p: a for p, a in cols}
        pairs = [(p, a) for p, a in rows if p in col_axis]
        # every convolution group must lose as many channels: the input must be one space
        # spanning the whole axis (parts of other spaces or of the model input could not follow)
        if len(pairs) < len(rows) or not (
            _is_layout(f)
            and len(f) == 1
            and (f[0].offset, f[0].stride) == (0, 0)
            and self.spaces.size[f[0].space] == groups * per_group
        ):
            reason = (
                f"feeds a grouped convolution {why} (feature_group_count={groups}) unaligned "
                "(its input is not one whole channel space)"
            )
            self.drop(f, reason)
            self.drop(rows, reason)
            return
        for seg in f:
            self.spaces.constrain(seg.space, groups)
            for p, a in pairs:
                self.spaces.add(seg, frozenset({(p, a)}), blocks=groups, block_axis=col_axis[p])

    def _unfree(self, f: Any, why: str) -> Any:
        """A free axis used where its width matters: blocked, and a constant axis (``None``)."""
        if _is_layout(f) and self.spaces.is_free(f):
            self.drop(f, f"is a broadcast used by {why}")
            return None
        return f

    def _free_broadcast(self, eqn: Any) -> Fact | None:
        """Facts of a broadcast of a fact-less value (a constant): its free axes, or ``None``
        when it makes none."""
        shape = eqn.invars[0].aval.shape
        [axes] = self._rule_broadcast_in_dim(eqn, [(None,) * len(shape)], [shape], "")
        return Fact(axes, True) if any(a is not None for a in axes) else None

    def _rule_transpose(self, eqn, axes, shapes, why):
        return [tuple(axes[0][d] for d in eqn.params["permutation"])]

    def _rule_broadcast_in_dim(self, eqn, axes, shapes, why):
        out_shape = eqn.outvars[0].aval.shape
        # axes made from nothing (or from a fact-less size-1 axis) are free: see the module doc
        out: list[Any] = [
            (Seg(self.spaces.new(n, free=True)),) if n > 1 else None for n in out_shape
        ]
        for i, d in enumerate(eqn.params["broadcast_dimensions"]):
            if shapes[0][i] == 1 and out_shape[d] != 1:
                if axes[0][i] is not None:
                    self.drop(axes[0][i], f"is broadcast by {why}")
                    out[d] = None
            else:
                out[d] = axes[0][i]
        return [tuple(out)]

    def _rule_squeeze(self, eqn, axes, shapes, why):
        drop = {d % len(shapes[0]) for d in eqn.params["dimensions"]}
        for d in drop:
            self.drop(axes[0][d], f"is squeezed by {why}")
        return [tuple(f for d, f in enumerate(axes[0]) if d not in drop)]

    def _rule_reshape(self, eqn, axes, shapes, why):
        if eqn.params.get("dimensions") is not None:
            return self._unknown_one(eqn, axes, why)
        ins, outs, a = shapes[0], tuple(eqn.outvars[0].aval.shape), axes[0]
        # The walker's reshape rule, on a view of the input axes themselves, gives the input
        # axes behind each output axis (a merge: several; a split: the same ones repeated).
        sources = _reshape_rule(ip.identity_view("", len(ins)), ins, outs).axes
        for k in set(range(len(ins))) - {k for src in sources for k in src}:
            self.drop(a[k], f"is dropped by {why}")
        new: list[Any] = []
        j = 0
        while j < len(outs):
            gi, gj = list(sources[j]), [j]
            while gi and gj[-1] + 1 < len(outs) and sources[gj[-1] + 1] == sources[j]:
                gj.append(gj[-1] + 1)
            j += len(gj)
            live = [k for k in gi if a[k] is not None]
            if not gi:
                new.append(None)  # a size-1 axis added
            elif len(gi) == 1 and len(gj) == 1:
                new.append(a[gi[0]])
            elif not live:
                new.extend([None] * len(gj))
            elif len(gj) == 1 and live == [gi[-1]]:
                outer = math.prod(ins[k] for k in gi[:-1])
                new.append(self.flatten(a[gi[-1]], outer, ins[gi[-1]], why))
            elif len(gj) == 1 and live == [gi[0]]:
                inner = math.prod(ins[k] for k in gi[1:])
                new.append(self.refine(a[gi[0]], inner, why))
            elif len(gi) == 1 and live:
                inner = math.prod(outs[k] for k in gj[1:])
                new.append(self.split(a[gi[0]], inner, why))
                new.extend([None] * (len(gj) - 1))
            else:
                for k in live:
                    self.drop(a[k], f"is split or merged with inner axes by {why}")
                new.extend([None] * len(gj))
        return [tuple(new)]

    def _rule_concatenate(self, eqn, axes, shapes, why):
        dim = eqn.params["dimension"]
        rank = len(shapes[0])
        out: list[Any] = []
        for d in range(rank):
            if d != dim:
                f = axes[0][d]
                for a, s in zip(axes[1:], shapes[1:]):
                    f = self.meet(f, a[d], shapes[0][d], s[d], why)
                out.append(f)
                continue
            segs: list[Seg] = []
            offset = 0
            for k, (a, s) in enumerate(zip(axes, shapes)):
                f = a[d]
                if _is_layout(f) and (k == len(axes) - 1 or all(x.stride == 0 for x in f)):
                    segs += [Seg(x.space, x.offset + offset, x.stride) for x in f]
                elif f is not None:
                    self.drop(f, f"is concatenated by {why}")
                offset += s[d]
            out.append(tuple(segs) or None)
        return [tuple(out)]

    def _full_or_drop(self, a, full, why):
        return tuple(f if ok else self.drop(f, f"is sliced by {why}") for f, ok in zip(a, full))

    def _rule_slice(self, eqn, axes, shapes, why):
        p = eqn.params
        strides = p["strides"] or (1,) * len(shapes[0])
        full = [
            s == 0 and e == n and st == 1
            for s, e, st, n in zip(p["start_indices"], p["limit_indices"], strides, shapes[0])
        ]
        return [self._full_or_drop(axes[0], full, why)]

    def _rule_dynamic_slice(self, eqn, axes, shapes, why):
        for a in axes[1:]:
            for f in a:
                self.drop(f, f"indexes {why}")
        full = [s == n for s, n in zip(eqn.params["slice_sizes"], shapes[0])]
        return [self._full_or_drop(axes[0], full, why)]

    def _rule_pad(self, eqn, axes, shapes, why):
        full = [tuple(c) == (0, 0, 0) for c in eqn.params["padding_config"]]
        return [self._full_or_drop(axes[0], full, why)]

    def _rule_rev(self, eqn, axes, shapes, why):
        full = [d not in eqn.params["dimensions"] for d in range(len(shapes[0]))]
        return [self._full_or_drop(axes[0], full, why)]

    def _rule_split(self, eqn, axes, shapes, why):
        d = eqn.params["axis"]
        self.drop(axes[0][d], f"is split by {why}")
        kept = tuple(None if k == d else f for k, f in enumerate(axes[0]))
        return [kept] * len(eqn.outvars)

    def _rule_gather(self, eqn, axes, shapes, why):
        p = eqn.params
        dn = p["dimension_numbers"]
        for f in axes[1]:
            self.drop(f, f"indexes {why}")
        if dn.operand_batching_dims:
            return self._unknown_one(eqn, axes, why)
        out: list[Any] = [None] * len(eqn.outvars[0].aval.shape)
        window = [d for d in range(len(shapes[0])) if d not in dn.collapsed_slice_dims]
        for d in dn.collapsed_slice_dims:
            self.drop(axes[0][d], f"is indexed by {why}")
        for d, o in zip(window, dn.offset_dims):
            if p["slice_sizes"][d] == shapes[0][d]:
                out[o] = axes[0][d]
            else:
                self.drop(axes[0][d], f"is sliced by {why}")
        return [tuple(out)]

    def _unknown_one(self, eqn, axes, why):
        for a in axes:
            for f in a:
                self.drop(f, f"passes through {why}, which the dependency analysis does not know")
        return [(None,) * len(v.aval.shape) for v in eqn.outvars]

    # -- driving --------------------------------------------------------------------------------

    def initial(self, traced: ip.Traced) -> list[Fact]:
        """Facts of the flat inputs: parameters claim their axes, other inputs are activations."""
        out = []
        for path, leaf in zip(traced.paths, traced.leaves):
            ndim = len(leaf.shape)
            if path is not None:
                self.spaces.shapes[path] = tuple(leaf.shape)
            if path is None:
                out.append(Fact((None,) * ndim, False))
            else:
                out.append(Fact(tuple(frozenset({(path, d)}) for d in range(ndim)), True))
        return out

    def finish(self, outfacts: list[Fact | None]) -> None:
        """Outputs keep their width: block their spaces."""
        for k, f in enumerate(outfacts):
            if f is None:
                continue
            for d, a in enumerate(f.axes):
                self.drop(a, f"reaches the model output (output {k}, axis {d})")


def analyze(fn: Callable[..., Any], params: Params, args: tuple) -> tuple[ip.Traced, Dependencies]:
    """Trace ``fn(params, *args)`` and run the analysis abstractly (no FLOPs)."""
    traced = ip.trace_params(fn, params, args)
    deps = Dependencies()

    def run(*leaves):
        outs, facts = deps.run(traced.jaxpr, list(leaves), deps.initial(traced))
        deps.finish(facts)
        return outs

    ip.run_abstract(traced, run)
    return traced, deps


def dependencies(fn: Callable[..., Any], params: Params, *args: Any) -> list[Group]:
    """Groups of parameter axes that must lose the same channels together, from ``fn``'s jaxpr.

    ``fn`` is called as ``fn(params, *args)`` and traced once (``args`` may be arrays or
    ``jax.ShapeDtypeStruct`` s: only shapes matter). Every channel *space* — born at a kernel's
    output axis (Dense ``(in, out)``: axis 1; Conv ``(kh, kw, in, out)``: axis 3) — collects the
    parameter axes it meets:

    * the kernel's output axis and its bias (``Member(path, axis)``);
    * norm parameters applied per channel: BatchNorm ``scale``/``bias`` and the running
      ``mean``/``var`` in ``batch_stats``. Pass the whole variables dict as ``params`` with
      ``fn = lambda v, x: model.apply(v, x)`` and the inference-mode model
      (``use_running_average=True``), so the statistics are inputs rather than outputs;
    * the next kernel's contracting axis, through elementwise activations, pooling over spatial
      axes and channel-last flattens (``x.reshape(n, -1)`` after an NHWC conv: channel ``c``
      occupies rows ``c, c + C, c + 2C, ...`` of the next kernel, ``Member(stride=C)``);
    * concatenations (``Member(offset=...)`` per concatenated part);
    * both sides of an elementwise op between activations: a residual add merges the spaces of
      every layer writing into the stream into one group; ``q @ k`` contracts ``q``'s and ``k``'s
      head dimensions together and its batch axes tie their heads; a depthwise convolution
      (``feature_group_count`` = channels, multiplier 1) passes its input's channels through;
    * grouped convolutions (``feature_group_count = G``): the output channels and the input
      channels each form ``G`` blocks (``Group.blocks``) that must lose equally many channels, so
      every convolution group keeps one width and ``feature_group_count`` stays ``G``; the
      kernel's input axis is a ``Member(blocks=G, block_axis=out_axis)``: input channel ``c`` is
      row ``c % (C_in / G)`` of the output columns of block ``c // (C_in / G)`` only, and
      ``shrink`` gathers the kernel rows block by block;
    * a channel axis reshaped to ``(outer, inner...)`` makes runs of ``inner`` channels the unit
      (``Member.width``): GroupNorm(``num_groups=G``) normalises over each run of ``C / G``
      channels, so removing one channel would change its group's mean and variance (masked
      would differ from shrunk); its unit is a whole norm group, with every member coupled to it
      (conv columns, scale, bias, the next layer's rows), and ``num_groups`` shrinks while the
      group size stays. Heads split out of one Dense output (``(..., H * D) -> (..., H, D)``)
      are pruned as whole heads; grouped-query attention (``q`` reshaped to
      ``(..., kv_heads, rep, head_dim)``, or ``k``/``v`` expanded with ``jnp.repeat``) groups
      each key/value head with its ``rep`` query heads and the output projection's rows;
    * a channel-first flatten (``(N, C, H, W) -> (N, C * H * W)``): channel ``c`` is the run of
      ``H * W`` rows ``c * H * W ...`` of the next kernel (``Member(width=H * W)``);
    * ``scan`` bodies (``nn.scan`` layer stacks): a kernel stacked along ``xs`` has its members on
      its own axes (``(layers, in, out)``: axis 2). A group whose members are all whole axes of
      kernels stacked by one scan of ``L`` layers (an MLP's hidden units inside each layer) has
      ``L * units`` channels in ``L`` blocks along the stacked axis (``Member(blocks=L,
      block_axis=0)``): each layer loses its own channels, as many in every layer, so the stack
      stays rectangular. Any other group through the body (the carry: a residual stream through
      the stack, tied in and out of the body) loses the same channels in every layer. Give
      ``structured_masks`` the stacked kernels' roles (``Role(..., stacked=(0,))``).

    A group is ``blocked`` (with the reason, naming the primitive and the module from JAX's name
    stack) when a space reaches: the model output; a reduction over the channel axis (LayerNorm,
    RMSNorm, softmax, a mean over features); a reshape that splits channels into runs that do not
    align with its parts, or merges them with inner axes that carry channels; a slice, pad, reverse,
    gather or cumulative op along it; a grouped convolution whose groups do not align with its
    input's parts, or whose blocks do not divide the group's units (a GroupNorm group straddling two
    convolution groups) or hold one unit each (the input of a depthwise convolution with a channel
    multiplier); the stacked outputs ``ys`` of a ``scan``; a primitive the analysis does not know
    (including ``cond`` and ``while`` bodies: nothing inside them is analysed); or an axis that
    cannot lose channels (the model input, a constant). Groups whose member axes are also used where
    they cannot shrink (contracted against the model input, indexed by a gather) are blocked too.

    A value broadcast along a channel axis (an attention mask ``(batch, 1, q, k)`` that
    ``jnp.where`` broadcasts over the heads, ``jnp.ones_like(h)``, a scalar constant) is the same
    at every channel: it meets the channels elementwise without blocking them, and ``shrink``
    broadcasts it to the smaller width. Contracted against a channel axis (``h @ jnp.ones(...)``,
    a sum over channels) or used in any other way, it blocks them as a constant does.

    The analysis is conservative, not clever: an array that varies along a channel axis but does
    not come from the parameters (a dropout mask in training mode, the model input) blocks it, so
    analyse the inference function; the inner part of a split channel axis is never pruned (heads
    split out of one Dense output lose whole heads, not head dimensions: ``DenseGeneral``'s
    ``(features, heads, head_dim)`` kernel allows both).

    Args:
      fn: ``fn(params, *args)``.
      params: the parameter tree (linen variables dict, ``nnx.State``, nested dicts, ...).
      *args: example inputs.

    Returns:
      Every group, in the order spaces were born (``Group.size`` counts its units). Members are
      sorted by the leaves' tree order, then axis and offset. Pass the list to
      ``structured_masks(..., groups=...)`` (blocked groups are skipped there) and the masks to
      :func:`jcompress.structure.shrink`.

    >>> import jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
    ...           "b": {"kernel": jnp.ones((8, 2))}}
    >>> def fn(p, x):
    ...     h = jnp.maximum(x @ p["a"]["kernel"] + p["a"]["bias"], 0)
    ...     return h @ p["b"]["kernel"]
    >>> hidden, out = dependencies(fn, params, jnp.ones((3, 4)))
    >>> [(m.path, m.axis) for m in hidden.members], hidden.size, hidden.blocked
    ([('a/bias', 0), ('a/kernel', 1), ('b/kernel', 0)], 8, None)
    >>> out.blocked
    'reaches the model output (output 0, axis 1)'
    """
    _, deps = analyze(fn, params, args)
    order = {p: i for i, (p, _) in enumerate(leaves_with_paths(params))}
    return list(deps.spaces.groups(order).values())
