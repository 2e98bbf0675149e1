"""Data and models for ``jcompress demo`` and the examples (nothing in the library imports this)."""

from jcompress.demo._charlm import (
    CharLM,
    calibration_windows,
    charlm_perplexity,
    heldout_windows,
    load_charlm,
)
from jcompress.demo._data import Digits, batches, load_digits
from jcompress.demo._models import CNN, MLP, accuracy
from jcompress.demo._pipeline import DigitsTask, fit, run

__all__ = [
    "CharLM",
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
    "fit",
    "load_digits",
    "run",
]
