"""Small models used by ``jcompress demo``, the examples and the tests."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """A ReLU MLP; ``MLP((300, 100, 10))`` on 64 inputs is LeNet-300-100 for digits.

    Parameters are ``Dense_i/kernel (in, out)`` and ``Dense_i/bias (out,)``.
    """

    features: Sequence[int] = (300, 100, 10)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, f in enumerate(self.features):
            x = nn.Dense(f, name=f"Dense_{i}")(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class CNN(nn.Module):
    """A small CNN for ``(n, 8, 8, 1)`` digits: two 3x3 convs, flatten, two Dense layers."""

    channels: Sequence[int] = (16, 32)
    hidden: int = 64
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, c in enumerate(self.channels):
            x = nn.relu(nn.Conv(c, (3, 3), name=f"Conv_{i}")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, name="Dense_0")(x))
        return nn.Dense(self.classes, name="Dense_1")(x)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose arg-max equals the label."""
    return jnp.mean(jnp.argmax(logits, -1) == labels)
