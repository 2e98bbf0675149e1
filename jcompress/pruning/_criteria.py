"""Mask criteria: magnitude, random and saliency scores, for any structure.

:func:`score_masks` turns any element scores into masks; it is the extension point (a new
criterion is a function computing scores). Each named criterion is a thin function:
:func:`~jcompress.pruning._plan.plan_selection` (eager validation, the selected leaves checked
for NaN/Inf), element scores, and :func:`~jcompress.pruning._masks.masks_from_scores` (exact
counts). ``nm_masks`` and ``structured_masks`` are shorthands for the N:M and channel
structures.

References:
  Han et al., 2015, "Learning both Weights and Connections for Efficient Neural Networks"
  (magnitude), arXiv:1506.02626; Molchanov et al., 2017, "Pruning Convolutional Neural Networks for
  Resource Efficient Inference" (first-order saliency ``|w * g|``), arXiv:1611.06440; Mishra et al.,
  2021 (N:M), arXiv:2104.08378; Li et al., 2017 (channel norms), arXiv:1608.08710.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.pruning._masks import Masks, masks_from_scores
from jcompress.pruning._plan import Plan, plan_selection, takes_rules
from jcompress.pruning._structures import NM, Channels, Structure
from jcompress.tree import Params, Role, Selection, Where

__all__ = [
    "magnitude_masks",
    "nm_masks",
    "random_masks",
    "saliency_masks",
    "score_masks",
    "structured_masks",
]


def _planned(params: Params, sparsity: Any, what: str, **kwargs: Any) -> tuple[Plan, Selection]:
    return plan_selection(params, sparsity=sparsity, what=what, require_sparsity=True, **kwargs)


def _narrow_scores(call: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """``score_masks``'s arguments for one rule: a flat ``{path: scores}`` dict narrowed to
    ``paths`` (a pytree with the params' paths is matched by path as it is)."""
    scores = call["scores"]
    if isinstance(scores, Mapping) and all(isinstance(p, str) and p in scores for p in paths):
        if not any(isinstance(v, Mapping) for v in scores.values()):
            return {**call, "scores": {p: scores[p] for p in paths}}
    return call


@takes_rules("magnitude pruning")
def magnitude_masks(
    params: Params,
    sparsity: jax.typing.ArrayLike | None,
    *,
    scope: str = "layer",
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Masks removing the weights of smallest magnitude ``|w|`` (Han et al., 2015).

    Args:
      params: parameter pytree (linen dict, ``nnx.State``, Equinox arrays, ...).
      sparsity: fraction removed, in ``[0, 1)``; exactly ``round(float32(sparsity) * S)`` of each
        pool of ``S`` weights (channels for :class:`Channels`). ``None`` for :class:`NM`. Or
        per-layer rules ``[(regex, sparsity | NM(n, m) | None), ...]``: the first
        ``re.fullmatch`` on a selected leaf's path gives its sparsity (``None``: dense, no rule:
        dense); every rule must win a leaf; ``scope="layer"`` only, no channel ``groups``. Each
        leaf's mask is then the one this function gives that leaf alone (criteria
        ``random_masks``, ``saliency_masks``, ``score_masks``, ``structured_masks`` and
        ``wanda_masks`` take the same rules).
      scope: ``"layer"`` (each leaf and stacked slice on its own) or ``"global"`` (one threshold
        over every selected leaf; channels ranked by norms divided by their layer's mean channel
        norm).
      structure: ``Unstructured()`` (default), ``NM(n, m)`` or ``Channels(norm=..., groups=...)``.
      where: selection (:func:`jcompress.tree.select`); default: matmul/conv/gather kernels
        (matmul/conv for N:M and channels).
      roles: ``{path: Role}`` (:func:`jcompress.roles`); default: Flax layouts.

    Returns:
      Masks with the params' paths (plain arrays): bool arrays for selected leaves, ``True``
      elsewhere.

    Raises:
      ValueError: NaN/Inf in a selected leaf, sparsity outside ``[0, 1)``, a bad selection or
        role, an N:M axis not divisible by ``m`` (each naming the path and the fix).

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.array([[0.1, -3.0], [2.0, 0.5]]), "bias": jnp.ones(2)}}
    >>> masks = magnitude_masks(params, 0.5)
    >>> masks["Dense_0"]["kernel"].tolist(), masks["Dense_0"]["bias"]
    ([[False, True], [True, False]], True)
    >>> deep = {"Dense_0": params["Dense_0"], "Dense_1": {"kernel": jnp.ones((2, 4))}}
    >>> masks = magnitude_masks(deep, [("Dense_1/.*", 0.75), ("Dense_0/.*", None)])
    >>> int((~masks["Dense_1"]["kernel"]).sum()), masks["Dense_0"]["kernel"]
    (6, True)
    """
    p, chosen = _planned(
        params,
        sparsity,
        "magnitude pruning",
        structure=structure,
        scope=scope,
        where=where,
        roles=roles,
    )
    return masks_from_scores(params, chosen.check_finite().values(), sparsity, p)


@takes_rules("score_masks", narrow=_narrow_scores)
def score_masks(
    params: Params,
    scores: Params | Mapping[str, Any],
    sparsity: jax.typing.ArrayLike | None,
    *,
    scope: str = "layer",
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Masks keeping the weights of highest ``scores``: any criterion, every structure.

    The criteria above are this function with their own scores; a criterion of your own is a
    function computing scores (``prune(criterion=fn)`` takes the same function during training).

    Args:
      params: the parameter pytree (only shapes, dtypes and paths are read).
      scores: float arrays of each selected leaf's shape (higher = keep), as a pytree with the
        params' paths or a flat ``{path: array}`` dict of the selected paths. Compared by
        absolute value; NaN/Inf in concrete scores is an error naming the path.
      sparsity, scope, structure, where, roles: as in :func:`magnitude_masks`.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> distance = {"kernel": jnp.abs(params["kernel"] - params["kernel"].mean())}
    >>> score_masks(params, distance, 0.5)["kernel"].tolist()
    [[True, False], [False, True]]
    """
    what = "score_masks"
    p, chosen = _planned(
        params, sparsity, what, structure=structure, scope=scope, where=where, roles=roles
    )
    given = chosen.match(scores, name="scores")
    for path, score in given.items():
        if jtree.is_concrete(score):
            try:
                jtree.check_finite(path, score, what=what)
            except ValueError as e:
                raise ValueError(str(e).replace("in the weights", "in the scores")) from None
    return masks_from_scores(params, given, sparsity, p)


