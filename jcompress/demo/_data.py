"""scikit-learn's digits (8x8 images, 10 classes, 1797 samples) as JAX-ready arrays."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Digits:
    """A train/test split of the digits data set.

    Attributes:
      x_train, x_test: float32 ``(n, 64)`` in ``[0, 1]``.
      y_train, y_test: int32 ``(n,)`` labels in ``0..9``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def images(self, split: str = "train") -> np.ndarray:
        """``(n, 8, 8, 1)`` images (NHWC) for convolutional models."""
        x = self.x_train if split == "train" else self.x_test
        return x.reshape(-1, 8, 8, 1)


def load_digits(*, seed: int = 0, test_fraction: float = 0.3) -> Digits:
    """Digits with a stratified, seeded train/test split (539 test images at 0.3).

    Needs scikit-learn (the ``demo`` and ``test`` extras).

    >>> d = load_digits(seed=0)
    >>> d.x_train.shape[1], d.x_test.shape[0]
    (64, 539)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as _sk_load
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the digits demo needs scikit-learn: pip install 'jcompress[demo]'"
        ) from e
    raw = _sk_load()
    x = (raw.data / 16.0).astype(np.float32)
    y = raw.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: round(len(idx) * test_fraction)])
    test = np.zeros(len(y), bool)
    test[np.concatenate(test_idx)] = True
    train_idx = np.flatnonzero(~test)
    rng.shuffle(train_idx)
    return Digits(x[train_idx], y[train_idx], x[test], y[test])


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epochs: int = 1,
    steps: int | None = None,
):
    """Yield shuffled ``(x, y)`` minibatches of exactly ``batch_size`` (the last partial one of
    each epoch is dropped, so a jitted step compiles once).

    Args:
      x, y: arrays with the examples on the leading axis.
      batch_size: examples per batch.
      seed: the shuffling seed (a fresh permutation per epoch).
      epochs: passes over the data.
      steps: if given, yield exactly this many batches instead, starting a new epoch as often as
        needed (``epochs`` is then ignored); the first ``steps`` batches are those ``epochs``
        large enough would give.

    >>> x, y = np.arange(10).reshape(5, 2), np.arange(5)
    >>> [len(xb) for xb, _ in batches(x, y, 2, seed=0, steps=5)]
    [2, 2, 2, 2, 2]
    """
    if batch_size < 1 or batch_size > len(x):
        raise ValueError(
            f"batch_size must be in [1, {len(x)}] for {len(x)} examples, got {batch_size}"
        )
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rng = np.random.default_rng(seed)
    n = len(x)
    epoch, done = 0, 0
    while (epoch < epochs) if steps is None else (done < steps):
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            if steps is not None and done == steps:
                return
            j = perm[i : i + batch_size]
            yield x[j], y[j]
            done += 1
        epoch += 1
