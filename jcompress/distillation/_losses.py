"""Logit distillation losses: ``kd_loss`` and ``soft_cross_entropy``.

Conventions follow ``optax.losses``: a loss maps logits of shape ``(*leading, classes)`` to a
per-example loss of shape ``leading`` (batch, or batch and sequence); reduce it yourself. The
``where=`` mask selects positions over the leading axes (``False`` positions give exactly 0 and
no gradient, whatever their logits hold).

Both losses compute in float32 (float64 when an input is float64), so bfloat16 student logits
against a float32 teacher are fine, also under strict dtype promotion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcompress.tree import is_concrete

__all__ = ["kd_loss", "soft_cross_entropy"]


# ----------------------------------------------------------------------------------------------
# Shared checks (used by every loss of this subpackage)
# ----------------------------------------------------------------------------------------------


def check_temperature(temperature: ArrayLike) -> None:
    """Raise ``ValueError`` for a concrete temperature that is not a finite number > 0."""
    if not is_concrete(temperature):
        return
    value = np.asarray(temperature)
    if value.ndim != 0 or not np.isfinite(value) or not value > 0:
        raise ValueError(
            f"temperature must be a finite scalar > 0, got {temperature!r}; Hinton et al. use "
            "values from 1 to 20 (higher softens the teacher's distribution)"
        )


def compute_dtype(*arrays: jax.Array) -> np.dtype:
    """float64 if any input is float64, else float32 (bfloat16/float16 are upcast)."""
    return np.dtype(jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32)


def as_float(x: ArrayLike, name: str) -> jax.Array:
    """``x`` as a floating JAX array; a ``TypeError`` naming ``name`` otherwise."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x


def leading_mask(where: ArrayLike | None, leading: tuple[int, ...]) -> jax.Array | None:
    """``where`` as a bool array of shape ``leading`` (``None`` stays ``None``).

    ``where`` has a prefix of the leading shape, aligned from the left: a ``(batch,)`` mask on
    ``(batch, seq, classes)`` logits masks whole sequences.
    """
    if where is None:
        return None
    where = jnp.asarray(where)
    shape = tuple(where.shape)
    if len(shape) > len(leading) or any(w not in (1, n) for w, n in zip(shape, leading)):
        raise ValueError(
            f"where= has shape {shape}, but it masks the leading axes {leading} of the inputs "
            "(every axis but the last), aligned from the left; pass a bool array of shape "
            f"{leading} or a prefix of it"
        )
    where = where.astype(bool).reshape(shape + (1,) * (len(leading) - len(shape)))
    return jnp.broadcast_to(where, leading)


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over the positions where ``mask`` is True (0 if none is)."""
    if mask is None:
        return jnp.mean(values)
    count = jnp.sum(mask, dtype=values.dtype)
    total = jnp.sum(jnp.where(mask, values, jnp.zeros((), values.dtype)))
    return total / jnp.maximum(count, jnp.ones((), values.dtype))


def _check_values(x: jax.Array, mask: jax.Array | None, name: str, *, probs: bool) -> None:
    """Eager value check of the unmasked rows (concrete inputs only).

    Logits: no NaN and no +Inf (-Inf means probability 0). Probabilities: finite and >= 0.
    """
    if not is_concrete(x) or (mask is not None and not is_concrete(mask)):
        return
    v = np.asarray(x, np.float64)
    bad = ~np.isfinite(v) | (v < 0) if probs else np.isnan(v) | (v == np.inf)
    if mask is not None:
        bad &= np.asarray(mask)[..., None]
    if bad.any():
        raise ValueError(
            f"{name} holds {int(bad.sum())} NaN/Inf value(s) (first at index "
            f"{tuple(int(i) for i in np.argwhere(bad)[0])}); "
            + (
                "they must be probabilities: for logits use kd_loss, or pass "
                "jax.nn.softmax(teacher_logits / T)"
                if probs
                else "fix the model that produced them (-Inf means probability 0 and is allowed)"
            )
        )


def _prepare(student_logits, teacher, teacher_name, temperature, where):
    s = as_float(student_logits, "student_logits")
    t = as_float(teacher, teacher_name)
    probs = teacher_name == "teacher_probs"
    if s.shape != t.shape or s.ndim == 0:
        raise ValueError(
            f"student_logits has shape {s.shape} but {teacher_name} has shape {t.shape}; "
            "they must be equal, of shape (*leading, classes)"
        )
    check_temperature(temperature)
    dtype = compute_dtype(s, t)
    s, t = s.astype(dtype), t.astype(dtype)
    mask = leading_mask(where, s.shape[:-1])
    _check_values(s, mask, "student_logits", probs=False)
    _check_values(t, mask, teacher_name, probs=probs)
    if mask is not None:
        # Replace masked rows before any arithmetic so that NaN/Inf there cannot reach the
        # gradient (the double-where trick).
        zero = jnp.zeros((), dtype)
        s = jnp.where(mask[..., None], s, zero)
        t = jnp.where(mask[..., None], t, zero)
    temperature = jnp.asarray(temperature, dtype)
    return s, t, temperature, mask


def _finish(loss, temperature, mask):
    loss = loss * temperature * temperature
    if mask is not None:
        loss = jnp.where(mask, loss, jnp.zeros((), loss.dtype))
    return loss


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Knowledge-distillation loss: :math:`T^2\,\mathrm{KL}(p_t \,\|\, p_s)` over the last axis.

    With :math:`p_t = \mathrm{softmax}(t/T)` and :math:`p_s = \mathrm{softmax}(s/T)`, the loss
    is :math:`T^2 \sum_k p_{t,k} (\log p_{t,k} - \log p_{s,k})` (Hinton, Vinyals & Dean 2015).
    The factor :math:`T^2` keeps the gradient's scale independent of the temperature, so the
    loss mixes with a hard-label loss at a fixed weight. It is the soft cross-entropy of
    Hinton et al. minus the teacher's entropy (a constant), so it is 0 when the logits agree.

    Computed with log-softmax (finite for logits of any magnitude representable after the
    division by ``T``); a teacher logit of ``-inf`` (probability 0) is allowed and contributes
    nothing. Rounding can make the KL a hair negative when the distributions agree; it is
    clamped at 0.

    Args:
      student_logits: ``(*leading, classes)`` unnormalised log-probabilities of the student.
      teacher_logits: the teacher's, same shape (they carry gradient here; ``distillation_loss``
        stops it).
      temperature: ``T > 0``; a scalar (may be traced, e.g. annealed).
      where: optional bool mask over the leading axes (shape ``leading`` or a prefix of it,
        aligned from the left); ``False`` positions give 0 and no gradient.

    Returns:
      ``(*leading,)`` per-example losses, float32 (float64 for float64 inputs).

    Raises:
      ValueError: different shapes (both named), ``temperature <= 0``, a ``where`` that does not
        fit the leading axes, or (for concrete inputs) NaN/+Inf logits.
      TypeError: non-floating logits.

    References:
      Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015,
      https://arxiv.org/abs/1503.02531

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    >>> t = jnp.array([[1.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    >>> kd_loss(s, t, temperature=2.0).round(4)
    Array([0.4095, 0.    ], dtype=float32)
    >>> kd_loss(s, t, temperature=2.0, where=jnp.array([False, True]))
    Array([0., 0.], dtype=float32)
    """
    s, t, temperature, mask = _prepare(
        student_logits, teacher_logits, "teacher_logits", temperature, where
    )
    log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
    pt = jnp.exp(log_pt)
    zero = jnp.zeros((), s.dtype)
    live = pt > 0
    terms = jnp.where(live, pt * (jnp.where(live, log_pt, zero) - log_ps), zero)
    kl = jnp.maximum(jnp.sum(terms, axis=-1), zero)
    return _finish(kl, temperature, mask)


