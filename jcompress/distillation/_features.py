"""Feature (hint) distillation: MSE / cosine between activations, attention transfer.

The losses take activations, not models: arrays ``(*leading, features)``, or for
:func:`feature_loss` trees / flat ``{path: activation}`` dicts of them, named with
:mod:`jcompress.tree` paths. Get activations from Flax with ``capture_intermediates=True`` or
``self.sow(...)`` (paths like ``intermediates/Dense_0/__call__/0``), or any function that
returns them; ``jcompress.runtime.tap(fn, outputs_of=...)`` gets them from an unmodified model.

When the student's width differs from the teacher's, a learned linear *projection* (FitNets'
regressor) maps the student's activation to the teacher's width. Projections are explicit
parameters ``{"kernel": (student_dim, teacher_dim), "bias": (teacher_dim,)}`` created by
:func:`init_projection` / :func:`init_projections`; train them with the student (put them in
the tree the optimizer updates).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jcompress.distillation._losses import as_float, compute_dtype, leading_mask, masked_mean
from jcompress.tree import leaves_with_paths

__all__ = [
    "attention_transfer",
    "feature_cosine",
    "feature_loss",
    "feature_mse",
    "init_projection",
    "init_projections",
    "project",
]

Projection = dict[str, jax.Array]
"""``{"kernel": (student_dim, teacher_dim), "bias": (teacher_dim,)}``."""


def init_projection(
    key: jax.Array, student_dim: int, teacher_dim: int, *, dtype: Any = jnp.float32
) -> Projection:
    """A linear map from the student's feature width to the teacher's (FitNets' regressor).

    The kernel is LeCun-normal (variance ``1 / student_dim``), the bias zero.

    Args:
      key: a ``jax.random`` key.
      student_dim, teacher_dim: widths (the last axis of the activations), >= 1.
      dtype: parameter dtype.

    Returns:
      ``{"kernel": (student_dim, teacher_dim), "bias": (teacher_dim,)}``.

    References:
      Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
      https://arxiv.org/abs/1412.6550

    >>> import jax
    >>> p = init_projection(jax.random.key(0), 16, 64)
    >>> p["kernel"].shape, p["bias"].shape
    ((16, 64), (64,))
    """
    for name, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{name} must be an int >= 1, got {dim!r}")
    kernel = jax.nn.initializers.lecun_normal()(key, (student_dim, teacher_dim), dtype)
    return {"kernel": kernel, "bias": jnp.zeros((teacher_dim,), dtype)}


def project(projection: Projection, x: ArrayLike) -> jax.Array:
    """Apply a projection to ``x: (*leading, student_dim) -> (*leading, teacher_dim)``.

    >>> import jax, jax.numpy as jnp
    >>> project(init_projection(jax.random.key(0), 3, 5), jnp.ones((2, 3))).shape
    (2, 5)
    """
    x = jnp.asarray(x)
    kernel, bias = projection["kernel"], projection["bias"]
    if x.shape[-1:] != kernel.shape[:1]:
        raise ValueError(
            f"projection kernel {kernel.shape} expects activations of width {kernel.shape[0]}, "
            f"got shape {x.shape}; create it with init_projection(key, {x.shape[-1]}, teacher_dim)"
        )
    y = jnp.matmul(x, kernel.astype(x.dtype))
    return y + bias.astype(x.dtype)


def _pair(student, teacher, projection, where):
    s = as_float(student, "student activation")
    t = as_float(teacher, "teacher activation")
    if projection is not None:
        s = project(projection, s)
    if s.shape != t.shape:
        fix = (
            "; the widths differ: pass projection=init_projection(key, "
            f"{s.shape[-1]}, {t.shape[-1]}) and train it with the student"
            if s.shape[:-1] == t.shape[:-1]
            else ""
        )
        raise ValueError(
            f"student activation has shape {s.shape} "
            f"{'(after projection) ' if projection is not None else ''}but the teacher's has "
            f"shape {t.shape}{fix}"
        )
    dtype = compute_dtype(s, t)
    return s.astype(dtype), t.astype(dtype), leading_mask(where, s.shape[:-1])


def _masked(loss, mask):
    return loss if mask is None else jnp.where(mask, loss, jnp.zeros((), loss.dtype))


def feature_mse(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    projection: Projection | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Mean squared error over the feature (last) axis: a FitNets hint loss.

    Args:
      student: ``(*leading, student_dim)`` activations.
      teacher: ``(*leading, teacher_dim)`` activations.
      projection: maps the student to ``teacher_dim`` first (:func:`init_projection`); needed
        when the widths differ.
      where: optional bool mask over the leading axes (a prefix, aligned from the left).

    Returns:
      ``(*leading,)`` losses, float32 (float64 for float64 inputs); 0 where masked.

    References:
      Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
      https://arxiv.org/abs/1412.6550

    >>> import jax.numpy as jnp
    >>> feature_mse(jnp.zeros((2, 4)), jnp.ones((2, 4)))
    Array([1., 1.], dtype=float32)
    """
    s, t, mask = _pair(student, teacher, projection, where)
    return _masked(jnp.mean(jnp.square(s - t), axis=-1), mask)


def feature_cosine(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    projection: Projection | None = None,
    where: ArrayLike | None = None,
    epsilon: float = 1e-8,
) -> jax.Array:
    """Cosine distance ``1 - cos(student, teacher)`` over the feature (last) axis.

    Insensitive to the scale of either activation. A zero vector has cosine 0 with anything
    (distance 1, finite gradient), via ``epsilon`` in the norms.

    Args:
      student: ``(*leading, student_dim)`` activations.
      teacher: ``(*leading, teacher_dim)`` activations.
      projection: as in :func:`feature_mse`.
      where: optional bool mask over the leading axes.
      epsilon: lower bound on each norm.

    Returns:
      ``(*leading,)`` distances in ``[0, 2]``; 0 where masked.

    >>> import jax.numpy as jnp
    >>> feature_cosine(jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([[2.0, 0.0], [-1.0, -1.0]]))
    Array([0., 2.], dtype=float32)
    """
    s, t, mask = _pair(student, teacher, projection, where)
    eps = jnp.asarray(epsilon, s.dtype)

    def unit(x):
        norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))
        return x / norm

    cos = jnp.sum(unit(s) * unit(t), axis=-1)
    return _masked(jnp.ones((), s.dtype) - cos, mask)


