"""The jaxpr walker: one abstract interpreter shared by every runtime transform.

``roles``, ``capture``, ``tap``, ``compressed`` (and channel-dependency analysis) all need the
same thing: run a function's jaxpr forward, equation by equation, knowing for every variable
whether it is a *view* of a parameter leaf (the leaf itself, or the leaf seen through
reshapes, transposes, broadcasts, slices, squeezes, dtype casts and copies) and with which axis
map, and act where such a view is *consumed* (``dot_general``, ``conv_general_dilated``,
``gather``, ``dynamic_slice``).

:class:`Interpreter` does that forward pass. Every variable carries a value (a concrete array, a
tracer, or a :class:`~jcompress.runtime._views.Deferred` compressed leaf not yet dequantized)
and a fact (a :class:`~jcompress.runtime._views.View` or ``None``). Subclasses override
:meth:`Interpreter.consume` (what to do at a consumer) and, for other analyses,
:meth:`Interpreter.transfer` (facts through any other primitive). Equations that no parameter
view reaches are bound unchanged (custom differentiation rules, sharding and effects are kept).
Higher-order primitives are walked by :mod:`jcompress.runtime._control`.

The walker's parts, one module each: ``_primitives`` (the primitives it knows, the supported
JAX versions), ``_views`` (facts and deferred values through view primitives), ``_trace``
(tracing a function of pytrees, leaf names), ``_control`` (``jit``, ``scan``, ``cond``,
``while``, ...) and this module (the forward pass). The names a transform needs are
re-exported here, so a transform imports this one module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.extend as jex

from jcompress.runtime._control import HIGHER_ORDER, unsupported
from jcompress.runtime._control import inline as inline
from jcompress.runtime._control import rescan as rescan
from jcompress.runtime._control import split_scan as split_scan
from jcompress.runtime._primitives import COND as COND
from jcompress.runtime._primitives import CONSUMERS as CONSUMERS
from jcompress.runtime._primitives import CONV as CONV
from jcompress.runtime._primitives import DOT as DOT
from jcompress.runtime._primitives import DYNAMIC_SLICE as DYNAMIC_SLICE
from jcompress.runtime._primitives import GATHER as GATHER
from jcompress.runtime._primitives import INDEXING as INDEXING
from jcompress.runtime._primitives import INLINED as INLINED
from jcompress.runtime._primitives import SCAN as SCAN
from jcompress.runtime._primitives import VIEW_PRIMITIVES as VIEW_PRIMITIVES
from jcompress.runtime._primitives import WHILE as WHILE
from jcompress.runtime._primitives import bind as bind
from jcompress.runtime._primitives import has_subjaxpr
from jcompress.runtime._trace import Traced as Traced
from jcompress.runtime._trace import is_array_like as is_array_like
from jcompress.runtime._trace import leaf_names as leaf_names
from jcompress.runtime._trace import run_abstract as run_abstract
from jcompress.runtime._trace import stand_in as stand_in
from jcompress.runtime._trace import trace as trace
from jcompress.runtime._trace import trace_params as trace_params
from jcompress.runtime._views import Deferred as Deferred
from jcompress.runtime._views import View as View
from jcompress.runtime._views import identity_view as identity_view
from jcompress.runtime._views import reshape_groups as reshape_groups
from jcompress.runtime._views import view_rule

__all__ = ["Interpreter"]


class Interpreter:
    """A forward pass over a closed jaxpr with per-variable values and facts.

    Subclasses override :meth:`consume` (a parameter view reaching ``dot_general``,
    ``conv_general_dilated``, ``gather`` or ``dynamic_slice``) and :meth:`transfer` (facts through
    any other first-order primitive; the default drops them). Array-valued results a subclass
    computes are :meth:`emit` ted into :attr:`records`; inside a ``scan`` body they are threaded
    out of the loop, stacked over iterations, and handed to :meth:`unstack`.

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
        return bind(eqn, [self.materialize(v) for v in invals])

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

    def run_body(
        self, closed: Any, args: Sequence[Any], facts: Sequence[View | None]
    ) -> tuple[list[Any], dict[Any, Any]]:
        """Run a loop or branch body in its own record frame.

        Returns the materialized outputs (a body returns values, not views) and the records
        the body emitted.
        """
        self._frames.append({})
        try:
            outs, _ = self.run(closed, args, facts)
        finally:
            records = self._frames.pop()
        return [self.materialize(o) for o in outs], records

    def step(
        self, eqn: Any, invals: list[Any], infacts: list[View | None]
    ) -> tuple[list[Any], list[View | None]]:
        """Evaluate one equation: views, consumers, higher-order primitives, the rest."""
        name = eqn.primitive.name
        reached = any(f is not None for f in infacts) or any(
            isinstance(v, Deferred) for v in invals
        )
        if not reached:
            return bind(eqn, invals), [None] * len(eqn.outvars)
        if name in VIEW_PRIMITIVES and len(invals) == 1 and infacts[0] is not None:
            fact = view_rule(eqn, infacts[0])
            x = invals[0]
            if isinstance(x, Deferred):
                return [x.through(eqn)], [fact]
            return bind(eqn, [x]), [fact]
        if name in CONSUMERS:
            return self.consume(eqn, invals, infacts), [None] * len(eqn.outvars)
        walk = HIGHER_ORDER.get(name)
        if walk is not None:
            return walk(self, eqn, invals, infacts)
        if has_subjaxpr(eqn):
            raise unsupported(eqn, infacts)
        outfacts = self.transfer(eqn, infacts)
        return bind(eqn, [self.materialize(v) for v in invals]), outfacts
