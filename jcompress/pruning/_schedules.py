"""Sparsity schedules: plain functions ``step -> target sparsity`` for :func:`prune`.

A schedule takes a step count (a Python int or an integer array, traced or not) and returns the
target sparsity at that step as a ``float32`` scalar array. Schedules here are piecewise constant:
:func:`jcompress.pruning.prune` recomputes its masks exactly when the target changes, so the masks
are fixed between updates and after the schedule ends.

Any function with this signature works as a schedule (``optax`` schedules included), as long as
it returns values in ``[0, 1)`` that never decrease (masks only grow within a schedule).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcompress import tree as jtree
from jcompress.pruning._plan import check_fraction, check_rule_structure

__all__ = ["Schedule", "constant_schedule", "polynomial_schedule", "schedule_rules"]

_MAX_UPDATES = 2**20

Schedule = Callable[[ArrayLike], jax.Array]
"""``step -> target sparsity``: a ``float32`` scalar in ``[0, 1)``, non-decreasing in ``step``."""


def _check_sparsity(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    return check_fraction(value, name)


def _check_step(name: str, value: int, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value >= 2**31 - 1:
        raise ValueError(f"{name} must fit in int32 (step counts are int32), got {value}")
    return value


def _as_step(step: ArrayLike) -> jax.Array:
    step = jnp.asarray(step)
    if not jnp.issubdtype(step.dtype, jnp.integer) or step.shape != ():
        raise TypeError(
            f"a schedule takes a scalar integer step, got dtype {step.dtype} and shape {step.shape}"
        )
    return step.astype(jnp.int32)


def constant_schedule(sparsity: float, *, begin_step: int = 0) -> Schedule:
    """Target ``sparsity`` from ``begin_step`` on, 0 (no pruning) before.

    One-shot pruning is a constant schedule: :func:`prune` computes the masks once, at
    ``begin_step``, from the parameters it sees then, and keeps them fixed afterwards.

    Args:
      sparsity: the fraction of selected weights to remove, in ``[0, 1)``.
      begin_step: the first step with a non-zero target.

    Returns:
      ``schedule(step) -> float32 scalar``; jittable with a traced ``step``.

    Raises:
      ValueError / TypeError: ``sparsity`` outside ``[0, 1)``, ``begin_step`` negative or not
        an int.

    >>> s = constant_schedule(0.5, begin_step=10)
    >>> [float(s(t)) for t in (0, 9, 10, 1000)]
    [0.0, 0.0, 0.5, 0.5]
    """
    sparsity = _check_sparsity("constant_schedule: sparsity", sparsity)
    begin_step = _check_step("constant_schedule: begin_step", begin_step)
    value = jnp.float32(sparsity)

    def schedule(step: ArrayLike) -> jax.Array:
        return jnp.where(_as_step(step) >= begin_step, value, jnp.float32(0.0))

    return schedule


def polynomial_schedule(
    final_sparsity: float,
    *,
    begin_step: int,
    end_step: int,
    initial_sparsity: float = 0.0,
    power: float = 3,
    update_every: int = 100,
) -> Schedule:
    r"""Gradual magnitude pruning's polynomial schedule (Zhu & Gupta, 2017).

    With :math:`t_0` = ``begin_step``, :math:`\Delta t` = ``update_every`` and
    :math:`T` = ``end_step``, the target is updated only at the steps
    :math:`t_k = t_0 + k\,\Delta t < T` and held constant between them:

    .. math::

       s(t) = s_f + (s_i - s_f)\left(1 - \frac{t_k - t_0}{T - t_0}\right)^{p},
       \qquad t_k \le t < t_{k+1},

    ``0`` before :math:`t_0` (no pruning) and exactly :math:`s_f` from :math:`T` on. When
    ``update_every`` divides ``end_step - begin_step`` this is the paper's
    :math:`n` pruning steps of length :math:`\Delta t`. The sparsity rises fast early, while
    the network has many redundant weights, and slowly near the end.

    Args:
      final_sparsity: :math:`s_f`, in ``[0, 1)``.
      begin_step: :math:`t_0`, the first pruning step (target ``initial_sparsity``).
      end_step: :math:`T > t_0`, the step from which the target is ``final_sparsity``.
      initial_sparsity: :math:`s_i \le s_f`, in ``[0, 1)``.
      power: :math:`p > 0` (3 in the paper).
      update_every: :math:`\Delta t \ge 1`, steps between target updates (each one is a mask
        recomputation in :func:`prune`).

    Returns:
      ``schedule(step) -> float32 scalar``, non-decreasing; jittable with a traced ``step``.

    Raises:
      ValueError / TypeError: any argument out of range (named in the message), or more than
        2**20 target updates (raise ``update_every``).

    References:
      Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
      compression", 2017. https://arxiv.org/abs/1710.01878

    >>> s = polynomial_schedule(0.8, begin_step=0, end_step=4, power=1, update_every=2)
    >>> [round(float(s(t)), 4) for t in range(6)]
    [0.0, 0.0, 0.4, 0.4, 0.8, 0.8]
    """
    what = "polynomial_schedule"
    final_sparsity = _check_sparsity(f"{what}: final_sparsity", final_sparsity)
    initial_sparsity = _check_sparsity(f"{what}: initial_sparsity", initial_sparsity)
    if initial_sparsity > final_sparsity:
        raise ValueError(
            f"{what}: initial_sparsity ({initial_sparsity}) must be <= final_sparsity "
            f"({final_sparsity}); masks only grow within a schedule"
        )
    begin_step = _check_step(f"{what}: begin_step", begin_step)
    end_step = _check_step(f"{what}: end_step", end_step)
    if end_step <= begin_step:
        raise ValueError(
            f"{what}: end_step ({end_step}) must be > begin_step ({begin_step}); for one-shot "
            "pruning use constant_schedule(sparsity, begin_step=...)"
        )
    update_every = _check_step(f"{what}: update_every", update_every, minimum=1)
    if isinstance(power, bool) or not isinstance(power, numbers.Real):
        raise TypeError(f"{what}: power must be a positive number, got {power!r}")
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"{what}: power must be finite and > 0, got {power}")

    n_updates = -(-(end_step - begin_step) // update_every)  # ceil: t_k < end_step
    if n_updates > _MAX_UPDATES:
        raise ValueError(
            f"{what}: {n_updates} target updates between begin_step and end_step (each one "
            f"recomputes the masks); at most {_MAX_UPDATES} are supported: raise update_every"
        )
    # The targets of every update, computed once in float64 on the host and rounded to float32:
    # exact, monotone after rounding, and bit-identical under jit and eager (computed in XLA,
    # a division by a constant becomes a multiplication by its rounded reciprocal).
    k = np.arange(n_updates, dtype=np.float64)
    remaining = 1.0 - (k * update_every) / (end_step - begin_step)
    ramp = final_sparsity + (initial_sparsity - final_sparsity) * remaining**power
    table = np.append(np.minimum(ramp, final_sparsity), final_sparsity).astype(np.float32)
    table = np.maximum.accumulate(table)  # guard the float64 evaluation's last bit
    table = jnp.asarray(table)

    def schedule(step: ArrayLike) -> jax.Array:
        step = _as_step(step)
        elapsed = jnp.clip(step - begin_step, 0, end_step - begin_step)
        index = jnp.where(step >= end_step, n_updates, elapsed // update_every)
        return jnp.where(step < begin_step, jnp.float32(0.0), table[index])

    return schedule


def schedule_rules(schedule: Any, *, structure: Any, scope: str) -> list[jtree.Rule] | None:
    """``None`` for one schedule (checked callable); the parsed rules for per-layer schedules
    ``[(regex, schedule | None), ...]``."""
    if schedule is None:
        return None
    if not jtree.is_rules(schedule):
        if not callable(schedule):
            raise TypeError(
                "prune: schedule must be a function step -> sparsity or per-layer rules "
                f"[(regex, schedule | None), ...], got {type(schedule).__name__}"
            )
        return None

    def check(i: int, regex: str, value: Any) -> Any:
        if value is not None and not callable(value):
            raise TypeError(
                f"prune: rule {i} ({regex!r}) must give a schedule (step -> sparsity) or None, "
                f"got {type(value).__name__}; e.g. ({regex!r}, polynomial_schedule(0.9, ...))"
            )
        return value

    check_rule_structure(structure, scope, what="prune", rules_of="schedule", one="schedule")
    rules = jtree.parse_rules(schedule, check=check, kind="schedule | None")
    if all(r.value is None for r in rules):
        raise ValueError("prune: every schedule rule is None (dense); nothing to prune")
    return rules
