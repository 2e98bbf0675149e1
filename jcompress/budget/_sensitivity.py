"""Per-layer sensitivity: how much a model's outputs change when one leaf alone is compressed.

:func:`sensitivity` measures, for every selected leaf and every option, the increase of a metric
(default: KL divergence of the softmax outputs, or mean squared error) between the model with
only that leaf compressed and the float model, and the option's cost (packed bytes for
quantization options, pruned weights for sparsity options). :func:`jcompress.budget.allocate`
turns the result into per-leaf rules that meet a budget.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress._fs import resolve
from jcompress.pruning import NM, magnitude_masks
from jcompress.pruning._plan import check_fraction
from jcompress.quantization import QuantSpec, dequantize, quantize

__all__ = ["Sensitivity", "default_metric", "sensitivity"]

KINDS = ("quantization", "sparsity")


def default_metric(outputs: Any, reference: Any) -> jax.Array:
    """Mean KL divergence ``KL(softmax(reference) || softmax(outputs))`` over the last axis when
    the outputs look like logits (float arrays whose last axis has more than one entry), else
    the mean squared error; summed over the leaves of a tuple/dict of outputs.

    >>> import jax.numpy as jnp
    >>> float(default_metric(jnp.zeros((2, 3)), jnp.zeros((2, 3))))
    0.0
    """
    total = jnp.zeros((), jnp.float32)
    for out, ref in zip(jax.tree.leaves(outputs), jax.tree.leaves(reference)):
        out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
        if _logits(out):
            log_p = jax.nn.log_softmax(ref, axis=-1)
            log_q = jax.nn.log_softmax(out, axis=-1)
            total = total + jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))
        else:
            total = total + jnp.mean((out - ref) ** 2)
    return total


def _logits(out: jax.Array) -> bool:
    """Whether :func:`default_metric` treats an output as logits (KL) or values (MSE)."""
    return out.ndim >= 1 and out.shape[-1] > 1


def _fisher_loss(outputs: Any, key: jax.Array) -> jax.Array:
    """A loss whose squared gradient at the float model estimates, in expectation, the diagonal
    of the Hessian (Gauss-Newton = Fisher) of :func:`default_metric` at ``reference = outputs``.

    Per output: logits of ``n`` distributions get ``sqrt(n) * mean cross-entropy`` of labels
    sampled from their own softmax (the score of each distribution has zero mean and covariance
    its Fisher, so the squared gradient's mean is ``(1 / n) * sum_i J_i^T F_i J_i``, the KL
    term's Hessian); values with ``N`` entries get ``sqrt(2 N) * mean(eps * out)`` with ``eps``
    standard normal (the Hessian of ``mean((out - ref)^2)`` is ``(2 / N) J^T J``). Independent
    noise per output keeps the sum's cross terms at zero mean.
    """
    total = jnp.zeros((), jnp.float32)
    for i, out in enumerate(jax.tree.leaves(outputs)):
        out = jnp.asarray(out, jnp.float32)
        sample = jax.random.fold_in(key, i)
        ref = jax.lax.stop_gradient(out)
        if _logits(out):
            n = out.size // out.shape[-1]
            labels = jax.random.categorical(sample, ref, axis=-1)
            log_q = jax.nn.log_softmax(out, axis=-1)
            nll = -jnp.take_along_axis(log_q, labels[..., None], axis=-1)
            total = total + jnp.sqrt(float(n)) * jnp.mean(nll)
        else:
            noise = jax.random.normal(sample, out.shape, jnp.float32)
            total = total + jnp.sqrt(2.0 * out.size) * jnp.mean(noise * out)
    return total


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """What :func:`sensitivity` measured.

    Attributes:
      kind: ``"quantization"`` or ``"sparsity"``.
      options: ``{name: option}`` as given (ordered).
      paths: the selected leaves, in tree order.
      increase: ``{path: {name: metric increase}}`` (``0.0`` exactly where the compressed leaf
        equals the float one).
      cost: ``{path: {name: cost}}``: stored bytes (true packed size) for quantization options,
        pruned weights for sparsity options.
      float_bytes: ``{path: bytes of the float leaf}``.
      sizes: ``{path: number of weights}``.
      skipped: ``{path: {name: reason}}`` for the options that do not fit a leaf (a group size
        or ``NM`` block that does not divide it): their increase is ``inf`` and their cost
        ``None``, and :func:`jcompress.budget.allocate` never picks them.
    """

    kind: str
    options: Mapping[str, Any]
    paths: tuple[str, ...]
    increase: Mapping[str, Mapping[str, float]]
    cost: Mapping[str, Mapping[str, int]]
    float_bytes: Mapping[str, int]
    sizes: Mapping[str, int]
    skipped: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    def table(self) -> Any:
        """A ``rich`` table: one row per leaf, ``increase (cost)`` per option."""
        from rich.table import Table

        unit = "bytes" if self.kind == "quantization" else "pruned"
        table = Table(title=f"sensitivity ({self.kind}): metric increase ({unit})")
        table.add_column("leaf")
        for name in self.options:
            table.add_column(name, justify="right")
        for path in self.paths:
            row = [
                "n/a"
                if self.cost[path][n] is None
                else f"{self.increase[path][n]:.3g} ({self.cost[path][n]})"
                for n in self.options
            ]
            table.add_row(path, *row)
        return table

    def plot(self, path: str | Path) -> Path:
        """Per-leaf curves of metric increase against cost, saved to ``path`` (needs
        matplotlib: ``pip install "jcompress[demo]"``); returns the resolved path."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(
                'Sensitivity.plot needs matplotlib: pip install "jcompress[demo]"'
            ) from e
        out = resolve(path)
        fig, ax = plt.subplots(figsize=(6, 4))
        for leaf in self.paths:
            points = sorted(
                (self.cost[leaf][n], self.increase[leaf][n])
                for n in self.options
                if self.cost[leaf][n] is not None
            )
            ax.plot(*zip(*points), marker="o", label=leaf)
        ax.set_xlabel("bytes" if self.kind == "quantization" else "pruned weights")
        ax.set_ylabel("metric increase")
        ax.legend(fontsize="small")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, bbox_inches="tight")
        plt.close(fig)
        return out


