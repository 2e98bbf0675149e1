"""Data, models and training helpers for ``jcompress demo``, the examples and the studies.

Nothing in the library imports this package.
"""

from jcompress.demo._charlm import (
    CharLM,
    calibrated_variants,
    calibration_windows,
    charlm_perplexity,
    heldout_windows,
    load_charlm,
)
from jcompress.demo._data import Digits, batches, load_digits
from jcompress.demo._models import CNN, MLP, accuracy
from jcompress.demo._pipeline import DigitsTask, run
from jcompress.demo._train import cross_entropy_loss, fit, median_seconds

__all__ = [
    "CharLM",
    "calibrated_variants",
    "calibration_windows",
    "charlm_perplexity",
    "heldout_windows",
    "load_charlm",
    "CNN",
    "MLP",
    "Digits",
    "DigitsTask",
    "accuracy",
    "batches",
    "cross_entropy_loss",
    "fit",
    "load_digits",
    "median_seconds",
    "run",
]
