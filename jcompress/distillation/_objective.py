"""``distillation_loss``: the student's training objective, teacher(s) as explicit arguments."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from jcompress.distillation._losses import (
    as_float,
    check_temperature,
    compute_dtype,
    kd_loss,
    leading_mask,
    masked_mean,
)
from jcompress.tree import Params, is_concrete

__all__ = ["distillation_loss"]

LossFn = Callable[..., tuple[jax.Array, dict[str, Any]]]


def _check_alpha(alpha: Any) -> float:
    if not is_concrete(alpha) or np.ndim(alpha) != 0:
        raise TypeError(f"alpha must be a Python or NumPy scalar in [0, 1], got {alpha!r}")
    value = float(alpha)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (the weight of the distillation term; 1 - alpha weighs the "
            f"hard-label loss), got {alpha!r}"
        )
    return value


def _normalise_weights(weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0 / count,) * count
    weights = tuple(float(w) for w in weights)
    if len(weights) != count:
        raise ValueError(f"teacher_weights has {len(weights)} entries for {count} teacher(s)")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"teacher_weights must be finite, >= 0 and not all 0, got {weights}; they are "
            "normalised to sum to 1"
        )
    total = sum(weights)
    return tuple(w / total for w in weights)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Objective:
    """The loss function returned by :func:`distillation_loss` (a frozen, hashable callable)."""

    student_fn: Callable[..., Any]
    teacher_fns: tuple[Callable[..., Any], ...]
    temperature: float
    alpha: float
    hard_loss: Callable[..., jax.Array]
    has_aux: bool
    teacher_weights: tuple[float, ...]
    multi: bool

    def _teachers(self, teacher_params, inputs, teacher_logits):
        n = len(self.teacher_fns)
        if teacher_logits is not None:
            given = list(teacher_logits) if self.multi else [teacher_logits]
            if len(given) != n:
                raise ValueError(
                    f"teacher_logits has {len(given)} entries for {n} teachers; pass one "
                    "array per teacher_fn, in order"
                )
            return [jax.lax.stop_gradient(t) for t in given]
        if self.teacher_fns == (None,):
            raise ValueError(
                "this loss was built with teacher_fn=None, so every call needs teacher_logits="
            )
        params = list(teacher_params) if self.multi else [teacher_params]
        if self.multi and not isinstance(teacher_params, (list, tuple)):
            raise TypeError(
                f"distillation_loss was built with {n} teacher_fns, so teacher_params must be a "
                f"list or tuple of {n} parameter trees, got {type(teacher_params).__name__}"
            )
        if len(params) != n:
            raise ValueError(
                f"teacher_params has {len(params)} entries for {n} teacher_fns; pass them in "
                "the same order"
            )
        # stop_gradient on the parameters too: no gradient reaches the teacher, and XLA drops
        # its backward pass entirely.
        return [
            jax.lax.stop_gradient(fn(jax.lax.stop_gradient(p), inputs))
            for fn, p in zip(self.teacher_fns, params)
        ]

    def __call__(
        self,
        student_params: Params,
        teacher_params: Params | Sequence[Params] | None,
        inputs: Any,
        labels: ArrayLike | None = None,
        *,
        teacher_logits: ArrayLike | Sequence[ArrayLike] | None = None,
        where: ArrayLike | None = None,
        **student_kwargs: Any,
    ) -> tuple[jax.Array, dict[str, Any]]:
        if labels is None and self.alpha != 1.0:
            raise ValueError(
                f"labels=None is pure distillation (a transfer set without labels) and needs "
                f"alpha=1, but this loss has alpha={self.alpha}; pass labels or build the loss "
                "with alpha=1.0"
            )
        out = self.student_fn(student_params, inputs, **student_kwargs)
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "has_aux=True: student_fn must return (logits, new_state), got "
                    f"{type(out).__name__}"
                )
            logits, state = out
        else:
            logits, state = out, None
        logits = as_float(logits, "student logits")
        teachers = self._teachers(teacher_params, inputs, teacher_logits)
        mask = leading_mask(where, logits.shape[:-1])

        kd_terms = []
        for i, t in enumerate(teachers):
            try:
                per_example = kd_loss(logits, t, temperature=self.temperature, where=mask)
            except ValueError as e:
                who = f"teacher {i}" if self.multi else "teacher"
                raise ValueError(f"{who}: {e}") from e
            kd_terms.append(masked_mean(per_example, mask))
        kd = sum(w * k for w, k in zip(self.teacher_weights, kd_terms))
        aux: dict[str, Any] = {"kd": kd, "logits": logits}
        if self.multi:
            aux["kd_per_teacher"] = jnp.stack(kd_terms)

        if labels is not None:
            hard = masked_mean(self._hard(logits, labels, mask), mask)
            aux["hard"] = hard
        if self.alpha == 1.0:
            total = kd
        elif self.alpha == 0.0:
            total = hard
        else:
            total = self.alpha * kd + (1.0 - self.alpha) * hard.astype(kd.dtype)
        aux["loss"] = total
        if self.has_aux:
            aux["state"] = state
        return total, aux

    def _hard(self, logits, labels, mask):
        labels = jnp.asarray(labels)
        logits = logits.astype(compute_dtype(logits))  # bf16 students: the loss in float32
        if mask is not None:
            # Padding labels may be out of range (-1, pad ids): replace them before the loss.
            lmask = mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
            labels = jnp.where(lmask, labels, jnp.zeros((), labels.dtype))
            logits = jnp.where(mask[..., None], logits, jnp.zeros((), logits.dtype))
        per_example = self.hard_loss(logits, labels)
        if per_example.shape != logits.shape[:-1]:
            raise ValueError(
                f"hard_loss returned shape {per_example.shape} for logits {logits.shape}; it "
                f"must return per-example losses of shape {logits.shape[:-1]} (optax.losses "
                "conventions)"
            )
        if mask is not None:
            per_example = jnp.where(mask, per_example, jnp.zeros((), per_example.dtype))
        return per_example


def distillation_loss(
    student_fn: Callable[..., Any],
    teacher_fn: Callable[..., jax.Array] | Sequence[Callable[..., jax.Array]] | None,
    *,
    temperature: float,
    alpha: float,
    hard_loss: Callable[..., jax.Array] = optax.softmax_cross_entropy_with_integer_labels,
    has_aux: bool = False,
    teacher_weights: Sequence[float] | None = None,
) -> LossFn:
    r"""The student's distillation objective, with the teacher(s) as explicit arguments.

    Returns ``loss_fn(student_params, teacher_params, inputs, labels=None, *,
    teacher_logits=None, where=None, **student_kwargs) -> (loss, aux)`` computing

    .. math::
        \text{loss} = \alpha \sum_i w_i\,\overline{KD_i} + (1 - \alpha)\,\overline{\text{hard}}

    where :math:`\text{KD}_i` is :func:`kd_loss` (:math:`T^2`-scaled KL) against teacher ``i``,
    ``hard = hard_loss(student_logits, labels)``, and the bars are means over the unmasked
    examples (Hinton, Vinyals & Dean 2015). ``alpha=1`` computes only the KD term, ``alpha=0``
    only the hard term (both are still reported in ``aux``).

    * The teacher's parameters are an argument of ``loss_fn``, never closed over (closed-over
      arrays become compile-time constants and cannot be sharded). The teacher runs under
      ``jax.lax.stop_gradient``: ``jax.grad`` wrt ``teacher_params`` is zero and XLA skips the
      teacher's backward pass.
    * ``teacher_logits=`` (precomputed, e.g. stored once for a fixed transfer set) skips the
      teacher's forward pass; ``teacher_params`` may then be ``None``.
    * ``labels=None`` is pure distillation on a transfer set and needs ``alpha=1``.
    * ``where=`` masks padded positions (a bool array over the logits' leading axes, or a prefix
      of them) in both terms; the means count unmasked positions only.
    * ``student_kwargs`` go to ``student_fn`` (``rngs={"dropout": key}``, ``train=True``,
      ``batch_stats=...``); the teacher always runs as ``teacher_fn(teacher_params, inputs)``
      (bind inference flags with ``functools.partial``).

    Args:
      student_fn: ``student_fn(student_params, inputs, **student_kwargs) -> logits`` of shape
        ``(*leading, classes)``; with ``has_aux=True`` it returns ``(logits, new_state)`` (e.g.
        linen's ``apply(..., mutable=["batch_stats"])``) and ``new_state`` comes back as
        ``aux["state"]``.
      teacher_fn: ``teacher_fn(teacher_params, inputs) -> logits`` of the student's shape, or a
        list/tuple of them for several teachers (then ``teacher_params`` and ``teacher_logits``
        are lists of the same length, in the same order), or ``None`` when the teacher's logits
        are always given as ``teacher_logits=`` (stored soft targets, no teacher at hand).
      temperature: ``T > 0``, softening both distributions.
      alpha: weight of the distillation term in ``[0, 1]``.
      hard_loss: per-example loss against labels, optax conventions (default: integer labels;
        ``optax.softmax_cross_entropy`` for one-hot / smoothed labels).
      has_aux: whether ``student_fn`` returns ``(logits, new_state)``.
      teacher_weights: non-negative weights of the teachers' KD terms, normalised to sum to 1
        (default: equal weights).

    Returns:
      ``loss_fn`` returning ``(loss, aux)``: ``loss`` a scalar; ``aux`` a dict with ``"loss"``
      (the same scalar), ``"kd"`` (weighted mean KD), ``"hard"`` (mean hard loss; only with
      labels), ``"kd_per_teacher"`` (``(n_teachers,)``; only with a list of teachers),
      ``"logits"`` (the student's) and ``"state"`` (only with ``has_aux=True``). Use it with
      ``jax.value_and_grad(loss_fn, has_aux=True)``, or :func:`make_train_step`.

    Raises:
      ValueError: ``temperature <= 0``, ``alpha`` outside ``[0, 1]``, bad ``teacher_weights``;
        at call time, ``labels=None`` with ``alpha != 1``, mismatched logit shapes (both
        named), or a ``where`` that does not fit.

    References:
      Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015,
      https://arxiv.org/abs/1503.02531

    >>> import jax, jax.numpy as jnp
    >>> linear = lambda w, x: x @ w
    >>> loss_fn = distillation_loss(linear, linear, temperature=2.0, alpha=0.5)
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> w_student, w_teacher = jnp.zeros((3, 2)), jnp.array([[1.0, -1.0]] * 3)
    >>> loss, aux = loss_fn(w_student, w_teacher, x, y)
    >>> sorted(aux)
    ['hard', 'kd', 'logits', 'loss']
    >>> bool(jnp.isclose(loss, 0.5 * aux["kd"] + 0.5 * aux["hard"]))
    True
    >>> g_student, g_teacher = jax.grad(lambda s, t: loss_fn(s, t, x, y)[0], (0, 1))(
    ...     w_student, w_teacher)
    >>> float(jnp.abs(g_teacher).max())
    0.0
    """
    check_temperature(temperature)
    alpha = _check_alpha(alpha)
    multi = isinstance(teacher_fn, (list, tuple))
    teacher_fns = tuple(teacher_fn) if multi else (teacher_fn,)
    if teacher_fn is not None and (not teacher_fns or not all(callable(f) for f in teacher_fns)):
        raise TypeError(
            "teacher_fn must be a callable, a non-empty list/tuple of callables, or None (then "
            "every call passes teacher_logits=)"
        )
    if not callable(student_fn):
        raise TypeError(f"student_fn must be callable, got {type(student_fn).__name__}")
    return _Objective(
        student_fn=student_fn,
        teacher_fns=teacher_fns,
        temperature=float(temperature),
        alpha=alpha,
        hard_loss=hard_loss,
        has_aux=bool(has_aux),
        teacher_weights=_normalise_weights(teacher_weights, len(teacher_fns)),
        multi=multi,
    )