def options_kind(options: Mapping[str, Any]) -> str:
    """``"quantization"`` or ``"sparsity"``; a ``ValueError`` for an empty or mixed dict."""
    if not isinstance(options, Mapping) or not options:
        raise ValueError(
            "options must be a non-empty dict {name: option}, e.g. {'int8': QuantSpec(bits=8), "
            "'int4': QuantSpec(bits=4), 'float': None}"
        )
    kinds = set()
    for name, option in options.items():
        if option is None:
            continue
        if isinstance(option, QuantSpec):
            kinds.add("quantization")
        elif isinstance(option, NM) or (
            isinstance(option, int | float | np.floating) and not isinstance(option, bool)
        ):
            if not isinstance(option, NM):
                check_fraction(option, f"option {name!r}: a sparsity")
            kinds.add("sparsity")
        else:
            raise TypeError(
                f"option {name!r} must be a QuantSpec, a sparsity in [0, 1), NM(n, m) or None, "
                f"got {option!r}"
            )
    if len(kinds) != 1:
        raise ValueError(
            "options must all be quantization options (QuantSpec or None) or all sparsity "
            f"options (float, NM or None), got {dict(options)!r}"
            + (" (only None: nothing to compare)" if not kinds else "")
        )
    return kinds.pop()


def _batches(batches: Iterable[Any]) -> list[tuple[Any, ...]]:
    out = [b if isinstance(b, tuple) else (b,) for b in batches]
    if not out:
        raise ValueError("batches is empty; pass a list of argument tuples for fn")
    return out