def soft_cross_entropy(
    student_logits: ArrayLike,
    teacher_probs: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Cross-entropy against the teacher's probabilities: :math:`-T^2 \sum_k q_k \log p_{s,k}`.

    ``teacher_probs`` are the soft targets :math:`q` as given (already softened at temperature
    ``T`` if that is what you want, e.g. stored from an earlier teacher run); the student is
    softened here, :math:`p_s = \mathrm{softmax}(s/T)`. This is the objective of Hinton et al.
    2015; it equals :func:`kd_loss` plus the entropy of :math:`q`, so it has the same gradient
    but is not 0 at the optimum.

    Args:
      student_logits: ``(*leading, classes)``.
      teacher_probs: ``(*leading, classes)`` non-negative, each row summing to 1.
      temperature: ``T > 0``.
      where: optional bool mask over the leading axes (see :func:`kd_loss`).

    Returns:
      ``(*leading,)`` per-example losses, float32 (float64 for float64 inputs).

    Raises:
      ValueError: as :func:`kd_loss`, and (concrete inputs) negative or non-finite probabilities.
      TypeError: non-floating inputs.

    References:
      Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015,
      https://arxiv.org/abs/1503.02531

    >>> import jax.numpy as jnp
    >>> soft_cross_entropy(jnp.zeros((1, 4)), jnp.full((1, 4), 0.25)).round(4)  # log 4
    Array([1.3863], dtype=float32)
    """
    s, q, temperature, mask = _prepare(
        student_logits, teacher_probs, "teacher_probs", temperature, where
    )
    log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
    zero = jnp.zeros((), s.dtype)
    ce = -jnp.sum(jnp.where(q > 0, q * log_ps, zero), axis=-1)
    return _finish(ce, temperature, mask)
