"""Scores to masks: the jittable part of every mask function (exact counts, no sort).

Every mask function is :func:`~jcompress.pruning._plan.plan` (eager validation: what is pruned,
how) + element scores (:mod:`~jcompress.pruning._criteria`) + :func:`masks_from_scores`, which
dispatches on the structure: unstructured (pooled per leaf, stacked slice or globally) and N:M
selection come from :mod:`~jcompress.pruning._threshold`, channels from
:mod:`~jcompress.pruning._channels` and, coupled by groups, :mod:`~jcompress.pruning._groups`.

Masks have the parameters' paths: a bool array broadcastable to the leaf for selected leaves
(full shape for :class:`Unstructured` and :class:`NM`; size-1 axes except the output and stacked
axes for :class:`Channels`), ``True`` for the rest. ``apply_masks`` is ``jnp.where(mask, p, 0)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.pruning._channels import channel_masks
from jcompress.pruning._groups import group_masks
from jcompress.pruning._plan import Plan
from jcompress.pruning._structures import NM, Unstructured
from jcompress.pruning._threshold import (
    from_rows,
    keys_of,
    lowest,
    nm_keep,
    to_rows,
    with_previous,
)
from jcompress.tree import Params, Role

__all__ = ["Entry", "Masks", "masks_from_scores"]

Masks = Any
"""A pytree with the parameters' paths: bool arrays for pruned leaves, ``True`` elsewhere."""


class Entry(NamedTuple):
    """One selected leaf on its way to a mask.

    Attributes:
      index: the leaf's position in ``leaves_with_paths`` order.
      score: its float scores, the leaf's shape.
      role: its :class:`~jcompress.tree.Role`.
      previous: the previous mask (``None``: nothing pruned before).
    """

    index: int
    score: jax.Array
    role: Role
    previous: Any


def _unstructured(entries: list[Entry], sparsity: jax.Array, scope: str) -> dict[int, jax.Array]:
    if scope == "layer":
        out = {}
        for e in entries:
            rows, layout = to_rows(with_previous(keys_of(e.score), e.previous), e.role.stacked)
            [keep] = lowest([rows], sparsity, e.previous is not None)
            out[e.index] = from_rows(keep, layout)
        return out
    keys = [with_previous(keys_of(e.score), e.previous).reshape(1, -1) for e in entries]
    keeps = lowest(keys, sparsity, any(e.previous is not None for e in entries))
    return {e.index: keep.reshape(e.score.shape) for e, keep in zip(entries, keeps)}


def _nm(entries: list[Entry], nm: NM) -> dict[int, jax.Array]:
    return {
        e.index: nm_keep(with_previous(keys_of(e.score), e.previous), e.role.group_axis, nm.n, nm.m)
        for e in entries
    }


def masks_from_scores(
    params: Params,
    scores: Params | Mapping[str, Any],
    sparsity: jax.typing.ArrayLike | None,
    plan: Plan,
    *,
    previous: Masks | None = None,
) -> Masks:
    """Masks keeping the highest ``scores`` of the leaves ``plan`` selects; jittable.

    Exact counts: a pool of ``S`` weights (a leaf, a stacked slice, or every selected leaf for
    ``scope="global"``; channels for :class:`Channels`) loses exactly
    ``k = round(float32(sparsity) * S)`` (half to even, exact integer arithmetic). The threshold
    is found by histogram refinement over the scores' float32 bit patterns (two counting passes,
    no sort). Ties at the threshold: the lowest positions are pruned first, in the order leaves
    in tree order (:func:`jcompress.tree.leaves_with_paths`), then row-major inside a leaf
    (inside a stacked slice for ``scope="layer"``). Scores are compared by absolute value.

    Args:
      params: the parameter tree (only shapes and dtypes are used), as given to :func:`plan`.
      scores: a pytree or flat ``{path: array}`` dict with the parameters' paths: float arrays of
        the leaf's shape for selected leaves (element scores; :class:`Channels` combines them by
        its norm), anything for the others (ignored).
      sparsity: a float32 scalar, concrete or TRACED (shapes stay static, so one compilation
        serves every value); inside ``jit`` it is clipped to ``[0, 1]`` (NaN counts as 0).
        Ignored for :class:`NM`.
      plan: from :func:`plan`.
      previous: ``None`` or a masks tree with the same paths. Weights pruned there stay pruned:
        they rank below every score, so the count stays exact while ``k`` is at least the number
        already pruned; if more were pruned before, they all stay pruned and nothing else is
        (N:M: a group keeps fewer than ``n``).

    Returns:
      The masks tree with ``params``' structure, plain arrays (no nnx ``Variable`` wrappers):
      bool arrays for selected leaves (and, with channel groups, every group member), ``True``
      elsewhere.

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.pruning._plan import plan
    >>> params = {"kernel": jnp.array([[1.0, -4.0], [3.0, 2.0]])}
    >>> p = plan(params)
    >>> f = jax.jit(lambda s: masks_from_scores(params, params, s, p))
    >>> f(0.5)["kernel"].tolist()
    [[False, True], [True, False]]
    """
    chosen = jtree.selection(params, plan.selection, roles=plan.roles, what="masks_from_scores")
    score_of = chosen.match(scores, name="scores")
    previous_of = {} if previous is None else jtree.match_by_path(params, previous, name="previous")
    prev_leaves = []
    for path in chosen.all_paths:
        prev = previous_of.get(path)
        if path in chosen and isinstance(prev, bool | np.bool_) and prev:
            prev = None  # a selected leaf with nothing pruned before
        prev_leaves.append(prev)
    entries = []
    for i, (path, leaf) in enumerate(chosen.pairs):
        if path not in chosen:
            continue
        score = jnp.asarray(score_of[path])
        if score.shape != tuple(np.shape(leaf)) or not jnp.issubdtype(score.dtype, jnp.floating):
            raise ValueError(
                f"{path}: scores must be a float array of the leaf's shape {np.shape(leaf)}, "
                f"got {score.dtype}{score.shape}"
            )
        entries.append(Entry(i, score, plan.roles[path], prev_leaves[i]))
    structure = plan.structure
    if sparsity is not None:
        sparsity = jnp.asarray(sparsity, jnp.float32)
    elif not isinstance(structure, NM):
        raise ValueError(f"{type(structure).__name__} pruning needs a sparsity, got None")
    if isinstance(structure, Unstructured):
        masks = _unstructured(entries, sparsity, plan.scope)
    elif isinstance(structure, NM):
        masks = _nm(entries, structure)
    elif structure.groups is None:
        masks = channel_masks(entries, sparsity, plan.scope, structure)
    else:
        masks = group_masks(
            chosen.pairs,
            {e.index: e.score for e in entries},
            prev_leaves,
            [p in chosen for p in chosen.all_paths],
            sparsity,
            channels=structure,
            scope=plan.scope,
            roles=plan.roles,
        )
    return chosen.unflatten({chosen.all_paths[i]: m for i, m in masks.items()})