def _path_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


@takes_rules("random pruning")
def random_masks(
    key: jax.Array,
    params: Params,
    sparsity: jax.typing.ArrayLike | None,
    *,
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Masks removing uniformly random weights (exact counts per layer), seeded by ``key``.

    Each leaf's scores come from ``jax.random.fold_in(key, crc32(path))``, so a leaf's mask
    depends only on the key and its path: same key, same masks. Structures as in
    :func:`magnitude_masks` (random channel scores for :class:`Channels`).

    >>> import jax, jax.numpy as jnp
    >>> params = {"kernel": jnp.ones((4, 4))}
    >>> masks = random_masks(jax.random.key(0), params, 0.25)
    >>> int((~masks["kernel"]).sum())
    4
    """
    if key is None:
        raise TypeError("random_masks needs an explicit jax.random key, got None")
    p, chosen = _planned(
        params, sparsity, "random pruning", structure=structure, where=where, roles=roles
    )
    scores = {
        path: jax.random.uniform(_path_key(key, path), np.shape(leaf), jnp.float32)
        for path, leaf in chosen.leaves.items()
    }
    return masks_from_scores(params, scores, sparsity, p)


@takes_rules("saliency pruning")
def saliency_masks(
    params: Params,
    grads: Params,
    sparsity: jax.typing.ArrayLike | None,
    *,
    scope: str = "layer",
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Masks removing the weights of smallest first-order saliency ``|w * g|``.

    The Taylor estimate of the loss change from zeroing a weight (Molchanov et al., 2017;
    SNIP, Lee et al., 2019, arXiv:1810.02340, uses the same score at initialisation). ``grads``
    has the params' paths (e.g. ``jax.grad(loss)(params)``). Other arguments as in
    :func:`magnitude_masks`.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> grads = {"kernel": jnp.array([[4.0, 0.1], [1.0, 0.0]])}
    >>> saliency_masks(params, grads, 0.5)["kernel"].tolist()
    [[True, False], [True, False]]
    """
    what = "saliency pruning"
    p, chosen = _planned(
        params, sparsity, what, structure=structure, scope=scope, where=where, roles=roles
    )
    values = chosen.check_finite().values()
    # Gradients exist for the array leaves only: a whole Equinox module's functions get `None`
    # from eqx.filter_grad, so they are matched against the params' arrays.
    arrays = jax.tree.map(
        lambda x: x if jtree.is_array_leaf(x) else None, params, is_leaf=jtree.is_compressed
    )
    grad_of = jtree.match_by_path(arrays, grads, name="grads")
    scores = {}
    for path, value in values.items():
        g = grad_of[path]
        g = g.dequantize() if jtree.is_compressed(g) else jnp.asarray(g)
        if g.shape != value.shape:
            raise ValueError(
                f"{path}: grads has shape {g.shape} but the parameter has {value.shape}; pass "
                "gradients of the same parameter tree"
            )
        if jtree.is_concrete(g):
            try:
                jtree.check_finite(path, g, what=what)
            except ValueError as e:
                raise ValueError(str(e).replace("in the weights", "in the gradients")) from None
        scores[path] = value.astype(jnp.float32) * g.astype(jnp.float32)
    return masks_from_scores(params, scores, sparsity, p)


def nm_masks(
    params: Params,
    *,
    n: int,
    m: int,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """N:M magnitude masks: ``magnitude_masks(params, None, structure=NM(n=n, m=m), ...)``.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0], [-4.0], [3.0], [2.0]])}
    >>> nm_masks(params, n=2, m=4)["kernel"][:, 0].tolist()
    [False, True, True, False]
    """
    return magnitude_masks(params, None, structure=NM(n=n, m=m), where=where, roles=roles)


def structured_masks(
    params: Params,
    sparsity: jax.typing.ArrayLike,
    *,
    norm: str = "l2",
    groups: Any = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Output-channel masks by weight norm (Li et al., 2017), optionally over channel groups.

    ``magnitude_masks(params, sparsity, structure=Channels(norm=norm, groups=groups), ...)``.
    Masks of a ``(in, out)`` kernel have shape ``(1, out)``.

    With ``groups`` (from ``jc.structure.dependencies``), a group of coupled channels is pruned
    only when a **selected leaf owns it**, holding it on an output axis: ``where="up/kernel"``
    prunes ``up``'s output channels (and their coupled members: bias, ``down``'s input rows)
    but not the residual stream that ``up`` reads. A channel's score sums its norms over the
    group members that are selected leaves (owner columns and selected readers' rows);
    unselected members (biases, norm parameters) are masked with the group but do not score.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0, 0.1, 3.0], [1.0, 0.2, -3.0]])}
    >>> structured_masks(params, 0.34)["kernel"].tolist()
    [[True, False, True]]
    """
    return magnitude_masks(
        params, sparsity, structure=Channels(norm=norm, groups=groups), where=where, roles=roles
    )
