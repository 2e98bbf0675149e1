"""Training and timing helpers shared by ``jcompress demo``, the examples and the studies."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from jcompress.demo._data import Digits, batches

__all__ = ["cross_entropy_loss", "fit", "median_seconds"]


def cross_entropy_loss(apply_fn: Callable) -> Callable:
    """``loss(params, x, y)``: mean softmax cross-entropy of ``apply_fn(params, x)`` on labels.

    Any model works: ``apply_fn(params, x) -> logits (n, classes)``; wrap it to train through a
    transformation (``lambda p, x: apply(fake_quantize(p, spec), x)`` for QAT).

    >>> import jax.numpy as jnp
    >>> loss = cross_entropy_loss(lambda p, x: x @ p)
    >>> round(float(loss(jnp.zeros((3, 4)), jnp.ones((2, 3)), jnp.array([0, 1]))), 4)  # log(4)
    1.3863
    """

    def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = apply_fn(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def fit(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    params: Any,
    data: Digits | tuple[Any, Any],
    *,
    seed: int,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    progress: Any = None,
    description: str = "train",
) -> tuple[Any, Any]:
    """Minimize ``loss_fn(params, x, y)`` with ``tx`` over shuffled minibatches.

    One jitted step (compiled once per call); the loop is the plain optax one, so any
    transformation works as ``tx`` (``jc.pruning.prune(...)`` keeps its masks in the returned
    state). A rich ``progress`` bar shows the loss when given.

    Args:
      loss_fn: ``loss_fn(params, x, y) -> scalar`` (e.g. :func:`cross_entropy_loss`).
      tx: the optax optimizer.
      params: the initial parameters (any pytree).
      data: a :class:`Digits` split (its ``x_train``, ``y_train``) or an ``(x, y)`` pair.
      seed: the batch order (see :func:`batches`).
      epochs: passes over the data; or
      steps: the number of steps (exactly one of ``epochs`` and ``steps``).
      batch_size: examples per step.
      progress: a ``rich.progress.Progress`` to report to.
      description: the progress bar's label.

    Returns:
      ``(params, opt_state)``.

    Raises:
      ValueError: unless exactly one of ``epochs`` and ``steps`` is given.

    >>> import jax.numpy as jnp
    >>> x, y = np.eye(4, dtype=np.float32), np.arange(4)
    >>> loss = cross_entropy_loss(lambda p, x: x @ p)
    >>> w, _ = fit(loss, optax.sgd(1.0), jnp.zeros((4, 4)), (x, y), steps=50, batch_size=2, seed=0)
    >>> [int(i) for i in jnp.argmax(x @ w, -1)]
    [0, 1, 2, 3]
    """
    if (epochs is None) == (steps is None):
        raise ValueError(f"fit: give exactly one of epochs= and steps= (got {epochs=}, {steps=})")
    x, y = (data.x_train, data.y_train) if isinstance(data, Digits) else data
    stream = batches(x, y, batch_size, seed=seed, epochs=epochs or 1, steps=steps)
    total = steps if steps is not None else epochs * (len(x) // batch_size)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    task = progress.add_task(description, total=total, info="") if progress else None
    for i, (xb, yb) in enumerate(stream):
        params, opt_state, loss = step(params, opt_state, xb, yb)
        if task is not None and (i % 20 == 0 or i == total - 1):
            progress.update(task, completed=i + 1, info=f"loss {float(loss):.3f}")
    if task is not None:
        progress.update(task, completed=total)
    return params, opt_state


def median_seconds(fns: Mapping[str, Callable[[], Any]], *, repeats: int) -> dict[str, float]:
    """Median wall-clock seconds per call of each ``fn()``, the calls interleaved.

    Each function is called once first (compilation), then ``repeats`` rounds call every
    function in turn, so a change in machine load affects them alike: compare the ratios.

    >>> t = median_seconds({"noop": lambda: None}, repeats=3)
    >>> list(t), t["noop"] >= 0
    (['noop'], True)
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        jax.block_until_ready(f())
    for _ in range(repeats):
        for k, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}
