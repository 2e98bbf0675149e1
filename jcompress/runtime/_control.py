"""Higher-order primitives in the jaxpr walker: calls inlined, loops and branches re-emitted.

``jit`` (``pjit``), ``closed_call``, ``remat`` (``checkpoint``), ``custom_jvp_call`` and
``custom_vjp_call`` are inlined: their sub-jaxpr is walked in place. ``scan``, ``cond`` and
``while`` are re-emitted (``lax.scan`` / ``lax.switch`` / ``lax.while_loop``) with interpreted
bodies; a parameter sliced by ``scan``'s ``xs`` enters the body with the sliced axis as a
*stacked* axis (:meth:`~jcompress.runtime._views.View.sliced`), a compressed leaf sliced whole
stays deferred. Records a body emits (calibration statistics, activations) are threaded out of
a ``scan`` as extra stacked outputs (leading axis: the iteration) and handed to the
interpreter's ``unstack``; ``cond`` and ``while`` cannot return them (an error). A parameter
view reaching any other higher-order primitive (``shard_map``, ``pallas_call``, ...) is a
``ValueError`` naming it (:func:`unsupported`).

Every function here takes the interpreter as its first argument and uses only its public
methods (``run``, ``run_body``, ``materialize``, ``emit``, ``unstack``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jax import lax

from jcompress.runtime._primitives import COND, INLINED, SCAN, WHILE, inlined_jaxpr
from jcompress.runtime._views import Deferred

__all__ = ["HIGHER_ORDER", "inline", "rescan", "split_scan", "unsupported"]

Step = tuple[list[Any], list[Any]]


def inline(interp: Any, eqn: Any, invals: list[Any], infacts: list[Any]) -> Step:
    """A call primitive: walk its sub-jaxpr in place (facts flow in and out)."""
    return interp.run(inlined_jaxpr(eqn), invals, infacts)


def split_scan(eqn: Any, seq: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """A ``scan`` equation's operands (or their facts) as ``(consts, carry, xs)``."""
    nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
    return list(seq[:nc]), list(seq[nc : nc + nk]), list(seq[nc + nk :])


def rescan(eqn: Any, body: Callable[..., Any], carry: list[Any], xs: list[Any]) -> Any:
    """``lax.scan(body, carry, xs)`` with the equation's length, direction and unrolling."""
    p = eqn.params
    return lax.scan(body, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])


def scan(interp: Any, eqn: Any, invals: list[Any], infacts: list[Any]) -> Step:
    """A ``scan``: re-emitted with the interpreted body; body records stacked per iteration."""
    consts, carry, xs = split_scan(eqn, invals)
    cf, _, xf = split_scan(eqn, infacts)
    nk = len(carry)
    carry = [interp.materialize(c) for c in carry]  # a parameter in the carry is a value
    x_facts = [None if f is None else f.sliced() for f in xf]
    # a compressed leaf sliced whole stays deferred: scan slices its array children along axis 0
    whole = [isinstance(v, Deferred) and not v.ops for v in xs]
    x_vals = [v.base if w else interp.materialize(v) for v, w in zip(xs, whole)]
    keys_box: list[list[Any]] = []

    def fn(c, x):
        x = [Deferred(xv) if w else xv for xv, w in zip(x, whole)]
        outs, records = interp.run_body(
            eqn.params["jaxpr"], [*consts, *c, *x], [*cf, *([None] * nk), *x_facts]
        )
        keys_box.append(list(records))
        return outs[:nk], (outs[nk:], [records[k] for k in records])

    c_out, (ys, recs) = rescan(eqn, fn, carry, x_vals)
    stacked_keys = {f.path for f in x_facts if f is not None and f.stacked}
    for k, r in zip(keys_box[-1], recs):
        interp.emit(k, interp.unstack(k, r, _key_path(k) in stacked_keys))
    return [*c_out, *ys], [None] * len(eqn.outvars)


def cond(interp: Any, eqn: Any, invals: list[Any], infacts: list[Any]) -> Step:
    """A ``cond``: ``lax.switch`` over the interpreted branches (compressed operands deferred)."""
    index, ops, facts = interp.materialize(invals[0]), invals[1:], infacts[1:]
    bases = [v.base if isinstance(v, Deferred) else v for v in ops]
    opss = [v.ops if isinstance(v, Deferred) else None for v in ops]

    def make(br):
        def f(*bs):
            vals = [b if o is None else Deferred(b, o) for b, o in zip(bs, opss)]
            outs, records = interp.run_body(br, vals, facts)
            _no_records("cond", records)
            return outs

        return f

    outs = lax.switch(index, [make(b) for b in eqn.params["branches"]], *bases)
    return list(outs), [None] * len(eqn.outvars)


def while_loop(interp: Any, eqn: Any, invals: list[Any], infacts: list[Any]) -> Step:
    """A ``while``: ``lax.while_loop`` over the interpreted condition and body."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cc, bc, carry = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    ccf, bcf = infacts[:cn], infacts[cn : cn + bn]
    carry = [interp.materialize(c) for c in carry]
    none = [None] * len(carry)

    def cond_fn(c):
        (out,), records = interp.run_body(p["cond_jaxpr"], [*cc, *c], [*ccf, *none])
        _no_records("while", records)
        return out

    def body_fn(c):
        outs, records = interp.run_body(p["body_jaxpr"], [*bc, *c], [*bcf, *none])
        _no_records("while", records)
        return outs

    return list(lax.while_loop(cond_fn, body_fn, carry)), [None] * len(eqn.outvars)


HIGHER_ORDER: dict[str, Callable[..., Step]] = {
    **dict.fromkeys(INLINED, inline),
    SCAN: scan,
    COND: cond,
    WHILE: while_loop,
}


def unsupported(eqn: Any, infacts: list[Any]) -> ValueError:
    """The error for a parameter view reaching a higher-order primitive the walker cannot enter."""
    paths = sorted({f.path for f in infacts if f is not None})
    return ValueError(
        f"the jcompress runtime cannot look inside the higher-order primitive "
        f"{eqn.primitive.name!r}, which receives the parameter(s) {paths}; supported: jit, "
        "closed_call, remat/checkpoint, custom_jvp_call, custom_vjp_call, scan, cond, "
        "while. Apply the transform inside it (e.g. inside the shard_map body) or keep "
        "those parameters uncompressed"
    )


def _no_records(name: str, records: dict) -> None:
    if records:
        raise ValueError(
            f"{sorted(map(str, records))[:3]}: this transform records values inside "
            f"{name!r}, which cannot return them; only scan bodies are supported"
        )


def _key_path(key: Any) -> Any:
    return key[0] if isinstance(key, tuple) else key
