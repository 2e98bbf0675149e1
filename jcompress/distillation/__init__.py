"""Knowledge distillation: losses and a training step that train a student from teacher(s).

Losses follow ``optax.losses`` conventions (per-example outputs, ``where=`` element masks):

* :func:`kd_loss`: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton, Vinyals & Dean 2015);
* :func:`soft_cross_entropy`: cross-entropy against given teacher probabilities;
* feature (hint) losses on activations: :func:`feature_mse`, :func:`feature_cosine` (with
  learned projections, :func:`init_projection`, when widths differ; FitNets, Romero et al.
  2015), :func:`attention_transfer` (Zagoruyko & Komodakis 2017), and :func:`feature_loss` over
  dicts of activations matched by path;
* :func:`distillation_loss`: ``alpha · KD + (1 - alpha) · hard`` with the teacher's parameters
  as an explicit argument, several teachers, precomputed teacher logits, masks, BatchNorm state;
* :func:`make_train_step`: one jitted step around any optax optimizer (``jc.pruning.prune``
  included), so a pruned, quantization-aware student learns from its teacher in one step.
"""

from jcompress.distillation._features import (
    attention_transfer,
    feature_cosine,
    feature_loss,
    feature_mse,
    init_projection,
    init_projections,
    project,
)
from jcompress.distillation._losses import kd_loss, soft_cross_entropy
from jcompress.distillation._objective import distillation_loss
from jcompress.distillation._train import make_train_step

__all__ = [
    "attention_transfer",
    "distillation_loss",
    "feature_cosine",
    "feature_loss",
    "feature_mse",
    "init_projection",
    "init_projections",
    "kd_loss",
    "make_train_step",
    "project",
    "soft_cross_entropy",
]