def attention_transfer(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    p: int = 2,
    where: ArrayLike | None = None,
    epsilon: float = 1e-8,
) -> jax.Array:
    r"""Activation-based attention transfer (Zagoruyko & Komodakis 2017).

    Each activation ``(batch, *spatial, channels)`` becomes an attention map
    :math:`Q = \sum_c |A_c|^p` over channels, flattened over the spatial axes and normalised
    to unit L2 norm; the loss is the squared L2 distance between the student's and the
    teacher's maps, per example. The channel counts may differ (no projection needed); the
    spatial shapes must agree. (The paper writes the distance as a norm; the squared form,
    as in the authors' code, has a finite gradient when the maps agree.)

    Args:
      student: ``(batch, *spatial, student_channels)`` (NHWC for images; ``(batch, seq,
        features)`` for sequences).
      teacher: ``(batch, *spatial, teacher_channels)``.
      p: the exponent of the map (the paper uses 2).
      where: optional bool mask of shape ``(batch,)``.
      epsilon: lower bound on each map's norm (an all-zero map stays zero).

    Returns:
      ``(batch,)`` losses in ``[0, 4]``; 0 where masked.

    References:
      Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
      Convolutional Neural Networks via Attention Transfer", ICLR 2017,
      https://arxiv.org/abs/1612.03928

    >>> import jax.numpy as jnp
    >>> a = jnp.ones((2, 4, 4, 8))
    >>> attention_transfer(a, 3.0 * jnp.ones((2, 4, 4, 16)))
    Array([0., 0.], dtype=float32)
    """
    s = as_float(student, "student activation")
    t = as_float(teacher, "teacher activation")
    if s.ndim < 2 or s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"attention transfer needs activations (batch, *spatial, channels) with equal batch "
            f"and spatial shapes; got student {s.shape} and teacher {t.shape}"
        )
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"p must be an int >= 1, got {p!r}")
    dtype = compute_dtype(s, t)
    eps = jnp.asarray(epsilon, dtype)
    mask = leading_mask(where, s.shape[:1])

    def attention_map(a):
        q = jnp.sum(jnp.abs(a.astype(dtype)) ** p, axis=-1).reshape(a.shape[0], -1)
        norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(q), axis=-1, keepdims=True), eps * eps))
        return q / norm

    loss = jnp.sum(jnp.square(attention_map(s) - attention_map(t)), axis=-1)
    return _masked(loss, mask)


def _flat(features: Any, name: str) -> dict[str, jax.Array]:
    if not isinstance(features, Mapping):
        raise TypeError(
            f"{name} must be a dict of activations (a tree or {{path: activation}}), got "
            f"{type(features).__name__}; for single arrays call feature_mse/feature_cosine/"
            "attention_transfer directly"
        )
    return dict(leaves_with_paths(features))


def _resolve_pairs(
    pairs: Mapping[str, str] | Sequence[str] | None,
    student: dict[str, jax.Array],
    teacher: dict[str, jax.Array],
) -> list[tuple[str, str]]:
    if pairs is None:
        resolved = [(p, p) for p in teacher]
    elif isinstance(pairs, Mapping):
        resolved = list(pairs.items())
    elif isinstance(pairs, str):
        raise TypeError(f"pairs must be a mapping or a sequence of paths, got the string {pairs!r}")
    else:
        resolved = [(p, p) for p in pairs]
    if not resolved:
        raise ValueError("feature_loss: no pairs of activations to compare")
    for sp, tp in resolved:
        for side, path, acts in (("student", sp, student), ("teacher", tp, teacher)):
            if path not in acts:
                raise ValueError(
                    f"feature path {path!r} is not in the {side}'s activations; available: "
                    f"{sorted(acts)}"
                )
    return resolved


