"""``dependencies``: which parameter axes must lose the same channels together.

The analysis runs the function's jaxpr forward on the runtime's jaxpr walker
(:class:`jcompress.runtime._interpret.Interpreter`) with a channel fact per variable axis
(:mod:`jcompress.structure._facts`: a layout of channel spaces, a claim of parameter axes, or
nothing). Each primitive's rule (:mod:`jcompress.structure._rules`) ties facts together or blocks
them; tied spaces form the groups (:mod:`jcompress.structure._spaces`). This module is the walk
itself: which equations reach the rules, how a ``scan`` body is analysed once, and the model's
inputs and outputs.

A space is born where a parameter axis becomes an activation axis (a Dense/Conv kernel's output
axis). Every space that reaches something whose result depends on the width (a reduction over
channels as in LayerNorm, RMSNorm or softmax, the model output, a slice, a reshape that splits
channels unevenly, an unknown primitive) is *blocked* with the reason. A parameter axis that must
keep its size for another reason (contracted against the model input, indexed by a gather)
blocks every group it is in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jcompress.runtime import _interpret as ip
from jcompress.structure._facts import Algebra, Fact, is_claim
from jcompress.structure._rules import at, free_broadcast, rule
from jcompress.tree import Group, Params, leaves_with_paths

__all__ = ["Dependencies", "Fact", "analyze", "dependencies"]


class Dependencies(ip.Interpreter):
    """The channel-dependency analysis on the jaxpr walker.

    Equations that some channel fact reaches go through :func:`~jcompress.structure._rules.rule`;
    :meth:`bind` evaluates them (``shrink`` overrides it to re-emit each equation at the smaller
    shapes). The groups are in :attr:`spaces` once :meth:`run` and :meth:`finish` are done.
    """

    def __init__(self) -> None:
        super().__init__()
        self.algebra = Algebra()
        self.spaces = self.algebra.spaces

    # -- the walker hook ------------------------------------------------------------------------

    def step(self, eqn, invals, infacts):
        if all(f is None for f in infacts):
            vals = [self.materialize(v) for v in invals]
            free = (
                free_broadcast(self.algebra, eqn)
                if eqn.primitive.name == "broadcast_in_dim"
                else None
            )
            if free is not None:
                return self.bind(eqn, vals, [free]), [free]
            return ip.bind(eqn, vals), [None] * len(eqn.outvars)
        if eqn.primitive.name in ip.INLINED:
            return ip.inline(self, eqn, invals, infacts)
        if eqn.primitive.name == ip.SCAN:
            return self._scan_body(eqn, invals, infacts)
        outfacts = rule(self.algebra, eqn, infacts)
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
        alg = self.algebra
        consts, carry, xs = ip.split_scan(eqn, [self.materialize(v) for v in invals])
        const_facts, carry_facts, xs_facts = ip.split_scan(eqn, infacts)
        nk = len(carry)
        why = at(eqn)
        body_xs_facts: list[Fact | None] = []
        for f in xs_facts:
            if f is not None:
                if is_claim(f.axes[0]) and len(f.axes[0]) == 1:
                    [(path, axis)] = f.axes[0]
                    self.spaces.stacked.setdefault(path, (axis, eqn.params["length"]))
                alg.drop(f.axes[0], f"is the axis {why} slices")
                f = Fact(f.axes[1:], f.param)
            body_xs_facts.append(f)
        facts_in = [*const_facts, *carry_facts, *body_xs_facts]
        seen: list[list[Fact | None]] = []
        sliced = {
            path for f in xs_facts if f is not None and is_claim(f.axes[0]) for path, _ in f.axes[0]
        }

        def fn(c, x):
            self.spaces.scan.append(sliced)
            try:
                outs, facts = self.run(eqn.params["jaxpr"], [*consts, *c, *x], facts_in)
            finally:
                self.spaces.scan.pop()
            seen.append(facts)
            return outs[:nk], outs[nk:]

        c_out, ys = ip.rescan(eqn, fn, carry, xs)
        if len(seen) != 1:
            raise RuntimeError(f"dependencies: the body of {why} was traced {len(seen)} times")
        [body_out] = seen
        outfacts: list[Fact | None] = []
        for k, (f_in, f_out, v) in enumerate(zip(carry_facts, body_out, carry)):
            shape = np.shape(v)
            a = f_in.axes if f_in is not None else (None,) * len(shape)
            b = f_out.axes if f_out is not None else (None,) * len(shape)
            tied = tuple(alg.meet(x, y, n, n, f"(carry {k}) {why}") for x, y, n in zip(a, b, shape))
            outfacts.append(Fact(tied, False))
        for f in body_out[nk:]:
            if f is not None:
                for a in f.axes:
                    alg.drop(a, f"is stacked into the outputs of {why}")
            outfacts.append(None)
        return [*c_out, *ys], outfacts

    def bind(self, eqn: Any, invals: list[Any], outfacts: list[Fact | None]) -> list[Any]:
        """Evaluate the equation (the shrinking pass re-emits it with new shapes)."""
        del outfacts
        return ip.bind(eqn, invals)

    # -- driving --------------------------------------------------------------------------------

    def initial(self, traced: ip.Traced) -> list[Fact]:
        """Facts of the flat inputs: parameters claim their axes, other inputs are activations."""
        out = []
        for path, leaf in zip(traced.paths, traced.leaves):
            ndim = len(leaf.shape)
            if path is None:
                out.append(Fact((None,) * ndim, False))
            else:
                self.spaces.shapes[path] = tuple(leaf.shape)
                out.append(Fact(tuple(frozenset({(path, d)}) for d in range(ndim)), True))
        return out

    def finish(self, outfacts: list[Fact | None]) -> None:
        """Outputs keep their width: block their spaces."""
        for k, f in enumerate(outfacts):
            if f is None:
                continue
            for d, a in enumerate(f.axes):
                self.algebra.drop(a, f"reaches the model output (output {k}, axis {d})")


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
