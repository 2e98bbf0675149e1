"""The jaxpr walker: one abstract interpreter shared by every runtime transform.

``roles``, ``capture``, ``tap``, ``compressed`` (and channel-dependency analysis) all need the
same thing: run a function's jaxpr forward, equation by equation, knowing for every variable
whether it is a *view* of a parameter leaf (the leaf itself, or the leaf seen through
reshapes, transposes, broadcasts, slices, squeezes, dtype casts and copies) and with which axis
map, and act where such a view is *consumed* (``dot_general``, ``conv_general_dilated``,
``gather``, ``dynamic_slice``).

:class:`Interpreter` does that forward pass. Every variable carries a value (a concrete array, a
tracer, or a :class:`Deferred` compressed leaf not yet dequantized) and a fact (a :class:`View`
or ``None``). Subclasses override :meth:`Interpreter.consume` (what to do at a consumer) and,
for other analyses, :meth:`Interpreter.transfer` (facts through any other primitive). Higher-
order primitives are walked recursively: ``jit`` (``pjit``), ``closed_call``, ``remat``
(``checkpoint``), ``custom_jvp_call`` and ``custom_vjp_call`` are inlined; ``scan``, ``cond`` and
``while`` are re-emitted with interpreted bodies, a parameter sliced by ``scan``'s ``xs`` getting
the sliced axis as a *stacked* axis. Equations that no parameter view reaches are bound unchanged
(custom differentiation rules, sharding and effects are kept). A parameter view reaching any other
higher-order primitive (``shard_map``, ``pallas_call``, ...) is a ``ValueError`` naming it.

Array-valued results a subclass computes inside a ``scan`` body (calibration statistics,
activations) are :meth:`Interpreter.emit` ted; the walker threads them out of the loop as extra
stacked outputs (leading axis: the iteration) and hands them to :meth:`Interpreter.unstack`.

Primitives are matched through ``jax.extend.core.primitives`` where it lists them, by name
otherwise. Supported JAX versions: 0.10 (tested on 0.10.2; ``pyproject.toml`` sets that
floor); the primitive names and parameters used here are those of that release (``jit``,
``remat2``, ``scan(jaxpr=ClosedJaxpr)``, ``while(cond_jaxpr, body_jaxpr)``, ``cond(branches)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import numpy as np
from jax import lax

from jcompress.tree import is_compressed, leaves_with_paths

__all__ = [
    "Deferred",
    "Interpreter",
    "Traced",
    "View",
    "bind",
    "identity_view",
    "is_array_like",
    "leaf_names",
    "reshape_groups",
    "stand_in",
    "trace",
]

_P = jex.core.primitives


def _name(p: Any) -> str:
    return p.name


# Primitives whose single output is a view of their first operand.
VIEW_PRIMITIVES = {
    _name(_P.transpose_p),
    _name(_P.reshape_p),
    _name(_P.broadcast_in_dim_p),
    _name(_P.squeeze_p),
    _name(_P.convert_element_type_p),
    _name(_P.copy_p),
    _name(_P.slice_p),
    _name(_P.rev_p),
    _name(_P.reduce_precision_p),
    _name(_P.sharding_constraint_p),
    "copy_p",
}
DOT = _name(_P.dot_general_p)
CONV = _name(_P.conv_general_dilated_p)
GATHER = _name(_P.gather_p)
DYNAMIC_SLICE = _name(_P.dynamic_slice_p)
CONSUMERS = {DOT, CONV, GATHER, DYNAMIC_SLICE}

INLINED = {
    _name(_P.jit_p),
    _name(_P.closed_call_p),
    _name(_P.call_p),
    _name(_P.remat_p),
    _name(_P.custom_jvp_call_p),
    _name(_P.custom_vjp_call_p),
    "pjit",
    "checkpoint",
    "custom_vjp_call_jaxpr",
}
SCAN = _name(_P.scan_p)
COND = _name(_P.cond_p)
WHILE = _name(_P.while_p)


# ----------------------------------------------------------------------------------------------
# Facts and deferred values
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class View:
    """Fact: a variable is a view of the parameter leaf at ``path``.

    Attributes:
      path: the leaf's path (``jcompress.tree`` naming).
      axes: one entry per axis of the variable: the leaf axes it spans (``()`` for an axis a
        broadcast or ``expand_dims`` added; several for a reshape that merged leaf axes).
      stacked: leaf axes sliced away by ``scan`` (each slice a separate layer).
      exact: ``False`` once a reshape split a leaf axis or a slice/reverse reordered elements:
        the axis map is then only a coarse one.
    """

    path: str
    axes: tuple[tuple[int, ...], ...]
    stacked: tuple[int, ...] = ()
    exact: bool = True

    def leaf_axes(self, dims: Sequence[int]) -> tuple[int, ...]:
        """The leaf axes spanned by the variable axes ``dims`` (sorted, unique)."""
        return tuple(sorted({a for d in dims for a in self.axes[d]}))


def identity_view(path: str, ndim: int) -> View:
    """The fact of a parameter leaf itself."""
    return View(path, tuple((i,) for i in range(ndim)))


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A value not yet materialized: ``base`` (a compressed leaf or array) seen through ``ops``.

    ``ops`` are ``(primitive, params)`` pairs of single-operand view primitives, replayed on
    ``base.dequantize()`` by :meth:`materialize`.
    """

    base: Any
    ops: tuple[tuple[Any, dict], ...] = ()

    def materialize(self) -> jax.Array:
        x = self.base.dequantize() if is_compressed(self.base) else self.base
        for prim, params in self.ops:
            x = prim.bind(x, **params)
        return x