def _compressed_leaves(
    params, paths, originals, option, kind, roles
) -> dict[str, tuple[jax.Array, int] | ValueError]:
    """``{path: (float value of the leaf compressed with option, cost)}`` for every selected
    leaf, or the ``ValueError`` that says why the option does not fit that leaf (a group size
    that does not divide it, ...). One call over the selection, then leaf by leaf if it fails
    (each leaf is compressed on its own, exactly as if it were selected alone)."""
    try:
        return _compress_all(params, paths, originals, option, kind, roles)
    except ValueError as error:
        if len(paths) == 1:
            return {paths[0]: error}
    out: dict[str, Any] = {}
    for p in paths:
        try:
            out.update(_compress_all(params, (p,), originals, option, kind, roles))
        except ValueError as error:
            out[p] = error
    if all(isinstance(v, ValueError) for v in out.values()):
        raise out[paths[0]]  # the option fits no leaf: a mistake, not a per-leaf limit
    return out


def _compress_all(params, paths, originals, option, kind, roles):
    if option is None:
        none_cost = {p: originals[p].nbytes if kind == "quantization" else 0 for p in paths}
        return {p: (originals[p], none_cost[p]) for p in paths}
    chosen = set(paths)

    def where(path: str, _leaf: Any) -> bool:
        return path in chosen

    if kind == "quantization":
        q = dict(jtree.leaves_with_paths(quantize(params, option, where=where, roles=roles)))
        return {p: (jnp.asarray(dequantize(q[p])), int(q[p].nbytes)) for p in paths}
    structure = option if isinstance(option, NM) else None
    sparsity = None if isinstance(option, NM) else option
    masks = dict(
        jtree.leaves_with_paths(
            magnitude_masks(params, sparsity, structure=structure, where=where, roles=roles)
        )
    )
    out = {}
    for p in paths:
        value = originals[p]
        keep = jnp.broadcast_to(masks[p], value.shape)
        pruned = jnp.where(keep, value, jnp.zeros((), value.dtype))  # what apply_masks does
        out[p] = (pruned, int(value.size) - int(jnp.sum(keep)))
    return out


def _check_scalar(value: jax.Array, what: str) -> None:
    if value.shape != () or not bool(jnp.isfinite(value)):
        raise ValueError(
            f"{what} must be a finite scalar, got {value!r} on the float model; pass a metric "
            "returning one number"
        )


class _Static:
    """A callable as a static ``jit`` argument, compared by identity (as ``jax.jit`` keys its
    own cache): works for unhashable callables (an Equinox module, a dataclass instance)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Static) and other.fn is self.fn


def _objective(fn, metric, values, tree, key, *args):
    """The loss whose squared gradient :func:`_fisher` accumulates (the tree is an argument:
    no constants in the compiled program)."""
    outputs = fn.fn(jtree.map_with_paths(lambda p, x: values.get(p, x), tree), *args)
    if metric.fn is None:
        return _fisher_loss(outputs, key)
    return jnp.asarray(metric.fn(outputs, jax.lax.stop_gradient(outputs)), jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fisher_step(fn, metric, squares, values, tree, key, *args):
    """One backward pass: ``(loss, squares + g**2)``; compiled once per ``fn`` and shapes."""
    value, g = jax.value_and_grad(_objective, argnums=2)(fn, metric, values, tree, key, *args)
    return value, {p: s + jnp.square(g[p].astype(jnp.float32)) for p, s in squares.items()}


@jax.jit
def _half_weighted(fisher: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``1/2 * sum(F * (new - old)**2)`` in float32: exactly 0 where ``new == old``."""
    delta = new.astype(jnp.float32) - old.astype(jnp.float32)
    return 0.5 * jnp.sum(fisher * jnp.square(delta))


@functools.partial(jax.jit, static_argnums=0)
def _forward(fn, params, *args):
    return fn.fn(params, *args)


@functools.partial(jax.jit, static_argnums=0)
def _score(metric, outputs, reference) -> jax.Array:
    return jnp.asarray(metric.fn(outputs, reference), jnp.float32)


