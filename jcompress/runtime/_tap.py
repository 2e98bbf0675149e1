"""``tap``: the input and output activations of chosen layers, differentiably."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from jcompress.runtime import _interpret as ip
from jcompress.runtime._roles import consumer_role

__all__ = ["tap"]


class _Tap(ip.Interpreter):
    def __init__(self, inputs_of: set[str], outputs_of: set[str]):
        super().__init__()
        self.inputs_of, self.outputs_of = inputs_of, outputs_of
        self.consumed: set[str] = set()

    def consume(self, eqn, invals, facts):
        outs = super().consume(eqn, invals, facts)
        i, view, role = consumer_role(eqn, facts)
        if view is None or role is None or eqn.primitive.name in ip.INDEXING:
            return outs
        self.consumed.add(view.path)
        if view.path in self.inputs_of:
            self.emit(view.path, self.materialize(invals[1 - i]))
        if view.path in self.outputs_of:
            self.emit(view.path, outs[0])
        return outs


def tap(
    fn: Callable[..., Any],
    *,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """``fn`` also returning the input or output activations of the layers named by path.

    ``fn'(params, *args) -> (out, {path: activation})``: for each path in ``inputs_of``, the
    other operand of the matmul/conv consuming that leaf (its input, as the primitive sees it:
    ``(batch..., in)`` for Dense); for each path in ``outputs_of``, that matmul/conv's result
    (before bias and activation). Leaves sliced by ``scan`` give one activation per layer
    (leading stacked axis). Differentiable: ``jax.grad`` through ``fn'`` works, so feature
    distillation losses can use it.

    Args:
      fn: ``fn(params, *args)`` (linen: ``lambda p, x: model.apply({"params": p}, x)``).
      inputs_of: paths whose layer input to return.
      outputs_of: paths whose layer output to return (disjoint from ``inputs_of``).

    Returns:
      ``fn'(params, *args) -> (out, {path: activation})``.

    Raises:
      ValueError: a path no matmul/conv consumes (listing the available ones); a path in both
        ``inputs_of`` and ``outputs_of``.

    >>> import jax.numpy as jnp
    >>> f = tap(lambda p, x: (x @ p["w"]).sum(), outputs_of=["w"])
    >>> out, acts = f({"w": jnp.ones((2, 3))}, jnp.ones((1, 2)))
    >>> out, acts["w"]
    (Array(6., dtype=float32), Array([[2., 2., 2.]], dtype=float32))
    """
    inputs_of, outputs_of = set(inputs_of), set(outputs_of)
    both = inputs_of & outputs_of
    if both:
        raise ValueError(
            f"tap: {sorted(both)} named in both inputs_of and outputs_of; the result maps one "
            "activation per path, so use two taps"
        )

    def tapped(params, *args):
        traced = ip.trace_params(fn, params, args)
        interp = _Tap(inputs_of, outputs_of)
        outs, _ = interp.run(traced.jaxpr, list(traced.leaves), traced.facts())
        missing = sorted((inputs_of | outputs_of) - interp.consumed)
        if missing:
            raise ValueError(
                f"tap: {missing} are not consumed by any matmul/conv of fn; available paths: "
                f"{sorted(interp.consumed)}"
            )
        out = jax.tree_util.tree_unflatten(
            traced.out_tree, [ip.Interpreter.materialize(o) for o in outs]
        )
        return out, dict(interp.records)

    return tapped
