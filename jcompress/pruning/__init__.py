"""jcompress.pruning: masks (magnitude, random, saliency; unstructured, N:M, channels).

Masks are pytrees with the parameters' paths; ``apply_masks`` zeroes the pruned weights.
Counts are exact: a pool of ``S`` weights at sparsity ``s`` loses ``round(float32(s) * S)``.
"""

from jcompress.pruning._apply import apply_masks, sparsity
from jcompress.pruning._criteria import (
    magnitude_masks,
    nm_masks,
    random_masks,
    saliency_masks,
    score_masks,
    structured_masks,
)
from jcompress.pruning._structures import NM, Channels, Unstructured

# isort: split
# Schedules and the optax transform.
from jcompress.pruning._optax import PruneState, masks_of, nonfinite, prune
from jcompress.pruning._schedules import Schedule, constant_schedule, polynomial_schedule

# isort: split
# Calibrated pruning (input statistics or second-order information).
from jcompress.pruning._sparsegpt import sparsegpt, sparsegpt_layer
from jcompress.pruning._wanda import wanda_masks

__all__ = [
    "NM",
    "Channels",
    "Unstructured",
    "apply_masks",
    "magnitude_masks",
    "nm_masks",
    "random_masks",
    "saliency_masks",
    "score_masks",
    "sparsity",
    "structured_masks",
    "PruneState",
    "Schedule",
    "constant_schedule",
    "masks_of",
    "nonfinite",
    "polynomial_schedule",
    "prune",
    "sparsegpt",
    "sparsegpt_layer",
    "wanda_masks",
]