def _fisher(fn, params, batches, metric, paths, originals, key) -> dict[str, jax.Array]:
    """``{path: mean over batches of g**2}`` (float32): one backward pass per batch."""
    squares = {p: jnp.zeros(originals[p].shape, jnp.float32) for p in paths}
    for b, args in enumerate(batches):
        step_key = jax.random.fold_in(key, b)
        value, squares = _fisher_step(
            _Static(fn), _Static(metric), squares, originals, params, step_key, *args
        )
        _check_scalar(value, "metric(outputs, reference)")
    fisher = {p: squares[p] / len(batches) for p in paths}
    for p in paths:
        if not bool(jnp.all(jnp.isfinite(fisher[p]))):
            raise ValueError(
                f"{p}: its squared gradients are not finite; check the model and batches, or "
                "use method='measure'"
            )
    if metric is not None and not any(bool(jnp.any(fisher[p] > 0)) for p in paths):
        raise ValueError(
            "method='fisher' with a custom metric uses the gradient of metric(outputs, outputs) "
            "at the float model, which is zero here (a divergence at its minimum carries no "
            "gradient); use metric=None (the default KL/MSE, estimated from sampled labels), a "
            "task loss, or method='measure'"
        )
    return fisher


def sensitivity(
    fn: Callable[..., Any],
    params: jtree.Params,
    batches: Iterable[Any],
    options: Mapping[str, Any],
    *,
    metric: Callable[[Any, Any], Any] | None = None,
    method: str = "measure",
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
    quiet: bool = False,
    key: jax.Array | None = None,
) -> Sensitivity:
    """For every selected leaf and option, the increase of ``metric`` when only that leaf is
    compressed with that option, everything else float.

    Args:
      fn: ``fn(params, *args)``, the model.
      params: the float parameter tree (any form jcompress takes).
      batches: a re-iterable of argument tuples (a bare array is one argument).
      options: ``{name: option}``: all quantization options (``QuantSpec``; ``None`` keeps
        float) or all sparsity options (a fraction in ``[0, 1)`` or ``NM(n, m)``, magnitude
        pruning of that leaf alone; ``None`` keeps it dense).
      metric: ``metric(outputs, reference_outputs) -> scalar`` (any task loss); default
        :func:`default_metric`. The increase is ``mean over batches of metric(compressed,
        reference) - metric(reference, reference)``.
      method: ``"measure"``: evaluates every pair, about ``leaves * options`` forward passes per
        batch; ``fn`` is compiled once (every compressed leaf is evaluated in its float form,
        same shape and dtype). ``"fisher"``: the second-order estimate
        ``1/2 * sum(F * (w_compressed - w)**2)`` with ``F`` the mean over batches of squared
        gradients, one backward pass per batch. With the default metric the gradients are
        those of a loss on labels (logits) or Gaussian noise (values) sampled from the float
        model's own outputs (seeded by ``key``), so ``F`` is an unbiased estimate of the
        diagonal of the metric's Hessian (the Fisher information) and the estimate is on the
        metric's scale (a Monte Carlo estimate: more batches, less noise); with a custom
        metric ``F`` is the squared gradient of ``metric(outputs, outputs)`` itself (an
        empirical Fisher: fit for a task loss, whose gradient is not zero; it ranks leaves,
        its scale is not the metric's). Cheaper than
        ``"measure"`` by about ``leaves * options / 3`` forward passes; less exact where
        compression is coarse (it is a local, diagonal estimate).
      where: selection (default: matmul/conv/gather kernels, as ``quantize``).
      roles: ``{path: Role}`` (``jc.roles(fn, params, *args)``) for non-Flax layouts.
      quiet: no ``rich`` progress bar.
      key: the PRNG key of ``method="fisher"``'s sampled labels (default ``jax.random.key(0)``:
        deterministic); unused by ``"measure"``.

    Returns:
      A :class:`Sensitivity` (exactly ``0.0`` for every option that leaves a leaf unchanged).

    Raises:
      ValueError / TypeError: bad options (empty, mixed kinds, out of range), an unknown method,
        empty batches, a selection error (naming the fix), NaN/Inf in a selected leaf or its
        squared gradients, a metric that is not a finite scalar, or ``"fisher"`` with a custom
        metric whose gradient is zero.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -0.3], [0.2, 0.9]])}}
    >>> fn = lambda p, x: x @ p["Dense_0"]["kernel"]
    >>> s = sensitivity(fn, params, [jnp.eye(2)], {"int8": QuantSpec(bits=8), "float": None},
    ...                 quiet=True)
    >>> s.increase["Dense_0/kernel"]["float"], s.cost["Dense_0/kernel"]["float"]
    (0.0, 16)
    >>> f = sensitivity(fn, params, [jnp.eye(2)], {"int8": QuantSpec(bits=8), "float": None},
    ...                 method="fisher", quiet=True)
    >>> f.increase["Dense_0/kernel"]["float"], f.increase["Dense_0/kernel"]["int8"] > 0
    (0.0, True)
    """
    if method not in ("measure", "fisher"):
        raise ValueError(f"method must be 'measure' or 'fisher', got {method!r}")
    kind = options_kind(options)
    batches = _batches(batches)
    chosen = jtree.selection(params, where, roles=roles, what="sensitivity").check_finite()
    paths, resolved = tuple(chosen.paths), chosen.roles
    originals = {p: jnp.asarray(jtree.unwrap(chosen.leaves[p])) for p in paths}
    if method == "fisher":
        key = jax.random.key(0) if key is None else key
        fisher = _fisher(fn, params, batches, metric, paths, originals, key)

        def evaluate(path, value):  # exactly 0 for an unchanged leaf (F is finite)
            return float(_half_weighted(fisher[path], value, originals[path]))
    else:
        metric = default_metric if metric is None else metric
        forward = functools.partial(_forward, _Static(fn))
        score = functools.partial(_score, _Static(metric))
        references = [forward(params, *args) for args in batches]
        base = []
        for ref in references:
            value = score(ref, ref)
            _check_scalar(value, "metric(outputs, reference)")
            base.append(float(value))

        def evaluate(path, value):
            value = value.astype(originals[path].dtype)
            trial = jtree.map_with_paths(lambda p, x: value if p == path else x, params)
            total = sum(
                float(score(forward(trial, *args), ref)) - b
                for args, ref, b in zip(batches, references, base)
            )
            return total / len(batches)

    names = list(options)
    if not quiet:
        from rich.progress import track

        names = track(
            names,
            description=f"sensitivity ({method}, {len(paths)} leaves x {len(options)} options)",
        )
    increase: dict[str, dict[str, float]] = {p: {} for p in paths}
    cost: dict[str, dict[str, int]] = {p: {} for p in paths}
    skipped: dict[str, dict[str, str]] = {}
    for name in names:
        compressed = _compressed_leaves(params, paths, originals, options[name], kind, resolved)
        for path in paths:
            got = compressed[path]
            if isinstance(got, ValueError):  # the option does not fit this leaf
                increase[path][name], cost[path][name] = math.inf, None
                skipped.setdefault(path, {})[name] = str(got)
                continue
            value, cost[path][name] = got
            if method == "measure" and bool(jnp.array_equal(value, originals[path])):
                increase[path][name] = 0.0  # the outputs cannot change
            else:
                increase[path][name] = evaluate(path, value)
        del compressed
    for path, reasons in skipped.items():
        if len(reasons) == len(options):
            raise ValueError(
                f"{path}: no option fits this leaf ({'; '.join(reasons.values())}); add one "
                "that does (None keeps it uncompressed), or leave it out with where="
            )
    # the dicts in option order, as given
    increase = {p: {n: increase[p][n] for n in options} for p in paths}
    cost = {p: {n: cost[p][n] for n in options} for p in paths}
    sizes = {p: int(originals[p].size) for p in paths}
    float_bytes = {p: int(originals[p].nbytes) for p in paths}
    return Sensitivity(
        kind, dict(options), paths, increase, cost, float_bytes, sizes, skipped=skipped
    )