def _view_rule(eqn: Any, fact: View) -> View:
    """The fact of a view primitive's output given its operand's fact."""
    name = eqn.primitive.name
    p = eqn.params
    in_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    axes = fact.axes
    if name == "transpose":
        return dataclasses.replace(fact, axes=tuple(axes[i] for i in p["permutation"]))
    if name == "broadcast_in_dim":
        new = [()] * len(out_shape)
        for i, d in enumerate(p["broadcast_dimensions"]):
            new[d] = axes[i]
        return dataclasses.replace(fact, axes=tuple(new))
    if name == "squeeze":
        drop = {d % len(in_shape) for d in p["dimensions"]}
        return dataclasses.replace(fact, axes=tuple(a for i, a in enumerate(axes) if i not in drop))
    if name == "reshape":
        return _reshape_rule(fact, in_shape, out_shape)
    if name in ("slice", "rev"):
        return dataclasses.replace(fact, exact=fact.exact and name == "slice")
    return fact  # dtype casts, copies, sharding constraints


def reshape_groups(
    in_shape: Sequence[int], out_shape: Sequence[int]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """How a reshape maps axes: ``[(input axes, output axes), ...]`` runs of equal products.

    A size-1 axis dropped is ``((i,), ())``, one added ``((), (j,))``; a merge is
    ``((i, i + 1), (j,))`` and a split ``((i,), (j, j + 1))``.

    >>> reshape_groups((2, 3, 4), (6, 1, 4))
    [((0, 1), (0,)), ((), (1,)), ((2,), (2,))]
    """
    groups: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in or j < n_out:
        if i < n_in and in_shape[i] == 1 and (j >= n_out or out_shape[j] != 1):
            groups.append(((i,), ()))
            i += 1
            continue
        if j < n_out and out_shape[j] == 1 and (i >= n_in or in_shape[i] != 1):
            groups.append(((), (j,)))
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            else:
                pj *= out_shape[j]
                gj.append(j)
                j += 1
        groups.append((tuple(gi), tuple(gj)))
    return groups


def _reshape_rule(fact: View, in_shape: Sequence[int], out_shape: Sequence[int]) -> View:
    """Map axes through a reshape; a split leaves every piece spanning the whole source."""
    new: list[tuple[int, ...]] = []
    exact = fact.exact
    for gi, gj in reshape_groups(in_shape, out_shape):
        src = tuple(sorted({a for k in gi for a in fact.axes[k]}))
        exact = exact and len(gj) <= 1
        new.extend([src] * len(gj))
    return dataclasses.replace(fact, axes=tuple(new), exact=exact)


# ----------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------


def is_array_like(x: Any) -> bool:
    """Whether ``x`` is traced by the runtime (arrays, tracers, stand-ins, compressed leaves)."""
    return (
        isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)
        or is_compressed(x)
        or isinstance(x, jax.core.Tracer)
    )


def stand_in(x: Any) -> Any:
    """The abstract value a leaf is traced as (compressed leaves: their float shape/dtype)."""
    if is_compressed(x):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return x


