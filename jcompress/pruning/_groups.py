"""Channels coupled by groups: which groups a selection prunes, and one program that ranks them.

A group (``jc.structure.dependencies``) is pruned only through a selected leaf that *owns* it,
holding it on one of its output axes. Its channels are scored by the norms of their slices in
the members that are selected leaves (summed), ranked per group (``scope="layer"``, per block
for grouped convolutions) or across groups (``"global"``, norms divided by their group's mean),
and the masks cover every member. The index arithmetic between channels and member indices is
:mod:`jcompress.tree`'s (:func:`~jcompress.tree.member_table`); the tables and the compiled
ranking program are cached per model layout.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.pruning._channels import normalised
from jcompress.pruning._structures import Channels
from jcompress.pruning._threshold import PRUNED_KEY, and_previous, keys_of, lowest_sorted
from jcompress.tree import (
    Group,
    MemberTable,
    Role,
    channel_mask,
    member_table,
    per_channel,
)

__all__ = ["GroupMember", "OwnedGroup", "group_masks", "owned_groups"]


class GroupMember(NamedTuple):
    """A group member: the leaf's position (in ``leaves_with_paths`` order) and its table."""

    leaf: int
    table: MemberTable


class OwnedGroup(NamedTuple):
    """A prunable group owned by a selected leaf, with its members' index tables."""

    group: Group
    members: tuple[GroupMember, ...]


def _tables_key(
    pairs: list[tuple[str, Any]], selected: list[bool], groups: Any, roles: dict[str, Role]
) -> tuple:
    """The hashable arguments of :func:`_group_tables`."""
    stacked = tuple(tuple(roles[p].stacked) if s else () for (p, _), s in zip(pairs, selected))
    outputs = tuple(tuple(roles[p].output) if s else () for (p, _), s in zip(pairs, selected))
    shapes = tuple((p, tuple(np.shape(x))) for p, x in pairs)
    return (groups, shapes, tuple(selected), stacked, outputs)


def _owned(group: Group, position: dict, selected, outputs) -> bool:
    """Whether a selected leaf owns ``group``: holds it along one of its output axes.

    A selected leaf that only reads the group (its contracting axis, e.g. a residual stream
    feeding ``up``) does not select it.
    """
    return any(
        m.path in position and selected[position[m.path]] and m.axis in outputs[position[m.path]]
        for m in group.members
    )


@functools.lru_cache(maxsize=32)
def _group_tables(groups, shapes, selected, stacked, outputs) -> list[OwnedGroup]:
    """:func:`owned_groups` on hashable arguments (cached: the tables are built once)."""
    position = {p: i for i, (p, _) in enumerate(shapes)}
    out = []
    for group in groups:
        if group.blocked is not None or group.size == 0:
            continue
        if not _owned(group, position, selected, outputs):
            continue
        members = []
        for mem in group.members:
            if mem.path not in position:
                raise ValueError(
                    f"{mem.path}: a member of a channel group is not in the parameter tree; "
                    "compute the groups (jc.structure.dependencies) from the same tree"
                )
            i = position[mem.path]
            if mem.axis in stacked[i]:
                raise ValueError(
                    f"{mem.path}: a channel group runs along the stacked axis {mem.axis} of the "
                    "leaf; stacked layers are pruned alike (groups from jc.structure.dependencies "
                    "index the other axes): check roles= or recompute the groups"
                )
            members.append(GroupMember(i, member_table(mem, group.size, shapes[i][1])))
        out.append(OwnedGroup(group, tuple(members)))
    return out


def owned_groups(
    pairs: list[tuple[str, Any]], selected: list[bool], groups: Any, roles: dict[str, Role]
) -> list[OwnedGroup]:
    """The prunable groups owned by a selected leaf, with their members' index tables."""
    return _group_tables(*_tables_key(pairs, selected, groups, roles))


def group_masks(
    pairs: list[tuple[str, Any]],
    scores: dict[int, jax.Array],
    previous: list[Any],
    selected: list[bool],
    sparsity: jax.Array,
    *,
    channels: Channels,
    scope: str,
    roles: dict[str, Role],
) -> dict[int, jax.Array]:
    """Channels coupled by groups: scores summed over selected members, masks on every member.

    ``{leaf position: mask}`` for every member of an owned group. One jitted program per model
    layout (the index tables are constants in it), cached.
    """
    key = _tables_key(pairs, selected, channels.groups, roles)
    tables = _group_tables(*key)
    if scope == "global" and any(t.group.blocks > 1 for t in tables):
        raise ValueError(
            "channel groups of grouped convolutions (Group.blocks > 1) must lose equally many "
            "channels per block, which a global ranking cannot promise; use scope='layer'"
        )
    leaves = sorted({m.leaf for t in tables for m in t.members})
    program = _group_program(key, channels.norm, scope)
    score_in = [scores.get(i) for i in leaves]
    prev_in = [None if previous[i] is None else jnp.asarray(previous[i]) for i in leaves]
    masks = program(score_in, prev_in, sparsity)
    return dict(zip(leaves, masks))


@functools.lru_cache(maxsize=32)
def _group_program(key: tuple, norm: str, scope: str):
    """``(scores, previous, sparsity) -> masks`` for the groups of ``key``, jitted."""
    tables = _group_tables(*key)
    shapes = [shape for _, shape in key[1]]
    selected = key[2]
    leaves = sorted({m.leaf for t in tables for m in t.members})
    slot = {leaf: k for k, leaf in enumerate(leaves)}

    def program(score_in, prev_in, sparsity):
        values, prevs = {}, {}
        for leaf in leaves:
            prev = prev_in[slot[leaf]]
            if prev is not None:
                prevs[leaf] = jnp.broadcast_to(prev.astype(bool), shapes[leaf])
            if selected[leaf]:
                x = jnp.abs(score_in[slot[leaf]].astype(jnp.float32))
                values[leaf] = x if prev is None else jnp.where(prevs[leaf], x, 0)
        keys = []
        for group, members in tables:
            chosen = [m for m in members if selected[m.leaf]]
            top = jnp.max(jnp.stack([jnp.max(values[m.leaf]) for m in chosen]))
            top = jnp.where(top > 0, top, jnp.float32(1))
            score = 0
            for m in chosen:
                v = values[m.leaf] / top
                part = per_channel(v if norm == "l1" else v * v, m.table, jnp.sum)
                score = score + (part if norm == "l1" else jnp.sqrt(part))
            if scope == "global":
                score = normalised(score, None)
            group_keys = keys_of(score)
            alive = [
                per_channel(prevs[m.leaf], m.table, jnp.any) for m in chosen if m.leaf in prevs
            ]
            if alive:
                alive = functools.reduce(jnp.logical_or, alive)
                group_keys = jnp.where(alive, group_keys, PRUNED_KEY)
            keys.append(group_keys.reshape(group.blocks, -1))
        if scope == "layer":
            keeps = [lowest_sorted([k], sparsity)[0] for k in keys]
        else:
            keeps = lowest_sorted(keys, sparsity)
        out = {}
        for (_, members), keep in zip(tables, keeps):
            keep = keep.reshape(-1)
            for m in members:
                vec = channel_mask(keep, m.table, shapes[m.leaf])
                out[m.leaf] = vec if m.leaf not in out else out[m.leaf] & vec
        return [and_previous(out[leaf], prevs.get(leaf)) for leaf in leaves]

    return jax.jit(program)
