"""A toy pruning criterion, written by following ARCHITECTURE.md "Add a pruning criterion".

Keep the weights farthest from their layer's mean: a criterion is a function computing scores.
"""

import jax
import jax.numpy as jnp

from jcompress.pruning import score_masks


def distance_scores(params, grads=None):
    """``|w - mean(w)|`` per leaf (``grads`` unused: the ``prune(criterion=...)`` signature)."""
    return jax.tree.map(lambda w: jnp.abs(w - jnp.mean(w)), params)


def distance_masks(params, sparsity, **kwargs):
    """One-shot masks by distance from the mean (any structure, scope, where, roles)."""
    return score_masks(params, distance_scores(params), sparsity, **kwargs)
