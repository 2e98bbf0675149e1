"""Channel groups: parameter axes that lose the same channels together, and their index tables.

:class:`Member` / :class:`Group` are plain frozen data, filled in by
``jcompress.structure.dependencies``. The arithmetic that maps a group's channels to indices of
its members (:class:`MemberTable`, :func:`per_channel`, :func:`channel_mask`) lives here once:
channel pruning ranks and masks channels with it, ``shrink`` finds and removes them with it.
Reductions work on NumPy arrays (eagerly, no compilation) and on ``jax.Array`` s (traceable).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["Group", "Member", "MemberTable", "channel_mask", "member_table", "per_channel"]


@dataclasses.dataclass(frozen=True)
class Member:
    """One parameter axis in a channel group.

    Channel ``c`` of the group occupies the ``width`` indices ``offset + c * width + i``
    (``0 <= i < width``) along ``axis`` of the leaf at ``path`` and, when ``stride > 0``, every
    index ``offset + c * width + i + j * stride`` (``j >= 0``) inside the axis (a flatten after a
    conv with ``stride`` channels per spatial position). ``width > 1`` when the group's unit is
    coarser than the leaf's axis: a GroupNorm group of channels, a key/value head with the query
    heads that share it (GQA), a channel-first flatten (a channel's ``H * W`` rows).

    ``blocks > 1`` marks the input axis of a grouped convolution kernel (``feature_group_count =
    blocks``): the indices above are *virtual* (over ``blocks * axis_size`` input channels); index
    ``v`` is row ``v % axis_size`` of the kernel, and only inside block ``v // axis_size`` of the
    ``blocks`` equal slices of ``block_axis`` (the kernel's output axis).
    """

    path: str
    axis: int
    offset: int = 0
    stride: int = 0
    width: int = 1
    blocks: int = 1
    block_axis: int = -1

    def __post_init__(self):
        if self.width < 1 or self.blocks < 1:
            raise ValueError(
                f"{self.path}: Member width and blocks must be >= 1, got {self.width}, "
                f"{self.blocks}"
            )

    def indices(self, channel: int, axis_size: int) -> list[int]:
        """Indices along :attr:`axis` that channel ``channel`` occupies.

        With ``blocks > 1`` the indices are taken modulo ``axis_size`` (see :meth:`block`).

        >>> Member("k", 0, offset=0, stride=4).indices(1, 12)
        [1, 5, 9]
        >>> Member("k", 0, width=2).indices(1, 6)
        [2, 3]
        """
        start = self.offset + channel * self.width
        if self.blocks > 1:
            return [(start + i) % axis_size for i in range(self.width)]
        firsts = range(start, start + self.width)
        if self.stride <= 0:
            return list(firsts)
        return sorted(k for s in firsts for k in range(s, axis_size, self.stride))

    def block(self, channel: int, axis_size: int) -> int:
        """The block of :attr:`block_axis` that channel ``channel`` lives in (0 unless blocked).

        >>> Member("k", 2, width=1, blocks=2, block_axis=3).block(5, 4)
        1
        """
        if self.blocks <= 1:
            return 0
        return (self.offset + channel * self.width) // axis_size


@dataclasses.dataclass(frozen=True)
class Group:
    """Parameter axes that must lose the same channels together.

    Attributes:
      members: the coupled ``Member`` s (kernel output columns, bias, norm statistics, the next
        layer's contracting rows, ...).
      size: the number of channels (pruning units) in the group.
      blocked: ``None`` if the group can be pruned, else the reason it cannot (reduced over by a
        norm, a model output, an irregular reshape, ...).
      blocks: the group's channels fall in ``blocks`` equal contiguous runs that must each lose
        the same number of channels (the groups of a grouped convolution keep equal widths).
    """

    members: tuple[Member, ...]
    size: int
    blocked: str | None = None
    blocks: int = 1

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))
        if self.size < 0:
            raise ValueError(f"Group.size must be >= 0, got {self.size}")
        if self.blocks < 1 or (self.size and self.size % self.blocks):
            raise ValueError(
                f"Group.blocks must be >= 1 and divide size {self.size}, got {self.blocks}"
            )

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.path for m in self.members))

    def block_of(self, channels: ArrayLike) -> np.ndarray:
        """The block each of ``channels`` lies in (blocks are equal contiguous runs).

        >>> Group((), size=6, blocks=3).block_of([0, 1, 2, 5]).tolist()
        [0, 0, 1, 2]
        """
        return np.asarray(channels, np.int64) // max(1, self.size // self.blocks)

    def per_block(self, channels: ArrayLike) -> np.ndarray:
        """How many of ``channels`` lie in each block: ``(blocks,)``.

        >>> Group((), size=6, blocks=3).per_block([0, 1, 5]).tolist()
        [2, 0, 1]
        """
        return np.bincount(self.block_of(channels), minlength=self.blocks)


class MemberTable(NamedTuple):
    """Where each channel of a group lives in one member's leaf (static NumPy tables).

    Attributes:
      path, axis: the member's leaf and axis.
      axis_size: the size of ``axis``.
      index: ``(channels, J)`` int32 indices along ``axis`` per channel, padded with
        ``axis_size``.
      block: ``(channels,)`` int32: the block of ``block_axis`` each channel lives in (zeros
        unless ``blocks > 1``).
      block_axis: the member's block axis, non-negative.
      blocks: :attr:`Member.blocks`.
    """

    path: str
    axis: int
    axis_size: int
    index: np.ndarray
    block: np.ndarray
    block_axis: int
    blocks: int

    @property
    def flat(self) -> np.ndarray:
        """``(channels, J)`` positions in :func:`per_index`'s output; the padding is
        ``axis_size * blocks`` (one past the end)."""
        if self.blocks == 1:
            return self.index
        flat = self.index * self.blocks + self.block[:, None]
        return np.where(self.index < self.axis_size, flat, self.axis_size * self.blocks)

    def occupied(self, channels: ArrayLike) -> list[np.ndarray]:
        """Per block, the sorted indices along ``axis`` that ``channels`` occupy (int64).

        >>> t = member_table(Member("k", 0, width=2), 3, (6, 4))
        >>> t.occupied([0, 2])
        [array([0, 1, 4, 5])]
        """
        channels = np.asarray(channels, np.int64)
        rows, blocks = self.index[channels], self.block[channels]
        out = []
        for b in range(self.blocks):
            r = rows[blocks == b]
            out.append(np.unique(r[r < self.axis_size]).astype(np.int64))
        return out


@functools.lru_cache(maxsize=1024)
def member_table(member: Member, channels: int, shape: tuple[int, ...]) -> MemberTable:
    """The :class:`MemberTable` of ``member`` for a group of ``channels`` on a leaf of ``shape``.

    Raises:
      ValueError: the axis is outside the shape, or the group's channels do not fit it (the
        groups were computed for another tree).

    >>> member_table(Member("k", 0, stride=4), 2, (8, 3)).index.tolist()
    [[0, 4], [1, 5]]
    """
    shape = tuple(int(d) for d in shape)
    if not 0 <= member.axis < len(shape):
        raise ValueError(
            f"{member.path}: group member axis {member.axis} is outside the leaf's shape {shape}"
        )
    size = shape[member.axis]
    rows = [member.indices(c, size) for c in range(channels)]
    block = np.array([member.block(c, size) for c in range(channels)], np.int32)
    if member.blocks > 1 and (
        shape[member.block_axis] % member.blocks or block.max() >= member.blocks or block.min() < 0
    ):
        raise ValueError(
            f"{member.path}: a grouped-convolution member of {member.blocks} blocks does not fit "
            f"axes {member.axis}, {member.block_axis} of shape {shape}; recompute the groups"
        )
    if any(not r or max(r) >= size or min(r) < 0 for r in rows):
        raise ValueError(
            f"{member.path}: a group of {channels} channels (offset {member.offset}) does not "
            f"fit axis {member.axis} of size {size}; recompute the groups for this tree"
        )
    width = max((len(r) for r in rows), default=1)
    index = np.full((channels, width), size, np.int32)
    for c, r in enumerate(rows):
        index[c, : len(r)] = r
    for a in (index, block):
        a.flags.writeable = False  # shared through the cache
    return MemberTable(
        member.path, member.axis, size, index, block, member.block_axis % len(shape), member.blocks
    )


def _xp(x: Any) -> Any:
    return np if isinstance(x, np.ndarray | np.generic) else jnp


def per_index(x: ArrayLike, table: MemberTable, reduce: Callable[..., Any]) -> Any:
    """``x`` (the member's leaf shape) reduced over every axis but the member's:
    ``(axis_size,)``, or ``(axis_size * blocks,)`` index-major for a grouped-convolution member
    (each index within each block of ``block_axis``)."""
    axis = table.axis
    if table.blocks == 1:
        return reduce(x, axis=tuple(a for a in range(np.ndim(x)) if a != axis))
    b = table.block_axis
    y = reduce(x, axis=tuple(a for a in range(np.ndim(x)) if a not in (axis, b)))
    y = y if axis < b else y.T
    return reduce(y.reshape(y.shape[0], table.blocks, -1), axis=2).reshape(-1)


def per_channel(x: ArrayLike, table: MemberTable, reduce: Callable[..., Any]) -> Any:
    """Per channel of the group, ``reduce`` (``sum``, ``any``: NumPy's or ``jax.numpy``'s, as
    ``x`` is) over everything the channel holds in this member: ``(channels,)``.

    >>> t = member_table(Member("k", 1, width=2), 2, (3, 4))
    >>> per_channel(np.arange(12.0).reshape(3, 4), t, np.sum).tolist()
    [27.0, 39.0]
    """
    v = per_index(x, table, reduce)
    xp = _xp(v)
    padded = xp.concatenate([v, xp.zeros((1,), v.dtype)])  # the padding reduces to nothing
    return reduce(padded[table.flat], axis=1)


def channel_mask(keep: jax.Array, table: MemberTable, shape: tuple[int, ...]) -> jax.Array:
    """The member's mask from the group's keep vector ``(channels,)``: ``False`` on every index
    of a dropped channel, size-1 axes except the member's axis (and block axis).

    >>> t = member_table(Member("k", 1), 2, (3, 2))
    >>> channel_mask(jnp.array([True, False]), t, (3, 2)).tolist()
    [[True, False]]
    """
    size, blocks, axis = table.axis_size, table.blocks, table.axis
    width = table.index.shape[1]
    vec = (
        jnp.ones((size * blocks,), bool)
        .at[table.flat.reshape(-1)]
        .set(jnp.repeat(keep, width), mode="drop")
    )
    out = [1] * len(shape)
    out[axis] = size
    if blocks == 1:
        return vec.reshape(out)
    b = table.block_axis
    vec = jnp.repeat(vec.reshape(size, blocks), shape[b] // blocks, axis=1)
    out[b] = shape[b]
    return (vec if axis < b else vec.T).reshape(out)
