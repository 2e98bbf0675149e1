"""The JAX primitives the jaxpr walker knows by name, and how it binds an equation.

This module is the walker's whole surface on JAX's internals. Primitives are matched through
``jax.extend.core.primitives`` where it lists them, by name otherwise (``copy_p``, ``pjit``,
``checkpoint``, ``custom_vjp_call_jaxpr``: spellings of other releases). Supported JAX versions:
0.10 (tested on 0.10.2; ``pyproject.toml`` sets that floor); the primitive names and parameters
used by the walker are those of that release (``jit``, ``remat2``, ``scan(jaxpr=ClosedJaxpr)``,
``while(cond_jaxpr, body_jaxpr)``, ``cond(branches)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.extend as jex

__all__ = [
    "COND",
    "CONSUMERS",
    "CONV",
    "DOT",
    "DYNAMIC_SLICE",
    "GATHER",
    "INDEXING",
    "INLINED",
    "SCAN",
    "VIEW_PRIMITIVES",
    "WHILE",
    "bind",
    "bind_params",
    "has_subjaxpr",
    "inlined_jaxpr",
]

_P = jex.core.primitives

# Primitives whose single output is a view of their first operand.
VIEW_PRIMITIVES = {
    _P.transpose_p.name,
    _P.reshape_p.name,
    _P.broadcast_in_dim_p.name,
    _P.squeeze_p.name,
    _P.convert_element_type_p.name,
    _P.copy_p.name,
    _P.slice_p.name,
    _P.rev_p.name,
    _P.reduce_precision_p.name,
    _P.sharding_constraint_p.name,
    "copy_p",
}
DOT = _P.dot_general_p.name
CONV = _P.conv_general_dilated_p.name
GATHER = _P.gather_p.name
DYNAMIC_SLICE = _P.dynamic_slice_p.name
# Consumers: where a parameter view is read as a weight (products) or indexed (a table).
CONSUMERS = {DOT, CONV, GATHER, DYNAMIC_SLICE}
INDEXING = {GATHER, DYNAMIC_SLICE}

# Higher-order primitives whose sub-jaxpr is walked in place.
INLINED = {
    _P.jit_p.name,
    _P.closed_call_p.name,
    _P.call_p.name,
    _P.remat_p.name,
    _P.custom_jvp_call_p.name,
    _P.custom_vjp_call_p.name,
    "pjit",
    "checkpoint",
    "custom_vjp_call_jaxpr",
}
SCAN = _P.scan_p.name
COND = _P.cond_p.name
WHILE = _P.while_p.name


def bind_params(eqn: Any) -> tuple[list[Any], dict[str, Any]]:
    """``(subfuns, params)`` to bind ``eqn``'s primitive with (``subfuns`` empty on JAX 0.10)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        return list(subfuns), params
    return [], params


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Evaluate one equation on ``invals`` (a list of outputs, also for single results)."""
    subfuns, params = bind_params(eqn)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def has_subjaxpr(eqn: Any) -> bool:
    """Whether ``eqn`` is a higher-order primitive (its parameters hold a jaxpr)."""
    return any(True for _ in jex.core.jaxprs_in_params(eqn.params))


def inlined_jaxpr(eqn: Any) -> Any:
    """The sub-jaxpr of an :data:`INLINED` equation (its parameter name varies by primitive)."""
    p = eqn.params
    return p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
