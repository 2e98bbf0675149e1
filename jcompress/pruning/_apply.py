"""Applying masks and measuring sparsity.

``apply_masks`` is ``jnp.where(mask, p, 0)`` per leaf (never ``mask * p``: strict promotion
forbids ``bool * bfloat16``); ``sparsity`` counts zeros over the selected leaves (a compressed
leaf counts the zeros of its dequantized value).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.pruning._masks import Masks
from jcompress.tree import Params, Role, Where

__all__ = ["apply_masks", "sparsity"]


def apply_masks(params: Params, masks: Masks) -> Params:
    """``jnp.where(mask, p, 0)`` per leaf, matched by path; dtypes and nnx Variables kept.

    Never ``mask * p`` (strict promotion forbids ``bool * bfloat16``). A ``True`` mask leaves the
    leaf as it is.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([1.0, 2.0], jnp.bfloat16), "bias": jnp.ones(2)}
    >>> out = apply_masks(params, {"kernel": jnp.array([True, False]), "bias": True})
    >>> out["kernel"].tolist(), out["kernel"].dtype
    ([1.0, 0.0], dtype(bfloat16))
    """

    def one(path, leaf, mask):
        if isinstance(mask, bool | np.bool_) and mask:
            return leaf
        if jtree.is_compressed(leaf):
            raise TypeError(
                f"{path}: cannot apply a mask to a compressed leaf ({type(leaf).__name__}); "
                "apply masks before quantizing"
            )
        mask = jnp.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(f"{path}: masks must be bool, got {mask.dtype}")
        leaf = jnp.asarray(leaf)
        try:
            shape = np.broadcast_shapes(mask.shape, leaf.shape)
        except ValueError:
            shape = None
        if shape != leaf.shape:
            raise ValueError(
                f"{path}: a mask of shape {mask.shape} does not broadcast to the leaf's shape "
                f"{leaf.shape}; build masks from the same parameter tree"
            )
        return jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))

    return jtree.map_with_paths(one, params, masks, names=["masks"])


def sparsity(
    params: Params,
    *,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> float | jax.Array:
    """Fraction of zeros over the selected leaves (default: matmul/conv/gather kernels).

    A compressed leaf counts the zeros of ``leaf.dequantize()`` (for a ``QArray``: values equal
    to the zero point). Returns a Python float for concrete params, a float32 array inside
    ``jit``.

    >>> import jax.numpy as jnp
    >>> kernel = jnp.array([[0.0, 1.0], [-0.0, 2.0]])
    >>> sparsity({"Dense_0": {"kernel": kernel, "bias": jnp.zeros(2)}})
    0.5
    """
    chosen = jtree.selection(params, where, roles=roles, what="sparsity")
    zeros, total = [], 0
    for value in chosen.values().values():
        zeros.append(jnp.sum(value == 0, dtype=jnp.int32))
        total += int(np.prod(value.shape, dtype=np.int64))
    if total == 0:
        return 0.0
    if all(jtree.is_concrete(z) for z in zeros):
        return sum(int(z) for z in zeros) / total
    return sum(z.astype(jnp.float32) for z in zeros) / jnp.float32(total)