def feature_loss(
    student_features: Mapping[str, Any],
    teacher_features: Mapping[str, Any],
    *,
    pairs: Mapping[str, str] | Sequence[str] | None = None,
    loss: Callable[..., jax.Array] = feature_mse,
    projections: Mapping[str, Projection] | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Sum over pairs of activations of the (masked) mean per-position feature loss.

    Args:
      student_features: the student's activations: a tree (e.g. Flax's ``intermediates``
        collection) or a flat ``{path: activation}`` dict; named by :mod:`jcompress.tree` paths.
      teacher_features: the teacher's, likewise (compute them under ``jax.lax.stop_gradient``).
      pairs: which activations to compare: ``{student_path: teacher_path}``, a sequence of paths
        present in both, or ``None`` for every teacher path (each must be in the student).
      loss: :func:`feature_mse` (default), :func:`feature_cosine`, :func:`attention_transfer`,
        or any ``loss(student, teacher, *, where) -> (*leading,)``.
      projections: ``{student_path: projection}`` (:func:`init_projections`), applied to those
        student activations first; needed where the widths differ (except for attention
        transfer, which compares channel-free maps).
      where: optional bool mask over the leading axes of every pair (e.g. ``(batch,)``).

    Returns:
      A scalar: ``sum over pairs of mean over unmasked positions of loss(student, teacher)``.

    Raises:
      ValueError: a path missing from either side (names it and lists the available ones), a
        projection for a path that is not paired, or mismatched shapes (names the pair).

    References:
      Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    >>> import jax.numpy as jnp
    >>> s = {"intermediates": {"Dense_0": {"__call__": (jnp.zeros((2, 4)),)}}}
    >>> t = {"hidden": jnp.ones((2, 4))}
    >>> feature_loss(s, t, pairs={"intermediates/Dense_0/__call__/0": "hidden"})
    Array(1., dtype=float32)
    """
    student, teacher = (
        _flat(student_features, "student_features"),
        _flat(teacher_features, "teacher_features"),
    )
    resolved = _resolve_pairs(pairs, student, teacher)
    projections = dict(projections or {})
    unknown = sorted(set(projections) - {sp for sp, _ in resolved})
    if unknown:
        raise ValueError(
            f"projections given for {unknown}, which are not paired student paths; paired: "
            f"{sorted(sp for sp, _ in resolved)}"
        )
    total = None
    for sp, tp in resolved:
        kwargs = {"where": where}
        if sp in projections:
            kwargs["projection"] = projections[sp]
        try:
            per_position = loss(student[sp], teacher[tp], **kwargs)
        except ValueError as e:
            raise ValueError(f"feature pair {sp!r} -> {tp!r}: {e}") from e
        mask = leading_mask(where, per_position.shape) if where is not None else None
        term = masked_mean(per_position, mask)
        total = term if total is None else total + term.astype(total.dtype)
    return total


def init_projections(
    key: jax.Array,
    student_features: Mapping[str, Any],
    teacher_features: Mapping[str, Any],
    *,
    pairs: Mapping[str, str] | Sequence[str] | None = None,
    dtype: Any = jnp.float32,
) -> dict[str, Projection]:
    """Projections for every pair whose feature widths differ, keyed by the student path.

    Call it once on example activations (shapes are all it reads); pass the result to
    :func:`feature_loss` and train it with the student.

    Args:
      key: a ``jax.random`` key (split per pair).
      student_features, teacher_features, pairs: as in :func:`feature_loss`.
      dtype: parameter dtype.

    Returns:
      ``{student_path: {"kernel": (student_dim, teacher_dim), "bias": (teacher_dim,)}}``.

    >>> import jax, jax.numpy as jnp
    >>> s, t = {"h": jnp.ones((2, 8))}, {"h": jnp.ones((2, 32))}
    >>> proj = init_projections(jax.random.key(0), s, t)
    >>> jax.tree.map(jnp.shape, proj)
    {'h': {'bias': (32,), 'kernel': (8, 32)}}
    """
    student, teacher = (
        _flat(student_features, "student_features"),
        _flat(teacher_features, "teacher_features"),
    )
    resolved = _resolve_pairs(pairs, student, teacher)
    keys = jax.random.split(key, len(resolved))
    out = {}
    for k, (sp, tp) in zip(keys, resolved):
        ds, dt = int(jnp.shape(student[sp])[-1]), int(jnp.shape(teacher[tp])[-1])
        if ds != dt:
            out[sp] = init_projection(k, ds, dt, dtype=dtype)
    return out
