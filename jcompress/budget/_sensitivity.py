"""Per-layer sensitivity: how much a model's outputs change when one leaf alone is compressed.

:func:`sensitivity` measures, for every selected leaf and every option, the increase of a metric
(default: KL divergence of the softmax outputs, or mean squared error) between the model with
only that leaf compressed and the float model, and the option's cost (packed bytes for
quantization options, pruned weights for sparsity options). :func:`jcompress.budget.allocate`
turns the result into per-leaf rules that meet a budget.
"""

from __future__ import annotations

import dataclasses
import re
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
        if out.ndim >= 1 and out.shape[-1] > 1:
            log_p = jax.nn.log_softmax(ref, axis=-1)
            log_q = jax.nn.log_softmax(out, axis=-1)
            total = total + jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))
        else:
            total = total + jnp.mean((out - ref) ** 2)
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
    """

    kind: str
    options: Mapping[str, Any]
    paths: tuple[str, ...]
    increase: Mapping[str, Mapping[str, float]]
    cost: Mapping[str, Mapping[str, int]]
    float_bytes: Mapping[str, int]
    sizes: Mapping[str, int]

    def table(self) -> Any:
        """A ``rich`` table: one row per leaf, ``increase (cost)`` per option."""
        from rich.table import Table

        unit = "bytes" if self.kind == "quantization" else "pruned"
        table = Table(title=f"sensitivity ({self.kind}): metric increase ({unit})")
        table.add_column("leaf")
        for name in self.options:
            table.add_column(name, justify="right")
        for path in self.paths:
            row = [f"{self.increase[path][n]:.3g} ({self.cost[path][n]})" for n in self.options]
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
            points = sorted((self.cost[leaf][n], self.increase[leaf][n]) for n in self.options)
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


def _compressed_leaf(params, path, value, option, kind, roles) -> tuple[Any, int]:
    """The float value of leaf ``path`` (float value ``value``) compressed with ``option`` alone,
    and its cost."""
    only = {path: roles[path]}
    where = re.escape(path)
    if option is None:
        return value, (value.nbytes if kind == "quantization" else 0)
    if kind == "quantization":
        q = dict(jtree.leaves_with_paths(quantize(params, option, where=where, roles=only)))[path]
        return jnp.asarray(dequantize(q)), int(q.nbytes)
    structure = option if isinstance(option, NM) else None
    sparsity = None if isinstance(option, NM) else option
    masks = magnitude_masks(params, sparsity, structure=structure, where=where, roles=only)
    keep = jnp.broadcast_to(dict(jtree.leaves_with_paths(masks))[path], value.shape)
    pruned = jnp.where(keep, value, jnp.zeros((), value.dtype))  # what apply_masks does
    return pruned, int(value.size) - int(jnp.sum(keep))


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
      method: ``"measure"``: about ``leaves * options`` forward passes per batch; ``fn`` is
        compiled once (every compressed leaf is evaluated in its float form, same shape and
        dtype). The second-order ``"fisher"`` estimate is not implemented in this version.
      where: selection (default: matmul/conv/gather kernels, as ``quantize``).
      roles: ``{path: Role}`` (``jc.roles(fn, params, *args)``) for non-Flax layouts.
      quiet: no ``rich`` progress bar.

    Returns:
      A :class:`Sensitivity`.

    Raises:
      ValueError / TypeError: bad options (empty, mixed kinds, out of range), an unknown method,
        empty batches, a selection error (naming the fix), NaN/Inf in a selected leaf, or a
        metric that is not a finite scalar.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -0.3], [0.2, 0.9]])}}
    >>> fn = lambda p, x: x @ p["Dense_0"]["kernel"]
    >>> s = sensitivity(fn, params, [jnp.eye(2)], {"int8": QuantSpec(bits=8), "float": None},
    ...                 quiet=True)
    >>> s.increase["Dense_0/kernel"]["float"], s.cost["Dense_0/kernel"]["float"]
    (0.0, 16)
    """
    if method != "measure":
        raise ValueError(
            f"method must be 'measure', got {method!r} (the 'fisher' estimate is not "
            "implemented in this version)"
        )
    kind = options_kind(options)
    batches = _batches(batches)
    metric = default_metric if metric is None else metric
    chosen = jtree.selection(params, where, roles=roles, what="sensitivity").check_finite()
    paths, resolved = tuple(chosen.paths), chosen.roles
    forward = jax.jit(fn)
    score = jax.jit(lambda out, ref: jnp.asarray(metric(out, ref), jnp.float32))
    references = [forward(params, *args) for args in batches]
    base = []
    for ref in references:
        value = score(ref, ref)
        if value.shape != () or not bool(jnp.isfinite(value)):
            raise ValueError(
                f"metric(outputs, reference) must be a finite scalar, got {value!r} on the float "
                "model; pass a metric returning one number"
            )
        base.append(float(value))

    pairs = [(path, name) for path in paths for name in options]
    if not quiet:
        from rich.progress import track

        pairs = track(pairs, description=f"sensitivity ({len(paths)} leaves)")
    increase: dict[str, dict[str, float]] = {p: {} for p in paths}
    cost: dict[str, dict[str, int]] = {p: {} for p in paths}
    originals = {p: jnp.asarray(jtree.unwrap(chosen.leaves[p])) for p in paths}
    for path, name in pairs:
        original = originals[path]
        value, cost[path][name] = _compressed_leaf(
            params, path, original, options[name], kind, resolved
        )
        if bool(jnp.array_equal(value, original)):
            increase[path][name] = 0.0  # the outputs cannot change
            continue
        value = value.astype(original.dtype)
        trial = jtree.map_with_paths(lambda p, x, v=value, at=path: v if p == at else x, params)
        total = sum(
            float(score(forward(trial, *args), ref)) - b
            for args, ref, b in zip(batches, references, base)
        )
        increase[path][name] = total / len(batches)
    sizes = {p: int(originals[p].size) for p in paths}
    float_bytes = {p: int(originals[p].nbytes) for p in paths}
    return Sensitivity(kind, dict(options), paths, increase, cost, float_bytes, sizes)
