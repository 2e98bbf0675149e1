"""``capture``: statistics of what flows into every matmul/conv that consumes a parameter."""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import math
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jcompress.runtime import _interpret as ip
from jcompress.runtime._roles import consumer_role
from jcompress.runtime._trace import signature
from jcompress.tree import Params, is_compressed, leaves_with_paths

__all__ = ["InputStats", "Moments", "capture", "collect_inputs", "consumer_inputs"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["absmax", "sumsq", "count", "gram"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class InputStats:
    """Per-input-channel statistics of a layer's input ``X (rows, channels)``.

    Channels are the consuming leaf's contracting axes, flattened in leaf order (Dense
    ``(in, out)``: ``in``; Conv ``(kh, kw, in, out)``: ``kh·kw·in`` patch entries; attention
    ``(heads, head_dim, features)``: ``heads·head_dim``). Stacked (scanned) layers carry a leading
    axis per layer on every field.

    Attributes:
      absmax: ``(..., channels)`` ``max |X|`` over rows (float32).
      sumsq: ``(..., channels)`` ``sum X²`` over rows (float32).
      count: ``(...)`` number of rows (int32).
      gram: ``(..., channels, channels)`` ``XᵀX`` (float32), or ``None``.
    """

    absmax: jax.Array
    sumsq: jax.Array
    count: jax.Array
    gram: jax.Array | None = None

    def merge(self, other: InputStats) -> InputStats:
        """Statistics of both batches together.

        >>> import jax.numpy as jnp
        >>> a = InputStats(jnp.ones(2), jnp.ones(2), jnp.array(1))
        >>> a.merge(a).count
        Array(2, dtype=int32, weak_type=True)
        """
        if (self.gram is None) != (other.gram is None):
            raise ValueError("InputStats.merge: one side has gram=None; capture both with gram=")
        return InputStats(
            absmax=jnp.maximum(self.absmax, other.absmax),
            sumsq=self.sumsq + other.sumsq,
            count=self.count + other.count,
            gram=None if self.gram is None else self.gram + other.gram,
        )

    @property
    def rms(self) -> jax.Array:
        """Root mean square per channel."""
        return jnp.sqrt(self.sumsq / jnp.maximum(self.count, 1)[..., None])


def _rows(x: jax.Array, keep_batch: list[int], channel_dims: list[int]) -> jax.Array:
    """``x`` as ``(batch..., rows, channels)`` with channels in the given order."""
    rest = [d for d in range(x.ndim) if d not in keep_batch and d not in channel_dims]
    x = jnp.transpose(x, [*keep_batch, *rest, *channel_dims])
    b = [x.shape[i] for i in range(len(keep_batch))]
    c = 1
    for d in channel_dims:
        c *= x.shape[len(keep_batch) + len(rest) + channel_dims.index(d)]
    return x.reshape(*b, -1, c)


def consumer_inputs(eqn: Any, invals: list[Any], facts: list[ip.View | None]):
    """``(path, X)`` of a consumer: the other operand as ``(stacked..., rows, channels)``.

    Channels follow the leaf's contracting axes in leaf order; ``None`` for gathers, uses that
    give the leaf no weight role, and grouped convolutions.
    """
    i, view, role = consumer_role(eqn, facts)
    if role is None or eqn.primitive.name in ip.INDEXING:
        return None
    name = eqn.primitive.name
    x = ip.Interpreter.materialize(invals[1 - i])
    if name == ip.DOT:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        wc, xc, xb = (rc, lc, lb) if i == 1 else (lc, rc, rb)
        order = sorted(range(len(wc)), key=lambda k: view.axes[wc[k]])
        return view.path, _rows(x, list(xb), [xc[k] for k in order])
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        raise ValueError(
            f"{view.path}: capture does not support grouped convolutions "
            f"(feature_group_count={p['feature_group_count']})"
        )
    dn = p["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    spatial = [rhs_shape[d] for d in dn.rhs_spec[2:]]
    n_sp = len(spatial)
    letters = "HWDXYZ"[:n_sp]
    patches = lax.conv_general_dilated_patches(
        jnp.transpose(x, dn.lhs_spec),  # (batch, features, *spatial)
        filter_shape=spatial,
        window_strides=p["window_strides"],
        padding=p["padding"],
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        dimension_numbers=("NC" + letters, "OI" + letters, "NC" + letters),
        precision=lax.Precision.HIGHEST,
    )
    # patch features are (in, *spatial) flattened, input channel slowest
    c_in = rhs_shape[dn.rhs_spec[1]]
    patches = jnp.moveaxis(patches, 1, -1)
    patches = patches.reshape(*patches.shape[:-1], c_in, *spatial)
    n_lead = patches.ndim - 1 - len(spatial)
    kernel_dims = [dn.rhs_spec[1], *dn.rhs_spec[2:]]  # operand dims of each patch axis
    order = sorted(range(len(kernel_dims)), key=lambda k: view.axes[kernel_dims[k]])
    patches = jnp.transpose(patches, [*range(n_lead), *[n_lead + k for k in order]])
    return view.path, patches.reshape(-1, c_in * math.prod(spatial))


@dataclasses.dataclass(frozen=True)
class Moments:
    """The :class:`InputStats` summary of a consumer's input ``X (stacked..., rows, channels)``.

    A summary (hashable: it keys the compiled-program cache) says which consumers it reads
    (``primitives``), how it summarizes one use (``of``), how it merges two uses of one leaf in
    a body (``merge``, e.g. a tied embedding's two logits products) and how it merges the
    iterations of a ``scan`` that reuses an unstacked leaf (``over_iterations``, leading axis).
    """

    gram: bool = False
    primitives: tuple[str, ...] = (ip.DOT, ip.CONV)

    def of(self, x: jax.Array) -> InputStats:
        x = x.astype(jnp.float32)
        return InputStats(
            absmax=jnp.max(jnp.abs(x), axis=-2),
            sumsq=jnp.sum(x * x, axis=-2),
            count=jnp.full(x.shape[:-2], x.shape[-2], jnp.int32),
            gram=(
                jnp.einsum("...rc,...rd->...cd", x, x, precision=lax.Precision.HIGHEST)
                if self.gram
                else None
            ),
        )

    def merge(self, a: InputStats, b: InputStats) -> InputStats:
        return a.merge(b)

    def over_iterations(self, value: InputStats) -> InputStats:
        return jax.tree.map(
            lambda f, v: f(v, axis=0),
            InputStats(jnp.max, jnp.sum, jnp.sum, None if value.gram is None else jnp.sum),
            value,
        )


class _Collect(ip.Interpreter):
    """Summaries of the inputs of the chosen leaves' consumers, repeated uses merged."""

    def __init__(self, summary: Any, paths: frozenset[str] | None):
        super().__init__()
        self.summary = summary
        self.paths = paths
        self.layouts: dict[str, tuple] = {}

    def consume(self, eqn, invals, facts):
        if eqn.primitive.name in self.summary.primitives:
            _, view, role = consumer_role(eqn, facts)
            if role is not None and (self.paths is None or view.path in self.paths):
                layout = (role.contracting, role.output, role.stacked)
                seen = self.layouts.setdefault(view.path, layout)
                if seen != layout:
                    raise ValueError(
                        f"{view.path}: consumed by several products with different layouts "
                        f"(contracting, output, stacked axes {seen} and {layout}); statistics "
                        "can only be merged over uses that contract the same axes: exclude "
                        "the leaf from paths="
                    )
                got = consumer_inputs(eqn, invals, facts)
                if got is not None:
                    self.emit(got[0], self.summary.of(got[1]))
        return super().consume(eqn, invals, facts)

    def emit(self, key, value):
        frame = self._frames[-1]
        frame[key] = self.summary.merge(frame[key], value) if key in frame else value

    def unstack(self, key, value, stacked):
        # a leaf reused by every iteration (not sliced by the scan): merge the iterations
        return value if stacked else self.summary.over_iterations(value)


_TRACES: collections.OrderedDict = collections.OrderedDict()
_MAX_TRACES = 32


def _trace_cached(fn: Callable[..., Any], params: Params, args: tuple) -> ip.Traced:
    """``trace_params`` once per ``fn``, tree structure, shapes and static values (what
    ``jax.jit`` keys its cache on), so calls on new batches reuse the compiled program."""
    tree = ((params, *args), {})
    key = (fn, *signature(tree))
    try:
        hit = _TRACES.get(key)
    except TypeError:  # an unhashable static value: trace every time
        return ip.trace_params(fn, params, args)
    if hit is None:
        hit = ip.trace_params(fn, params, args)
        _TRACES[key] = hit
        if len(_TRACES) > _MAX_TRACES:
            _TRACES.popitem(last=False)
    else:
        _TRACES.move_to_end(key)
    flat = jax.tree.leaves(tree, is_leaf=is_compressed)
    leaves = tuple(x for x in flat if ip.is_array_like(x))
    return dataclasses.replace(hit, leaves=leaves)


def collect_inputs(
    fn: Callable[..., Any],
    params: Params,
    args: tuple,
    summary: Any,
    paths: Collection[str] | None = None,
) -> dict[str, Any]:
    """``{path: summary.of(X)}`` for every consumer of a leaf (``paths``: only those leaves).

    The engine of :func:`capture` for any hashable ``summary`` (see :class:`Moments`); one
    compiled program per traced function, summary and set of paths.
    """
    traced = _trace_cached(fn, params, args)
    if paths is not None:
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise TypeError(
                f"paths= must be a collection of path strings (e.g. ['Dense_0/kernel']), got "
                f"{paths!r}"
            )
        names = [p for p, _ in leaves_with_paths(params)]
        unknown = [p for p in paths if p not in set(names)]
        if unknown:
            near = difflib.get_close_matches(unknown[0], names, n=3, cutoff=0.5)
            raise ValueError(
                f"paths= names {unknown[:3]}, not leaves of params"
                + (f" (nearest: {near})" if near else "")
                + "; paths are '/'-joined key paths as jc.tree.leaves_with_paths names them"
            )
        paths = frozenset(paths)
    run = _collect_jit(traced.jaxpr, tuple(traced.facts()), summary, paths)
    return run(list(traced.leaves))


def capture(
    fn: Callable[..., Any],
    params: Params,
    *args: Any,
    gram: bool = False,
    paths: Collection[str] | None = None,
) -> dict[str, InputStats]:
    """Statistics of the input of every matmul/conv that consumes a parameter leaf.

    For each leaf consumed by ``dot_general`` or ``conv_general_dilated``, the other operand
    ``X`` is laid out as ``(rows, channels)`` over the leaf's contracting axes (conv: the
    ``kh·kw·in`` patches of ``lax.conv_general_dilated_patches``) and summarized per channel.
    Leaves sliced by ``scan`` (``nn.scan`` stacks) get one slice of statistics per layer (a
    leading stacked axis). A leaf consumed by several products with the same contracting
    layout (a tied embedding: the gather of ``nn.Embed`` is no product, ``Embed.attend``'s
    ``x @ E.T`` is) gets the statistics of all its inputs together (as :meth:`InputStats.merge`
    of each use); different layouts are an error. Accumulate batches with
    :meth:`InputStats.merge`. ``fn`` is called as ``fn(params, *args)`` (linen:
    ``lambda p, x: model.apply({"params": p}, x)``).

    As ``jax.jit`` does, ``fn`` is traced once per function object, tree structure, shapes,
    dtypes and static (non-array) arguments, and the compiled program is reused for new
    batches: a ``fn`` that changes behaviour through closed-over Python state is not re-traced.

    Args:
      fn: ``fn(params, *args)``.
      params: the parameter tree.
      *args: one batch of inputs.
      gram: also accumulate ``XᵀX`` (for GPTQ / SparseGPT).
      paths: only these leaves (exact paths; default: every leaf). A Gram matrix is ``C²``
        floats per leaf: calibrating layer by layer with ``paths=[path]`` keeps one alive at a
        time, at the price of one forward pass per layer.

    Returns:
      ``{path: InputStats}`` for every consumed (chosen) leaf, in the order ``fn`` consumes
      them.

    Raises:
      ValueError: a leaf consumed with different contracting layouts, ``paths`` naming no leaf
        of ``params`` (with the nearest names), grouped convolutions.
      TypeError: ``paths`` not a collection of strings.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((2, 3))}
    >>> stats = capture(lambda p, x: x @ p["w"], params, jnp.array([[1.0, -4.0], [2.0, 0.0]]))
    >>> stats["w"].absmax, stats["w"].sumsq, stats["w"].count
    (Array([2., 4.], dtype=float32), Array([ 5., 16.], dtype=float32), Array(2, dtype=int32))
    """
    return collect_inputs(fn, params, args, Moments(gram=bool(gram)), paths)


@functools.lru_cache(maxsize=64)
def _collect_jit(jaxpr, facts, summary, paths):
    @jax.jit
    def run(leaves):
        interp = _Collect(summary, paths)
        values = [ip.Deferred(x) if is_compressed(x) else x for x in leaves]
        interp.run(jaxpr, values, list(facts))
        return interp.records

    return run