@dataclasses.dataclass(frozen=True)
class Traced:
    """A function traced for the walker.

    Attributes:
      jaxpr: the closed jaxpr of ``fn`` over the flat dynamic leaves.
      paths: the path of every flat dynamic leaf (``None`` for those that are not parameters).
      leaves: the flat dynamic leaves (compressed leaves as themselves).
      out_tree: the output tree definition.
    """

    jaxpr: Any
    paths: tuple[str | None, ...]
    leaves: tuple[Any, ...]
    out_tree: Any

    def facts(self) -> list[View | None]:
        return [
            None if p is None else identity_view(p, len(x.shape))
            for p, x in zip(self.paths, self.leaves)
        ]


def leaf_names(args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
    """Names of the leaves of ``tree_flatten((args, kwargs), is_leaf=is_compressed)``.

    The first argument's leaves by their plain path, the others as ``args[i]/path`` and
    ``kwargs[name]/path``: how the runtime names compressed leaves.
    """
    names = []
    for i, a in enumerate(args):
        names += [p for p, _ in _named_leaves(a, None if i == 0 else f"args[{i}]")]
    for k in sorted(kwargs):
        names += [p for p, _ in _named_leaves(kwargs[k], f"kwargs[{k}]")]
    return names


def _named_leaves(tree: Any, prefix: str | None) -> list[tuple[str, Any]]:
    pairs = leaves_with_paths(tree)
    if prefix is None:
        return pairs
    return [(f"{prefix}/{p}" if p else prefix, x) for p, x in pairs]


def trace(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    param_args: Sequence[int] = (0,),
    name_all: bool = False,
) -> Traced:
    """Trace ``fn(*args, **kwargs)`` to a closed jaxpr over its array leaves.

    Array leaves (and compressed leaves, traced as ``ShapeDtypeStruct`` s of their float shape)
    are dynamic; anything else is static (closed over). Leaves of the arguments in
    ``param_args`` are parameters, named by their path (the first argument's leaves by their plain
    path); with ``name_all`` every compressed leaf of any argument is named
    (``args[i]/...`` / ``kwargs[name]/...``).
    """
    kwargs = dict(kwargs or {})
    named: list[tuple[str | None, Any]] = []
    sources: list[tuple[Any, list[tuple[str, Any]]]] = []
    for i, a in enumerate(args):
        prefix = None if i == 0 else f"args[{i}]"
        pairs = _named_leaves(a, prefix)
        sources.append((("arg", i), pairs))
        is_param = i in param_args
        for p, x in pairs:
            if not _is_array_like(x):
                continue
            named.append((p if is_param or (name_all and is_compressed(x)) else None, x))
    for k in sorted(kwargs):
        pairs = _named_leaves(kwargs[k], f"kwargs[{k}]")
        sources.append((("kw", k), pairs))
        for p, x in pairs:
            if _is_array_like(x):
                named.append((p if name_all and is_compressed(x) else None, x))

    flat_args, treedef = jax.tree_util.tree_flatten((tuple(args), kwargs), is_leaf=is_compressed)
    dynamic = [i for i, x in enumerate(flat_args) if _is_array_like(x)]
    out_tree_box: list[Any] = []

    def flat_fn(*dyn):
        full = list(flat_args)
        for i, d in zip(dynamic, dyn):
            full[i] = d
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        out = fn(*a, **kw)
        leaves, out_tree = jax.tree_util.tree_flatten(out)
        out_tree_box.append(out_tree)
        return leaves

    dyn_leaves = [flat_args[i] for i in dynamic]
    jaxpr = jax.make_jaxpr(flat_fn)(*[_stand_in(x) for x in dyn_leaves])
    assert len(named) == len(dyn_leaves)
    return Traced(
        jaxpr=jaxpr,
        paths=tuple(p for p, _ in named),
        leaves=tuple(dyn_leaves),
        out_tree=out_tree_box[-1],
    )


_is_array_like = is_array_like
_stand_in = stand_in


# ----------------------------------------------------------------------------------------------
# The interpreter
# ----------------------------------------------------------------------------------------------


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Evaluate one equation on ``invals`` (a list of outputs, also for single results)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        invals = [*subfuns, *invals]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _has_subjaxpr(eqn: Any) -> bool:
    return any(True for _ in jex.core.jaxprs_in_params(eqn.params))


_bind = bind


class Interpreter:
    """A forward pass over a closed jaxpr with per-variable values and facts.

    Subclasses override :meth:`consume` (a parameter view reaching ``dot_general``,
    ``conv_general_dilated``, ``gather`` or ``dynamic_slice``) and :meth:`transfer` (facts through
    any other first-order primitive; the default drops them).

    >>> import jax.numpy as jnp
    >>> traced = trace(lambda p, x: x @ p["w"].T, ({"w": jnp.ones((3, 2))}, jnp.ones((4, 2))))
    >>> seen = []
    >>> class Spy(Interpreter):
    ...     def consume(self, eqn, invals, facts):
    ...         seen.append([f.axes for f in facts if f is not None])
    ...         return super().consume(eqn, invals, facts)
    >>> outs, _ = Spy().run(traced.jaxpr, list(traced.leaves), traced.facts())
    >>> outs[0].shape, seen
    ((4, 3), [[((1,), (0,))]])
    """

    def __init__(self) -> None:
        self._frames: list[dict[Any, Any]] = [{}]

    # -- hooks ------------------------------------------------------------------------------

    def consume(self, eqn: Any, invals: list[Any], facts: list[View | None]) -> list[Any]:
        """Evaluate a consumer equation one of whose operands is a parameter view."""
        return _bind(eqn, [self.materialize(v) for v in invals])

    def transfer(self, eqn: Any, facts: list[View | None]) -> list[View | None]:
        """Facts of a first-order, non-view, non-consumer equation's outputs (default: none)."""
        return [None] * len(eqn.outvars)

    def unstack(self, key: Any, value: Any, stacked: bool) -> Any:
        """A record emitted inside a ``scan`` body, stacked over iterations (leading axis)."""
        del key, stacked
        return value

    # -- records ----------------------------------------------------------------------------

    def emit(self, key: Any, value: Any) -> None:
        """Record an array-valued result (threaded out of ``scan`` bodies)."""
        frame = self._frames[-1]
        if key in frame:
            raise ValueError(f"{key}: recorded twice in one body")
        frame[key] = value

    @property
    def records(self) -> dict[Any, Any]:
        return self._frames[0]

    # -- evaluation -------------------------------------------------------------------------

    @staticmethod
    def materialize(value: Any) -> Any:
        return value.materialize() if isinstance(value, Deferred) else value

    def run(
        self, closed: Any, args: Sequence[Any], facts: Sequence[View | None]
    ) -> tuple[list[Any], list[View | None]]:
        """Run a closed jaxpr; returns output values and facts."""
        jaxpr = closed.jaxpr if hasattr(closed, "jaxpr") else closed
        consts = list(getattr(closed, "consts", ()))
        env: dict[Any, tuple[Any, View | None]] = {}

        def read(v):
            if isinstance(v, jex.core.Literal):
                return v.val, None
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = (c, None)
        for v, a, f in zip(jaxpr.invars, args, facts):
            env[v] = (a, f)
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            invals = [x for x, _ in ins]
            infacts = [f for _, f in ins]
            outvals, outfacts = self.step(eqn, invals, infacts)
            for v, x, f in zip(eqn.outvars, outvals, outfacts):
                env[v] = (x, f)
        outs = [read(v) for v in jaxpr.outvars]
        return [x for x, _ in outs], [f for _, f in outs]

    def step(
        self, eqn: Any, invals: list[Any], infacts: list[View | None]
    ) -> tuple[list[Any], list[View | None]]:
        """Evaluate one equation: views, consumers, higher-order primitives, the rest."""
        name = eqn.primitive.name
        reached = any(f is not None for f in infacts) or any(
            isinstance(v, Deferred) for v in invals
        )
        if not reached:
            return _bind(eqn, invals), [None] * len(eqn.outvars)
        if name in VIEW_PRIMITIVES and len(invals) == 1 and infacts[0] is not None:
            fact = _view_rule(eqn, infacts[0])
            x = invals[0]
            if isinstance(x, Deferred):
                params = eqn.primitive.get_bind_params(eqn.params)
                if isinstance(params, tuple):
                    params = params[1]
                return [Deferred(x.base, (*x.ops, (eqn.primitive, params)))], [fact]
            return _bind(eqn, [x]), [fact]
        if name in CONSUMERS:
            return self.consume(eqn, invals, infacts), [None] * len(eqn.outvars)
        if name in INLINED:
            return self._inline(eqn, invals, infacts)
        if name == SCAN:
            return self._scan(eqn, invals, infacts)
        if name == COND:
            return self._cond(eqn, invals, infacts)
        if name == WHILE:
            return self._while(eqn, invals, infacts)
        if _has_subjaxpr(eqn):
            paths = sorted({f.path for f in infacts if f is not None})
            raise ValueError(
                f"the jcompress runtime cannot look inside the higher-order primitive "
                f"{name!r}, which receives the parameter(s) {paths}; supported: jit, "
                "closed_call, remat/checkpoint, custom_jvp_call, custom_vjp_call, scan, cond, "
                "while. Apply the transform inside it (e.g. inside the shard_map body) or keep "
                "those parameters uncompressed"
            )
        outfacts = self.transfer(eqn, infacts)
        return _bind(eqn, [self.materialize(v) for v in invals]), outfacts

    # -- higher-order primitives ------------------------------------------------------------

    def _inline(self, eqn, invals, infacts):
        p = eqn.params
        sub = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
        return self.run(sub, invals, infacts)

    def _frame(self):
        self._frames.append({})

    def _pop(self):
        return self._frames.pop()

    def _no_records(self, name: str, records: dict) -> None:
        if records:
            raise ValueError(
                f"{sorted(map(str, records))[:3]}: this transform records values inside "
                f"{name!r}, which cannot return them; only scan bodies are supported"
            )

    def _scan(self, eqn, invals, infacts):
        p = eqn.params
        body = p["jaxpr"]
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
        cf, xf = infacts[:nc], infacts[nc + nk :]
        carry = [self.materialize(c) for c in carry]  # a parameter in the carry is a value
        x_facts, x_vals, x_ops = [], [], []
        for v, f in zip(xs, xf):
            if f is not None:
                f = dataclasses.replace(
                    f, axes=f.axes[1:], stacked=tuple(sorted({*f.stacked, *f.axes[0]}))
                )
            if isinstance(v, Deferred) and not v.ops:
                x_vals.append(v.base)  # a compressed leaf, sliced by scan along its axis 0
                x_ops.append(True)
            else:
                x_vals.append(self.materialize(v))
                x_ops.append(False)
            x_facts.append(f)
        keys_box: list[list[Any]] = []
        n_out_carry = nk

        def fn(c, x):
            self._frame()
            x = [Deferred(xv) if d else xv for xv, d in zip(x, x_ops)]
            outs, _ = self.run(body, [*consts, *c, *x], [*cf, *([None] * nk), *x_facts])
            records = self._pop()
            keys_box.append(list(records))
            outs = [self.materialize(o) for o in outs]
            return outs[:n_out_carry], (outs[n_out_carry:], [records[k] for k in records])

        c_out, (ys, recs) = lax.scan(
            fn,
            carry,
            x_vals,
            length=p["length"],
            reverse=p["reverse"],
            unroll=p["unroll"],
        )
        stacked_keys = {f.path for f in x_facts if f is not None and f.stacked}
        for k, r in zip(keys_box[-1], recs):
            self.emit(k, self.unstack(k, r, _key_path(k) in stacked_keys))
        return [*c_out, *ys], [None] * len(eqn.outvars)

    def _cond(self, eqn, invals, infacts):
        branches = eqn.params["branches"]
        index, ops, facts = invals[0], invals[1:], infacts[1:]
        index = self.materialize(index)
        bases = [v.base if isinstance(v, Deferred) else v for v in ops]
        opss = [v.ops if isinstance(v, Deferred) else None for v in ops]

        def make(br):
            def f(*bs):
                vals = [b if o is None else Deferred(b, o) for b, o in zip(bs, opss)]
                self._frame()
                outs, _ = self.run(br, vals, facts)
                self._no_records("cond", self._pop())
                return [self.materialize(o) for o in outs]

            return f

        outs = lax.switch(index, [make(b) for b in branches], *bases)
        return list(outs), [None] * len(eqn.outvars)

    def _while(self, eqn, invals, infacts):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cc, bc, carry = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
        ccf, bcf = infacts[:cn], infacts[cn : cn + bn]
        carry = [self.materialize(c) for c in carry]
        nk = len(carry)

        def cond_fn(c):
            self._frame()
            (out,), _ = self.run(p["cond_jaxpr"], [*cc, *c], [*ccf, *([None] * nk)])
            self._no_records("while", self._pop())
            return self.materialize(out)

        def body_fn(c):
            self._frame()
            outs, _ = self.run(p["body_jaxpr"], [*bc, *c], [*bcf, *([None] * nk)])
            self._no_records("while", self._pop())
            return [self.materialize(o) for o in outs]

        return list(lax.while_loop(cond_fn, body_fn, carry)), [None] * len(eqn.outvars)


def _key_path(key: Any) -> Any:
    return key[0] if isinstance(key, tuple) else key
