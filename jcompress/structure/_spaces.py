"""Channel spaces: union-find over the channels that must be pruned together, and their groups.

A *space* is born where a parameter axis becomes an activation axis (a Dense/Conv kernel's
output axis), or where a broadcast makes an axis from nothing (a *free* space: the same value at
every index, so it takes whatever width the channels it meets keep). Spaces tied together form a
set whose *units* (its channels for pruning) may be coarser than a space's channels: a channel
axis reshaped to ``(outer, inner)`` ties each run of ``inner`` channels to one outer index, so the
run is the unit (whole GroupNorm groups, whole attention heads, a key/value head with the query
heads sharing it); merging ``(outer, inner)`` back gives a finer space tied the same way. A
grouped convolution adds *blocks*: its groups must each lose equally many channels. Each set
collects its parameter :class:`~jcompress.tree.Member` s and the reasons it is blocked, and
becomes one :class:`~jcompress.tree.Group`.
"""

from __future__ import annotations

import dataclasses
import math

from jcompress.tree import Group, Member

__all__ = ["Seg", "Spaces"]


@dataclasses.dataclass(frozen=True)
class Seg:
    """Channel ``c`` of ``space`` sits at ``offset + c (+ j * stride)`` along an axis."""

    space: int
    offset: int = 0
    stride: int = 0


class Spaces:
    """Union-find over channel spaces, with members, units, blocks and blocked reasons per root.

    Spaces in one set are *proportional*: channel ``c`` of a space of ``n`` channels belongs to
    unit ``c // (n // units)`` of the set, where ``units`` (the group's size) divides every
    member space's size. Equal-size spaces meeting elementwise are proportional with ratio 1; a
    channel axis split into ``(outer, inner)`` (GroupNorm's groups, heads out of one Dense, GQA's
    ``(kv_heads, rep)``) ties the outer axis's new space to the channels in runs of ``inner``.
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.units: list[int] = []
        self.blocks: list[int] = []
        self.members: list[list[tuple[Member, int, int]]] = []  # (member, space size, layers)
        self.reasons: list[list[str]] = []
        self.fixed: dict[tuple[str, int], str] = {}
        # parameters sliced by a scan's xs: {path: (stacked axis, layers)}; their axis sizes
        self.stacked: dict[str, tuple[int, int]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.scan: list[set[str]] = []  # the stacked paths of the scan bodies being analysed
        self.free: list[bool] = []  # made by broadcasting: the same value at every channel

    def new(self, size: int, *, free: bool = False) -> int:
        self.free.append(free)
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.units.append(size)
        self.blocks.append(1)
        self.members.append([])
        self.reasons.append([])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        """Tie two proportional spaces (equal sizes, or one a coarse view of the other)."""
        ra, rb = sorted((self.find(a), self.find(b)))
        if ra == rb:
            return
        self.parent[rb] = ra
        self.free[ra] = self.free[ra] and self.free[rb]
        self.units[ra] = math.gcd(self.units[ra], self.units[rb])
        self.blocks[ra] = math.lcm(self.blocks[ra], self.blocks[rb])
        self.members[ra] += self.members[rb]
        self.reasons[ra] += self.reasons[rb]
        self.members[rb], self.reasons[rb] = [], []

    def coarse(self, space: int, inner: int) -> int:
        """A new space of ``size // inner`` channels: runs of ``inner`` channels of ``space``."""
        out = self.new(self.size[space] // inner, free=self.free[self.find(space)])
        self.union(space, out)
        return out

    def fine(self, space: int, inner: int) -> int:
        """A new space of ``size * inner`` channels, ``inner`` per channel of ``space``."""
        out = self.new(self.size[space] * inner, free=self.free[self.find(space)])
        self.union(space, out)
        return out

    def constrain(self, space: int, blocks: int) -> None:
        """``space``'s channels fall in ``blocks`` runs that must lose equally many channels."""
        r = self.find(space)
        self.blocks[r] = math.lcm(self.blocks[r], blocks)

    def is_free(self, layout: tuple[Seg, ...]) -> bool:
        """Whether every space of ``layout`` is only a broadcast (no channels of its own)."""
        return all(self.free[self.find(s.space)] for s in layout)

    def add(self, seg: Seg, claim: frozenset, **kw: int) -> None:
        r = self.find(seg.space)
        self.free[r] = False  # parameter axes meeting it make it a channel space
        n = self.size[seg.space]
        inner = self.scan[-1] if self.scan else set()
        self.members[r] += [
            (Member(p, a, seg.offset, seg.stride, **kw), n, self.stacked[p][1] if p in inner else 0)
            for p, a in claim
        ]

    def block(self, layout: tuple[Seg, ...], reason: str) -> None:
        for s in layout:
            r = self.find(s.space)
            if reason not in self.reasons[r]:
                self.reasons[r].append(reason)

    def layers(self, root: int) -> int:
        """``L`` if every member of the set is a layer-stacked kernel axis of one ``scan`` of
        ``L`` layers (whole axis, no offset) and no grouped convolution constrains it: each
        layer may lose its own channels; else 1."""
        if self.blocks[root] > 1:
            return 1
        found = set()
        for m, n, layers in self.members[root]:
            if (
                layers < 2
                or m.offset
                or m.stride
                or m.blocks > 1
                or self.shapes[m.path][m.axis] != n
            ):
                return 1
            found.add(layers)
        return found.pop() if len(found) == 1 else 1

    def groups(self, order: dict[str, int]) -> dict[int, Group]:
        """``{root: Group}`` in creation order, members sorted by tree order, then axis."""
        out = {}
        for i in range(len(self.parent)):
            if self.find(i) != i or not self.members[i]:
                continue  # a broadcast that met no parameter: nothing to prune
            units, blocks = self.units[i], self.blocks[i]
            layers = self.layers(i)
            members = sorted(
                {
                    dataclasses.replace(
                        m,
                        width=m.width * n // units,
                        **(
                            {"blocks": layers, "block_axis": self.stacked[m.path][0]}
                            if layers > 1
                            else {}
                        ),
                    )
                    for m, n, _ in self.members[i]
                },
                key=lambda m: (order.get(m.path, len(order)), m.path, m.axis, m.offset),
            )
            reasons = list(self.reasons[i])
            if units % blocks:
                reasons.append(
                    f"its {units} channel units cannot be split into the {blocks} equal blocks "
                    "of its grouped convolutions (GroupNorm groups straddle convolution groups)"
                )
                blocks = 1
            elif blocks > 1 and blocks == units:
                reasons.append(
                    f"each of its {blocks} grouped-convolution blocks holds one channel (a "
                    "depthwise convolution with a channel multiplier): removing one would empty "
                    "a convolution group"
                )
            for m in members:
                why = self.fixed.get((m.path, m.axis))
                if why is not None and why not in reasons:
                    reasons.append(why)
            out[i] = Group(
                tuple(members), units * layers, "; ".join(reasons) or None, math.lcm(blocks, layers)
            )
        return out
