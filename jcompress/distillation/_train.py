"""``make_train_step``: one jitted distillation step around any optax optimizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jcompress.tree import Params

__all__ = ["make_train_step"]

Step = Callable[..., tuple[Params, optax.OptState, jax.Array, dict[str, Any]]]


def make_train_step(
    loss_fn: Callable[..., tuple[jax.Array, dict[str, Any]]],
    optimizer: optax.GradientTransformation,
    *,
    static_argnames: Sequence[str] = (),
    donate: bool = False,
) -> Step:
    """A jitted training step: gradient of ``loss_fn`` wrt the student, one optimizer update.

    ``step(params, opt_state, teacher_params, inputs, labels=None, **kwargs)`` returns
    ``(params, opt_state, loss, aux)``; ``kwargs`` (``teacher_logits=``, ``where=``, and the
    student's own keywords such as ``rngs=`` or ``batch_stats=``) go to ``loss_fn``. It is the
    three lines of the plain optax loop, jitted once::

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, teacher_params, inputs, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

    ``params`` reach the optimizer's ``update`` (needed by ``jc.pruning.prune``, weight decay),
    so a pruning optimizer keeps its masks while the student learns from the teacher, and a
    student whose forward pass calls ``jc.quantization.fake_quantize`` trains quantization-aware
    in the same step.

    Args:
      loss_fn: ``loss_fn(params, teacher_params, inputs, labels, **kwargs) -> (loss, aux)``, as
        returned by :func:`distillation_loss` (any function of that signature works).
      optimizer: any optax ``GradientTransformation`` (``GradientTransformationExtraArgs``
        included).
      static_argnames: keyword arguments of the student that are Python values deciding the
        trace (``("train",)`` for a ``train: bool`` flag); they are hashed, not traced.
      donate: donate ``params`` and ``opt_state`` buffers to the update (saves memory; the
        inputs become invalid after the call).

    Returns:
      The jitted step function.

    >>> import jax, jax.numpy as jnp, optax
    >>> from jcompress.distillation import distillation_loss
    >>> linear = lambda w, x: x @ w
    >>> loss_fn = distillation_loss(linear, linear, temperature=2.0, alpha=1.0)
    >>> opt = optax.sgd(0.5)
    >>> step = make_train_step(loss_fn, opt)
    >>> w, teacher = jnp.zeros((3, 2)), jnp.array([[1.0, -1.0]] * 3)
    >>> state, x = opt.init(w), jnp.eye(3)
    >>> for _ in range(100):
    ...     w, state, loss, aux = step(w, state, teacher, x)
    >>> float(loss) < 1e-3
    True
    """

    def step(params, opt_state, teacher_params, inputs, labels=None, **kwargs):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, teacher_params, inputs, labels, **kwargs
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, aux

    return jax.jit(
        step, static_argnames=tuple(static_argnames), donate_argnums=(0, 1) if donate else ()
    )
