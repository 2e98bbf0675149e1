"""Sparsity structures: which weights may be removed together.

* :class:`Unstructured`: any weight, independently.
* :class:`NM`: ``n`` kept in every ``m`` consecutive weights along the last contracting axis
  (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378).
* :class:`Channels`: whole output channels (Li et al., 2017, "Pruning Filters for Efficient
  ConvNets", arXiv:1608.08710), optionally coupled across layers by ``jc.structure`` groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jcompress.tree import Group

__all__ = ["NM", "Channels", "Structure", "Unstructured"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unstructured:
    """Any weight may be pruned on its own (the default structure).

    >>> Unstructured()
    Unstructured()
    """


@dataclasses.dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: keep ``n`` in every ``m`` consecutive weights.

    Groups of ``m`` run along the last contracting axis of each leaf (``Role.group_axis``: the
    ``in`` axis of a Dense ``(in, out)`` kernel), as sparse tensor cores expect. The sparsity is
    ``1 - n / m``.

    Attributes:
      n: weights kept per group, ``1 <= n < m``.
      m: group size.

    >>> NM(n=2, m=4).sparsity
    0.5
    """

    n: int
    m: int

    def __post_init__(self):
        for name in ("n", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"NM.{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"NM.{name} must be positive, got {value}; e.g. NM(n=2, m=4)")
        if self.n >= self.m:
            raise ValueError(
                f"NM(n={self.n}, m={self.m}) keeps every weight: n must be smaller than m "
                "(e.g. NM(n=2, m=4) keeps 2 of every 4)"
            )

    @property
    def sparsity(self) -> float:
        """The fraction of weights removed, ``1 - n / m``."""
        return 1.0 - self.n / self.m


@dataclasses.dataclass(frozen=True, kw_only=True)
class Channels:
    """Whole output channels, scored by the ``norm`` of their weights' scores.

    Attributes:
      norm: ``"l1"`` or ``"l2"``: how the element scores of one channel are combined.
      groups: ``None`` (each selected leaf's output channels on their own) or a sequence of
        :class:`jcompress.tree.Group` from ``jc.structure.dependencies``: then channels are
        removed group-wise and the masks cover every member of the group (bias, norm
        statistics, the next layer's rows). **Which groups are pruned:** a group is pruned only
        through a selected leaf that *owns* it, i.e. holds it on one of its output axes (its
        role's ``output``); a selected leaf that merely reads the group along a contracting
        axis (``up`` reading a residual stream) does not select it, so ``where="up/kernel"``
        prunes ``up``'s outputs and leaves the residual stream whole. **What scores a
        channel:** the norm of its slices in every member that is a selected leaf (the
        owner's output slice, and the input rows of a selected next layer), summed over those
        members; unselected members (biases, norm parameters) are masked but do not score. A
        group's
        channel is its unit (a whole GroupNorm group, a key/value head with its query heads);
        a group with ``blocks > 1`` (a grouped convolution's channels) loses
        ``round(sparsity * size / blocks)`` channels in each block, so every convolution group
        keeps one width (``scope="layer"`` only). The ranking runs as one compiled program per
        model layout (cached).

    >>> Channels(norm="l1")
    Channels(norm='l1', groups=None)
    """

    norm: str = "l2"
    groups: Sequence[Group] | None = None

    def __post_init__(self):
        if self.norm not in ("l1", "l2"):
            raise ValueError(f"Channels.norm must be 'l1' or 'l2', got {self.norm!r}")
        if self.groups is not None:
            if isinstance(self.groups, Group) or not isinstance(self.groups, Sequence):
                raise TypeError(
                    "Channels.groups must be a sequence of jcompress.tree.Group (from "
                    f"jc.structure.dependencies), got {type(self.groups).__name__}"
                )
            groups = tuple(self.groups)
            for g in groups:
                if not isinstance(g, Group):
                    raise TypeError(
                        f"Channels.groups must hold jcompress.tree.Group, got {type(g).__name__}"
                    )
            object.__setattr__(self, "groups", groups)


Structure = Unstructured | NM | Channels
"""One of the structure variants."""
