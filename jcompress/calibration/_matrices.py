"""Any matmul/conv leaf as a stack of ``(in, out)`` matrices, and its Hessians.

Calibrated methods work on ``(in, out)`` matrices (Flax orientation: rows are the contracting
axis). :class:`LeafMatrices` brings a leaf of any layout there by its role: stacked axes
(``nn.scan`` layers, each slice its own problem) first, contracting axes flattened in leaf order
(the channel order of ``jc.capture``'s ``InputStats``), output axes flattened; and back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jcompress.calibration._second_order import hessian
from jcompress.tree import Role

__all__ = ["LeafMatrices", "per_slice"]


@dataclasses.dataclass(frozen=True)
class LeafMatrices:
    """A leaf seen as ``(S, C, O)``: stacked slices of ``(in, out)`` matrices.

    ``S``: the stacked axes' sizes multiplied; ``C``: the contracting axes, in leaf order,
    flattened (the channel order of ``InputStats``); ``O``: the output axes flattened.
    """

    path: str
    shape: tuple[int, ...]
    stacked: tuple[int, ...]
    contracting: tuple[int, ...]
    output: tuple[int, ...]

    @classmethod
    def of(cls, path: str, shape: Sequence[int], role: Role) -> LeafMatrices:
        shape = tuple(int(d) for d in shape)
        axes = (*role.stacked, *sorted(role.contracting), *sorted(role.output))
        # "gather": a tied embedding, also consumed by a product (its statistics come from there)
        if role.kind not in ("matmul", "conv", "gather") or sorted(axes) != list(range(len(shape))):
            raise ValueError(
                f"{path}: calibrated compression needs a matmul/conv leaf whose every axis is "
                f"stacked, contracting or output; got role {role} for shape {shape}; pass "
                "roles= (jc.roles) or exclude it with where="
            )
        if role.contracting and max(role.contracting) != role.group_axis:
            raise ValueError(
                f"{path}: the last contracting axis (groups, N:M) must be the highest contracting "
                f"axis, got role {role}; pass roles= with contracting axes in leaf order"
            )
        return cls(
            path,
            shape,
            tuple(role.stacked),
            tuple(sorted(role.contracting)),
            tuple(sorted(role.output)),
        )

    @property
    def perm(self) -> tuple[int, ...]:
        return (*self.stacked, *self.contracting, *self.output)

    def sizes(self, axes: tuple[int, ...]) -> list[int]:
        return [self.shape[a] for a in axes]

    @property
    def dims(self) -> tuple[int, int, int]:
        return tuple(
            math.prod(self.sizes(a)) for a in (self.stacked, self.contracting, self.output)
        )

    def to_matrices(self, x: ArrayLike) -> jax.Array:
        """``x`` of the leaf's shape as ``(S, C, O)``."""
        return jnp.transpose(jnp.asarray(x), self.perm).reshape(self.dims)

    def from_matrices(self, m: jax.Array, group: int | None = None) -> jax.Array:
        """Back to the leaf's axes. ``m`` is ``(S, C, O)``, or blocks ``(S, C', 1 | O)``
        (scales): ``C' == C / group`` (``PerGroup``: groups of ``group`` consecutive entries of
        the last contracting axis) or ``C' == 1`` (every contracting axis shared)."""
        c = self.sizes(self.contracting)
        o = self.sizes(self.output)
        if m.shape[1] != math.prod(c):
            if group is not None and m.shape[1] * group == math.prod(c):
                c[-1] //= group
            else:
                c = [1] * len(c)
        if m.shape[2] != math.prod(o):
            o = [1] * len(o)
        y = m.reshape(*self.sizes(self.stacked), *c, *o)
        return jnp.transpose(y, tuple(np.argsort(self.perm)))

    def check_gram(self, stats: Any) -> None:
        """Raise ``ValueError`` naming the path unless ``stats`` hold this leaf's Gram matrix."""
        s, c, _ = self.dims
        gram = getattr(stats, "gram", None)
        if gram is None:
            raise ValueError(
                f"{self.path}: the input statistics hold no Gram matrix; capture them with "
                "jc.capture(fn, params, *batch, gram=True) from the same fn and params"
            )
        if math.prod(np.shape(gram)) != s * c * c:
            expected = (*self.sizes(self.stacked), c, c)
            raise ValueError(
                f"{self.path}: fn feeds this leaf {np.shape(gram)[-1]} input channels (its Gram "
                f"matrix has shape {tuple(np.shape(gram))}, expected {expected}), but its "
                f"role contracts axes {self.contracting} of shape {self.shape} ({c} channels): "
                "the role does not describe how fn uses the leaf (a non-Flax layout, such as "
                "a kernel stored (out, in)?); pass roles=jc.roles(fn, params, *args)"
            )

    def hessians(self, stats: Any) -> jax.Array:
        """``(S, C, C)`` Hessians ``2 XᵀX / n`` from ``InputStats`` of this leaf."""
        self.check_gram(stats)
        s, c, _ = self.dims
        gram = stats.gram
        count = jnp.broadcast_to(jnp.asarray(stats.count), np.shape(gram)[:-2]).reshape(s)
        return jax.vmap(hessian)(jnp.reshape(gram, (s, c, c)), count)


def per_slice(layer: Callable[..., Any], lay: LeafMatrices, leaf: Any, stats: Any, *extra: Any):
    """``layer(w, h, *extra_slice)`` on every stacked slice of a leaf (``lax.map``; traceable).

    ``w`` is the slice's ``(C, O)`` matrix, ``h`` its ``(C, C)`` Hessian from ``stats``, and
    each of ``extra`` an ``(S, ...)`` array sliced alongside. Outputs gain a leading ``S`` axis.
    Jitted with ``lay`` static, one leaf is one compiled program, shared by every leaf of the
    same shape and layout.
    """
    w3, h3 = lay.to_matrices(leaf), lay.hessians(stats)
    return lax.map(lambda a: layer(*a), (w3, h3, *extra))
