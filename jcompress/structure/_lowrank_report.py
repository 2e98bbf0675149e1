"""What a low-rank factorisation saved: ranks, parameters, bytes and FLOPs per layer.

:func:`low_rank_report` compares a tree with ``low_rank``'s result by path; a kernel left dense
is reported with the reason (no saving rank chosen, a conv or gather kernel, stacked axes that
do not lead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from jcompress import tree as jtree
from jcompress.structure._lowrank_leaf import LowRank, factorable

__all__ = ["LayerSavings", "LowRankReport", "low_rank_report"]


@dataclasses.dataclass(frozen=True)
class LayerSavings:
    """One kernel in a :class:`LowRankReport`.

    Attributes:
      path: the leaf's path.
      shape: the kernel's shape.
      rank: the factor rank, or ``None`` when the kernel stayed dense.
      params, params_after: parameter counts before and after.
      nbytes, nbytes_after: stored bytes before and after.
      flops, flops_after: multiply-adds per input row, summed over stacked slices
        (``in·out`` dense, ``r·(in + out)`` factored).
      reason: why the kernel stayed dense (``None`` when factored).
    """

    path: str
    shape: tuple[int, ...]
    rank: int | None
    params: int
    params_after: int
    nbytes: int
    nbytes_after: int
    flops: int
    flops_after: int
    reason: str | None = None


def _total(field: str) -> property:
    return property(
        lambda self: sum(getattr(layer, field) for layer in self.layers),
        doc=f"``{field}`` summed over the layers.",
    )


@dataclasses.dataclass(frozen=True)
class LowRankReport:
    """Per-layer ranks and savings of a :func:`low_rank` result, with totals.

    Attributes:
      layers: one :class:`LayerSavings` per selected or factored kernel, in tree order.
    """

    layers: tuple[LayerSavings, ...]

    params = _total("params")
    params_after = _total("params_after")
    nbytes = _total("nbytes")
    nbytes_after = _total("nbytes_after")
    flops = _total("flops")
    flops_after = _total("flops_after")

    @property
    def dense(self) -> dict[str, str]:
        """``{path: reason}`` of the kernels left dense."""
        return {layer.path: layer.reason for layer in self.layers if layer.rank is None}

    def __str__(self) -> str:
        rows = [f"{'path':<36} {'shape':<18} {'rank':>5} {'params':>17} {'MACs/row':>17}"]
        for x in self.layers:
            rank = "-" if x.rank is None else str(x.rank)
            rows.append(
                f"{x.path:<36} {x.shape!s:<18} {rank:>5} {x.params:>8}->{x.params_after:<8} "
                f"{x.flops:>8}->{x.flops_after:<8}"
            )
        rows.append(
            f"{'total':<36} {'':<18} {'':>5} {self.params:>8}->{self.params_after:<8} "
            f"{self.flops:>8}->{self.flops_after:<8}"
        )
        for path, reason in self.dense.items():
            rows.append(f"dense {path}: {reason}")
        return "\n".join(rows)


def low_rank_report(
    params: jtree.Params,
    factored: jtree.Params,
    *,
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
) -> LowRankReport:
    """Ranks, parameter/byte/FLOP savings, and why kernels stayed dense, per layer.

    Compares ``params`` with ``factored = low_rank(params, ...)`` by path. Rows cover every
    :class:`LowRank` leaf of ``factored`` and every kernel the same ``where``/``roles`` select
    (pass those given to :func:`low_rank`). A selected matmul kernel left dense is reported with
    the largest rank that would have saved (``r·(in + out) < in·out``): ``low_rank`` leaves a
    kernel dense only when the rank asked for (or reached by ``energy=``) was not below it, or
    when a ``None`` / no rank rule applied.

    Args:
      params: the original tree.
      factored: the result of :func:`low_rank` on it.
      where: the selection given to :func:`low_rank`.
      roles: the roles given to :func:`low_rank`.

    Returns:
      A :class:`LowRankReport` (``str()`` gives a table).

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.structure import low_rank
    >>> params = {"a": {"kernel": jnp.ones((64, 32))}, "b": {"kernel": jnp.ones((4, 4))}}
    >>> rep = low_rank_report(params, low_rank(params, rank=8))
    >>> [(x.path, x.rank, x.params, x.params_after) for x in rep.layers]
    [('a/kernel', 8, 2048, 768), ('b/kernel', None, 16, 16)]
    >>> rep.dense["b/kernel"]
    'no saving rank was chosen: a rank r saves only if r < 2.0 = in·out/(in + out) (in=4, out=4)'
    """
    chosen = jtree.selection(
        params, where, roles=roles, kinds=("matmul",), what="low_rank_report", allow_empty=True
    )
    after = jtree.match_by_path(params, factored, name="factored")
    layers = []
    for path, leaf in chosen.pairs:
        new = after[path]
        if path not in chosen and not isinstance(new, LowRank):
            continue
        shape = tuple(np.shape(leaf))
        size = math.prod(shape)
        nbytes = size * np.dtype(leaf.dtype).itemsize
        if isinstance(new, LowRank):
            slices = math.prod(new.a.shape[:-2])
            k, n = new.a.shape[-2], new.b.shape[-1]
            layers.append(
                LayerSavings(
                    path,
                    shape,
                    new.rank,
                    size,
                    slices * new.rank * (k + n),
                    nbytes,
                    new.nbytes,
                    slices * k * n,
                    slices * new.rank * (k + n),
                )
            )
            continue
        matrices, reason = factorable(path, chosen.roles[path], shape)
        if matrices is not None:
            _, k, n = matrices.dims
            reason = (
                f"no saving rank was chosen: a rank r saves only if r < {k * n / (k + n):.1f} "
                f"= in·out/(in + out) (in={k}, out={n})"
            )
        layers.append(
            LayerSavings(path, shape, None, size, size, nbytes, nbytes, size, size, reason)
        )
    return LowRankReport(tuple(layers))
