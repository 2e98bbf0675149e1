"""Per-channel ranking: output channels of each leaf scored by the norm of their scores.

A channel's key is the ``l1``/``l2`` norm of its element scores over the non-output,
non-stacked axes (scaled by the layer's largest score first, so squares neither overflow nor
vanish); with ``scope="global"`` the norms are divided by their layer's mean channel norm, so
layers of different scales compete fairly. Channels coupled across layers by groups are ranked
in :mod:`jcompress.pruning._groups`, with the same norms.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jcompress.pruning._structures import Channels
from jcompress.pruning._threshold import (
    PRUNED_KEY,
    and_previous,
    from_rows,
    keys_of,
    lowest,
    to_rows,
)
from jcompress.tree import Role

__all__ = ["channel_masks", "normalised"]


def _norm(x: jax.Array, axes: tuple[int, ...], norm: str) -> jax.Array:
    if norm == "l1":
        return jnp.sum(x, axis=axes, keepdims=True)
    return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def _scaled(x: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
    """``x / max(x)`` over ``axes`` (all when ``None``), so squares neither overflow nor vanish."""
    top = jnp.max(x, axis=axes, keepdims=axes is not None)
    return x / jnp.where(top > 0, top, jnp.float32(1))


def normalised(norms: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
    """``norms / mean(norms)`` over ``axes``: the global-scope ranking of channels."""
    mean = jnp.mean(norms, axis=axes, keepdims=axes is not None)
    return jnp.where(mean > 0, norms / jnp.where(mean > 0, mean, 1), 0)


@functools.partial(jax.jit, static_argnames=("role", "norm", "normalise"))
def _channel_keys(score, prev, role, norm, normalise):
    """Channel keys of one leaf, ``(B, C)``: norms over the non-output, non-stacked axes."""
    x = jnp.abs(score.astype(jnp.float32))
    inner = tuple(a for a in range(x.ndim) if a not in role.output and a not in role.stacked)
    if prev is not None:
        prev = jnp.broadcast_to(jnp.asarray(prev, bool), x.shape)
        x = jnp.where(prev, x, 0)
    per_layer = tuple(a for a in range(x.ndim) if a not in role.stacked)
    norms = _norm(_scaled(x, per_layer), inner, norm)
    if normalise:
        norms = normalised(norms, tuple(role.output))
    keys = keys_of(norms)
    if prev is not None:
        keys = jnp.where(jnp.any(prev, axis=inner, keepdims=True), keys, PRUNED_KEY)
    return to_rows(keys, role.stacked)[0]


def channel_masks(
    entries: list[Any], sparsity: jax.Array, scope: str, channels: Channels
) -> dict[int, jax.Array]:
    """Channel masks of each leaf on its own (no groups): ``{entry.index: mask}``, masks with
    size-1 axes except the output and stacked axes.

    ``entries``: :class:`jcompress.pruning._masks.Entry` (index, score, role, previous).
    """
    pruned = any(e.previous is not None for e in entries)
    keys, shapes = [], []
    for e in entries:
        role: Role = e.role
        score = e.score.astype(jnp.float32)  # one compilation per shape, whatever the dtype
        keys.append(_channel_keys(score, e.previous, role, channels.norm, scope == "global"))
        kept_shape = tuple(
            d if a in role.output or a in role.stacked else 1 for a, d in enumerate(score.shape)
        )
        shapes.append(kept_shape)
    if scope == "layer":
        keeps = [lowest([k], sparsity, pruned)[0] for k in keys]
    else:
        flat = [k.reshape(1, -1) for k in keys]
        keeps = [m.reshape(k.shape) for m, k in zip(lowest(flat, sparsity, pruned), keys)]
    out = {}
    for e, keep, kept_shape in zip(entries, keeps, shapes):
        layout = to_rows(jnp.zeros(kept_shape, bool), e.role.stacked)[1]
        out[e.index] = and_previous(from_rows(keep, layout), e.previous)
    return out
