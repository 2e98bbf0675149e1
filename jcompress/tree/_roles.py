"""Roles: what a leaf *is* (``matmul``, ``conv``, ``gather``, ``other``) decides its axes.

``jc.roles(fn, params, *args)`` (the runtime) infers a :class:`Role` for every leaf from the
function's jaxpr; without it, :func:`default_role` assumes Flax's layouts from the leaf's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["KINDS", "WEIGHT_KINDS", "Role", "default_role"]

KINDS = ("matmul", "conv", "gather", "other")
WEIGHT_KINDS = ("matmul", "conv", "gather")


def _axes(value: Any, field: str) -> tuple[int, ...]:
    if isinstance(value, int | np.integer):
        value = (value,)
    try:
        axes = tuple(int(a) for a in value)
    except TypeError:
        raise TypeError(f"Role.{field} must be a tuple of ints, got {value!r}") from None
    if len(set(axes)) != len(axes):
        raise ValueError(f"Role.{field} has repeated axes: {axes}")
    return axes


@dataclasses.dataclass(frozen=True)
class Role:
    """What a parameter leaf is, and what its axes mean.

    Attributes:
      kind: ``"matmul"``, ``"conv"``, ``"gather"`` (an embedding table) or ``"other"``.
      contracting: axes summed over when the leaf is used (Dense ``(in, out)``: ``(0,)``; Conv
        ``(kh, kw, in, out)``: ``(0, 1, 2)``; a gathered table ``(vocab, features)``: ``(1,)``).
      output: axes that index output channels (Dense: ``(1,)``; attention ``DenseGeneral``
        ``(features, heads, head_dim)``: ``(1, 2)``; a gathered table: the row axis ``(0,)``).
      stacked: leading axes of scanned / vmapped layers; each slice is a separate layer.

    Axes are non-negative. Where an axis must be one axis (N:M groups, quantization groups) it is
    the last contracting axis, :attr:`group_axis`.

    >>> Role("matmul", contracting=(0,), output=(1,)).group_axis
    0
    """

    kind: str
    contracting: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    stacked: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Role.kind must be one of {KINDS}, got {self.kind!r}")
        for f in ("contracting", "output", "stacked"):
            axes = _axes(getattr(self, f), f)
            if any(a < 0 for a in axes):
                raise ValueError(f"Role.{f} axes must be non-negative, got {axes}")
            object.__setattr__(self, f, axes)
        sets = [set(self.contracting), set(self.output), set(self.stacked)]
        if (sets[0] & sets[1]) or (sets[0] & sets[2]) or (sets[1] & sets[2]):
            raise ValueError(
                f"Role axes overlap: contracting={self.contracting}, output={self.output}, "
                f"stacked={self.stacked}; each axis has at most one meaning"
            )
        if self.kind != "other" and (not self.contracting or not self.output):
            raise ValueError(
                f"a {self.kind!r} role needs contracting and output axes, got "
                f"contracting={self.contracting}, output={self.output}"
            )

    @property
    def group_axis(self) -> int:
        """The last contracting axis: N:M groups and quantization groups run along it."""
        if not self.contracting:
            raise ValueError(f"a {self.kind!r} role has no contracting axis")
        return self.contracting[-1]

    def check(self, path: str, shape: Sequence[int]) -> Role:
        """Raise if the role does not fit a leaf of ``shape``; returns ``self``."""
        ndim = len(shape)
        axes = self.contracting + self.output + self.stacked
        if any(a >= ndim for a in axes):
            raise ValueError(
                f"{path}: role {self} names axes beyond the leaf's rank {ndim} (shape "
                f"{tuple(shape)}); fix roles= (jc.roles(fn, params, *args) infers them)"
            )
        return self


def default_role(path: str, leaf: Any) -> Role | None:
    """The role assumed without ``roles=``: Flax's layouts, read from the leaf's name.

    * ``.../kernel`` of rank 2: ``matmul`` ``(in, out)``; rank > 2: ``conv`` with every axis but
      the last contracting (``(kh, kw, in, out)``);
    * ``.../embedding`` of rank 2: ``gather`` ``(vocab, features)``, rows as output channels;
    * anything else: ``None`` (not selected by default).

    Other layouts (attention ``DenseGeneral``, ``nn.scan`` stacks, Equinox ``(out, in)``) need
    ``roles=`` from :func:`jcompress.roles` or written by hand.

    >>> import jax.numpy as jnp
    >>> default_role("Dense_0/kernel", jnp.zeros((3, 4)))
    Role(kind='matmul', contracting=(0,), output=(1,), stacked=())
    """
    name = path.rsplit("/", 1)[-1]
    ndim = len(getattr(leaf, "shape", ()))
    if name == "kernel" and ndim >= 2:
        kind = "matmul" if ndim == 2 else "conv"
        return Role(kind, contracting=tuple(range(ndim - 1)), output=(ndim - 1,))
    if name == "embedding" and ndim == 2:
        return Role("gather", contracting=(1,), output=(0,))
    return None
