"""Wanda: pruning by weight magnitude times input-activation norm (Sun et al., 2023).

A weight's score is ``|W[i, o]| · ||X[:, i]||₂``: a small weight on an input channel that carries
large activations still matters. Scores are compared *within each output channel* (a column of
a Flax ``(in, out)`` kernel), so every output channel loses the same number of weights. The
activation norms come from ``jc.capture`` (``sqrt(InputStats.sumsq)``); no weight is updated.

Reference: Sun, Liu, Bair, Kolter, 2023, "A Simple and Effective Pruning Approach for Large
Language Models", arXiv:2306.11695.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.calibration import check_stats
from jcompress.pruning._plan import plan_selection, takes_rules
from jcompress.pruning._structures import NM, Structure
from jcompress.pruning._threshold import exact_count, keep_largest, keys_of, nm_keep
from jcompress.tree import Params, Role, Where

__all__ = ["per_output_keep", "wanda_masks", "wanda_scores"]


def per_output_keep(scores: jax.Array, role: Role, sparsity: Any, structure: Structure):
    """Keep mask of a leaf's ``scores``: per output channel (and stacked slice) the lowest
    ``round(s · C)`` of its ``C`` contracting entries go (:class:`Unstructured`), or the lowest
    ``m - n`` of each ``m`` consecutive entries along the last contracting axis (:class:`NM`)."""
    if isinstance(structure, NM):
        return nm_keep(keys_of(scores), role.group_axis, structure.n, structure.m)
    lead = (*role.stacked, *role.output)
    rest = tuple(a for a in range(scores.ndim) if a not in lead)
    perm = (*lead, *rest)
    y = jnp.transpose(scores, perm)
    size = math.prod(y.shape[len(lead) :])
    keep = keep_largest(y.reshape(*y.shape[: len(lead)], size), exact_count(sparsity, size))
    return jnp.transpose(keep.reshape(y.shape), tuple(np.argsort(perm)))


def wanda_scores(w: jax.Array, sumsq: jax.Array, role: Role) -> jax.Array:
    """``|w| · sqrt(sumsq)`` in float32, ``sumsq`` per contracting entry broadcast over ``w``.

    ``sumsq`` is ``InputStats.sumsq``: ``(*stacked, prod(contracting sizes))``, the contracting
    axes flattened in leaf order.

    >>> from jcompress.tree import Role
    >>> wanda_scores(jnp.array([[1.0, -2.0], [3.0, 1.0]]), jnp.array([4.0, 1.0]),
    ...              Role("matmul", (0,), (1,))).tolist()
    [[2.0, 4.0], [3.0, 1.0]]
    """
    shape = w.shape
    c_shape = [shape[a] for a in role.contracting]
    s_shape = [shape[a] for a in role.stacked]
    norm = jnp.sqrt(jnp.maximum(jnp.asarray(sumsq, jnp.float32), 0).reshape(*s_shape, *c_shape))
    # lay the norms out in w's axis order: stacked and contracting axes present, others size 1
    present = sorted((*role.stacked, *role.contracting))
    src = [*role.stacked, *role.contracting]
    norm = jnp.transpose(norm, [src.index(a) for a in present])
    full = [shape[a] if a in present else 1 for a in range(len(shape))]
    return jnp.abs(w.astype(jnp.float32)) * norm.reshape(full)


@functools.partial(jax.jit, static_argnames=("role", "structure"))
def _leaf_keep(w, sumsq, sparsity, *, role: Role, structure: Structure) -> jax.Array:
    return per_output_keep(wanda_scores(w, sumsq, role), role, sparsity, structure)


def _stats_for(path: str, leaf: Any, role: Role, stats: Mapping[str, Any]) -> jax.Array:
    st = stats[path]
    sumsq = getattr(st, "sumsq", None)
    if sumsq is None:
        raise TypeError(
            f"{path}: stats entries must be InputStats from jc.capture, got {type(st).__name__}"
        )
    shape = np.shape(leaf)
    want = [shape[a] for a in role.stacked] + [math.prod(shape[a] for a in role.contracting)]
    if list(np.shape(sumsq)) != want:
        raise ValueError(
            f"{path}: InputStats.sumsq has shape {tuple(np.shape(sumsq))}, but the leaf "
            f"{tuple(shape)} with role {role} needs {tuple(want)} (stacked slices, then the "
            "flattened contracting axes); capture the statistics with the same fn and params"
        )
    return sumsq


@takes_rules("Wanda pruning", kinds=("matmul", "conv"))
def wanda_masks(
    params: Params,
    stats: Mapping[str, Any],
    sparsity: jax.typing.ArrayLike | None,
    *,
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Any:
    """Wanda masks: keep the largest ``|W| · ||X||₂`` within each output channel.

    Args:
      params: the parameter tree (linen dict, ``nnx.State``, Equinox arrays, ...).
      stats: ``{path: InputStats}`` from ``jc.capture(fn, params, *batch)`` (merged over
        batches with ``.merge``): ``||X||₂ = sqrt(sumsq)`` per input channel.
      sparsity: fraction removed in ``[0, 1)``: every output channel (each index of the role's
        output axes, per stacked slice) of ``C`` contracting weights loses exactly
        ``round(float32(s) · C)``. ``None`` (or ``n/m``'s sparsity) with ``NM``. Or per-layer
        rules ``[(regex, sparsity | NM(n, m) | None), ...]``, as in ``magnitude_masks``.
      structure: ``Unstructured()`` (default) or ``NM(n, m)`` (groups of ``m`` along the last
        contracting axis, each keeping its ``n`` best scores).
      where: selection; default: matmul/conv kernels (leaves with input statistics).
      roles: ``{path: Role}`` (``jc.roles``); default: Flax layouts.

    Returns:
      Masks with the params' paths (plain bool arrays of the leaf shapes; ``True`` elsewhere).
      Ties prune the lowest contracting index first; masks are deterministic.

    Raises:
      ValueError: a selected path without statistics (all of them named), statistics of the
        wrong shape, NaN/Inf weights, bad sparsity/structure (as in ``magnitude_masks``).

    >>> import jax.numpy as jnp
    >>> from jcompress.runtime import InputStats
    >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 1.0], [0.5, 2.0]])}}
    >>> stats = {"Dense_0/kernel": InputStats(jnp.ones(2), jnp.array([1.0, 16.0]), jnp.array(4))}
    >>> wanda_masks(params, stats, 0.5)["Dense_0"]["kernel"].tolist()
    [[False, False], [True, True]]
    """
    what = "Wanda pruning"
    p, chosen = plan_selection(
        params,
        structure=structure,
        where=where,
        roles=roles,
        sparsity=sparsity,
        what=what,
        kinds=("matmul", "conv"),
        require_sparsity=True,
    )
    check_stats(list(chosen.paths), stats, what)
    values = chosen.check_finite().values()
    s_value = jnp.float32(0) if sparsity is None else jnp.asarray(sparsity, jnp.float32)
    keep = {}
    for path, role in p.roles.items():
        sumsq = _stats_for(path, chosen.leaves[path], role, stats)
        keep[path] = _leaf_keep(values[path], sumsq, s_value, role=role, structure=p.structure)
    return chosen.unflatten(keep)
