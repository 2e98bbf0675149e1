"""Pruning masks from scores: magnitude, random and saliency criteria, any structure.

Every mask function is a thin wrapper: :func:`plan` (eager validation: what is pruned, how) +
element scores + :func:`masks_from_scores` (the jittable part, exact counts, no sort).

Masks have the parameters' paths: a bool array broadcastable to the leaf for selected leaves
(full shape for :class:`Unstructured` and :class:`NM`; size-1 axes except the output and stacked
axes for :class:`Channels`), ``True`` for the rest. ``apply_masks`` is ``jnp.where(mask, p, 0)``.

References:
  Han et al., 2015, "Learning both Weights and Connections for Efficient Neural Networks"
  (magnitude), arXiv:1506.02626; Molchanov et al., 2017, "Pruning Convolutional Neural Networks for
  Resource Efficient Inference" (first-order saliency ``|w * g|``), arXiv:1611.06440; Mishra et al.,
  2021 (N:M), arXiv:2104.08378; Li et al., 2017 (channel norms), arXiv:1608.08710.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcompress import tree as jt
from jcompress.pruning._structures import NM, Channels, Structure, Unstructured
from jcompress.pruning._threshold import PRUNED_KEY, exact_count, keys_of, prune_lowest
from jcompress.tree import Params, Role, Where

__all__ = [
    "Plan",
    "apply_masks",
    "magnitude_masks",
    "masks_from_scores",
    "nm_masks",
    "plan",
    "random_masks",
    "saliency_masks",
    "sparsity",
    "structured_masks",
]

Masks = Any
"""A pytree with the parameters' paths: bool arrays for pruned leaves, ``True`` elsewhere."""

SCOPES = ("layer", "global")
_PAIRWISE_MAX_M = 16  # N:M ranks by pairwise comparison up to this m, by a sort above it


@dataclasses.dataclass(frozen=True)
class Plan:
    """An eager, static description of what gets pruned and how (from :func:`plan`).

    Attributes:
      selection: bool pytree with the parameters' structure (:func:`jcompress.tree.select`).
      roles: ``{path: Role}`` for the selected leaves (:func:`jcompress.tree.resolve_roles`).
      structure: ``Unstructured()``, ``NM(n, m)`` or ``Channels(...)``.
      scope: ``"layer"`` (each leaf, each stacked slice, its own count) or ``"global"`` (one
        count and one threshold over every selected leaf).
    """

    selection: Any
    roles: dict
    structure: Any
    scope: str


def _is_concrete_scalar(x: Any) -> bool:
    return x is not None and jt.is_concrete(x) and np.ndim(x) == 0


def _kinds(structure: Structure) -> tuple[str, ...]:
    return (
        ("matmul", "conv", "gather") if isinstance(structure, Unstructured) else ("matmul", "conv")
    )


def _check_sparsity(sparsity: Any, structure: Structure) -> None:
    if sparsity is None:
        return  # the caller passes it later (masks_from_scores); NM needs none
    if isinstance(sparsity, Unstructured | NM | Channels):
        raise TypeError(
            f"sparsity must be a number, got the structure {sparsity!r}; pass it as "
            f"structure={sparsity!r} (with sparsity=None for NM)"
        )
    if not _is_concrete_scalar(sparsity):
        if jt.is_concrete(sparsity):
            raise ValueError(f"sparsity must be a scalar, got shape {np.shape(sparsity)}")
        return  # traced: checked by the caller's flag, clipped to [0, 1] by exact_count
    value = float(sparsity)
    if isinstance(structure, NM):
        if abs(value - structure.sparsity) > 1e-6:
            raise ValueError(
                f"NM(n={structure.n}, m={structure.m}) prunes {structure.sparsity:g} of the "
                f"weights, but sparsity={value:g} was given; pass sparsity=None (or "
                f"{structure.sparsity:g})"
            )
        return
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(
            f"sparsity must be in [0, 1) (the fraction of weights removed), got {value!r}"
        )


def _check_nm(path: str, shape: tuple[int, ...], role: Role, nm: NM) -> None:
    if role.kind not in ("matmul", "conv") or not role.contracting:
        raise ValueError(
            f"{path}: {nm.n}:{nm.m} sparsity needs a matmul/conv leaf with a contracting axis, "
            f"got role {role}; pass roles= (jc.roles) or exclude it with where="
        )
    size = shape[role.group_axis]
    if size % nm.m:
        raise ValueError(
            f"{path}: {nm.n}:{nm.m} sparsity needs the contracting axis (size {size}) divisible "
            f"by {nm.m}; exclude it with where= or pad the layer"
        )


def _check_channels(path: str, role: Role) -> None:
    if not role.output:
        raise ValueError(
            f"{path}: channel pruning needs a leaf with output axes, got role {role}; pass "
            "roles= (jc.roles) or exclude it with where="
        )


@dataclasses.dataclass(frozen=True)
class _MemberIndex:
    """Static layout of one group member: a leaf axis and the indices of each channel."""

    leaf: int  # position in leaves_with_paths order
    axis: int
    index: np.ndarray  # (size, J) indices along `axis`; `axis_size` pads
    block: np.ndarray  # (size,) block of `block_axis` per channel (zeros when blocks == 1)
    block_axis: int
    blocks: int


def _group_layouts(
    pairs: list[tuple[str, Any]], selected: list[bool], structure: Channels, roles: dict
) -> list[tuple[Any, list[_MemberIndex]]]:
    """The prunable groups touching a selected leaf, with their members' static index tables."""
    return _layouts(*_layouts_key(pairs, selected, structure, roles))


def _layouts_key(pairs, selected, structure: Channels, roles: dict) -> tuple:
    """The hashable arguments of :func:`_layouts`."""
    stacked = tuple(tuple(roles[p].stacked) if s else () for (p, _), s in zip(pairs, selected))
    outputs = tuple(tuple(roles[p].output) if s else () for (p, _), s in zip(pairs, selected))
    shapes = tuple((p, tuple(np.shape(x))) for p, x in pairs)
    return (structure.groups, shapes, tuple(selected), stacked, outputs)


def _owned(group, position: dict, selected, outputs) -> bool:
    """Whether a selected leaf owns ``group``: holds it along one of its output axes.

    A selected leaf that only reads the group (its contracting axis, e.g. a residual stream
    feeding ``up``) does not select it.
    """
    return any(
        m.path in position and selected[position[m.path]] and m.axis in outputs[position[m.path]]
        for m in group.members
    )


@functools.lru_cache(maxsize=32)
def _layouts(groups, shapes, selected, stacked, outputs):
    """:func:`_group_layouts` on hashable arguments (cached: the tables are built once)."""
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
            shape = shapes[i][1]
            if not 0 <= mem.axis < len(shape):
                raise ValueError(
                    f"{mem.path}: group member axis {mem.axis} is outside the leaf's shape {shape}"
                )
            if mem.axis in stacked[i]:
                raise ValueError(
                    f"{mem.path}: a channel group runs along the stacked axis {mem.axis} of the "
                    "leaf; stacked layers are pruned alike (groups from jc.structure.dependencies "
                    "index the other axes): check roles= or recompute the groups"
                )
            size = shape[mem.axis]
            rows = [mem.indices(c, size) for c in range(group.size)]
            block = np.array([mem.block(c, size) for c in range(group.size)], np.int32)
            if mem.blocks > 1 and (
                shape[mem.block_axis] % mem.blocks or block.max() >= mem.blocks or block.min() < 0
            ):
                raise ValueError(
                    f"{mem.path}: a grouped-convolution member of {mem.blocks} blocks does not fit "
                    f"axes {mem.axis}, {mem.block_axis} of shape {shape}; recompute the groups"
                )
            if any(not r or max(r) >= size or min(r) < 0 for r in rows):
                raise ValueError(
                    f"{mem.path}: a group of {group.size} channels (offset {mem.offset}) does not "
                    f"fit axis {mem.axis} of size {size}; recompute the groups for this tree"
                )
            width = max(len(r) for r in rows)
            index = np.full((group.size, width), size, np.int32)
            for c, r in enumerate(rows):
                index[c, : len(r)] = r
            members.append(
                _MemberIndex(i, mem.axis, index, block, mem.block_axis % len(shape), mem.blocks)
            )
        out.append((group, members))
    return out


def plan(
    params: Params,
    *,
    structure: Structure | None = None,
    scope: str = "layer",
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
    sparsity: Any = None,
    what: str = "pruning",
) -> Plan:
    """Validate eagerly what can be validated, and describe what gets pruned.

    Checks the selection (:func:`jcompress.tree.select`; kinds matmul/conv/gather for
    ``Unstructured``, matmul/conv for ``NM`` and ``Channels``), the roles, N:M divisibility,
    ``n/m`` against ``sparsity``, the scope, a concrete ``sparsity``'s range ``[0, 1)`` and channel
    groups. Works on ``nnx.State`` with ``Variable`` s and on plain arrays alike (same paths).
    Values (NaN/Inf) are not checked here.

    Args:
      params: the parameter pytree (shapes and dtypes are read, not values).
      structure: ``Unstructured()`` (``None``), ``NM(n, m)`` or ``Channels(...)``.
      scope: ``"layer"`` or ``"global"`` (not for ``NM``, whose groups are local).
      where: selection, see :func:`jcompress.tree.select`.
      roles: ``{path: Role}``; default: Flax layouts (:func:`jcompress.tree.default_role`).
      sparsity: checked when concrete; ``None`` skips the range check (allowed for ``NM``).
      what: the caller's name for error messages.

    Returns:
      A :class:`Plan`.

    Raises:
      ValueError / TypeError: naming the path, what is wrong and the fix.

    >>> import jax.numpy as jnp
    >>> p = plan({"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}}, structure=NM(2, 4))
    >>> p.selection, p.scope
    ({'Dense_0': {'bias': False, 'kernel': True}}, 'layer')
    """
    structure = Unstructured() if structure is None else structure
    if not isinstance(structure, Unstructured | NM | Channels):
        raise TypeError(
            f"structure must be Unstructured(), NM(n=..., m=...) or Channels(...), got "
            f"{structure!r}"
        )
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if isinstance(structure, NM) and scope != "layer":
        raise ValueError(
            "N:M sparsity is decided inside each group of m weights, so scope='global' has no "
            "meaning for it; use scope='layer'"
        )
    _check_sparsity(sparsity, structure)
    pairs = jt.leaves_with_paths(params)
    chosen_tree = jt.select(params, where, roles=roles, kinds=_kinds(structure), what=what)
    selected = [bool(s) for s in jt.match_paths(params, chosen_tree, name="selection")]
    selection = jax.tree_util.tree_unflatten(_unwrapped_structure(params, len(pairs)), selected)
    resolved = jt.resolve_roles(params, {p: s for (p, _), s in zip(pairs, selected)}, roles)
    for (path, leaf), chosen in zip(pairs, selected):
        if not chosen:
            continue
        if isinstance(structure, NM):
            _check_nm(path, tuple(np.shape(leaf)), resolved[path], structure)
        elif isinstance(structure, Channels):
            _check_channels(path, resolved[path])
    if isinstance(structure, Channels) and structure.groups is not None:
        if not _group_layouts(pairs, selected, structure, resolved):
            blocked = [g.blocked for g in structure.groups if g.blocked is not None]
            raise ValueError(
                f"{what}: no prunable channel group is owned by a selected leaf (a group is "
                "pruned only through a selected leaf holding it on its output axis; "
                f"{len(structure.groups)} groups, {len(blocked)} blocked"
                + (f", e.g. {blocked[0]!r}" if blocked else "")
                + "); widen where= or compute groups with jc.structure.dependencies"
            )
    return Plan(selection=selection, roles=resolved, structure=structure, scope=scope)


# ----------------------------------------------------------------------------------------------
# Scores to masks
# ----------------------------------------------------------------------------------------------


def _to_rows(x: jax.Array, lead: tuple[int, ...]) -> tuple[jax.Array, tuple]:
    """``x`` with the ``lead`` axes moved first, as ``(prod(lead sizes), rest)``."""
    perm = tuple(lead) + tuple(a for a in range(x.ndim) if a not in lead)
    y = jnp.transpose(x, perm)
    rows = math.prod(y.shape[: len(lead)])
    return y.reshape(rows, math.prod(y.shape[len(lead) :])), (perm, y.shape)


def _from_rows(x: jax.Array, layout: tuple) -> jax.Array:
    perm, shape = layout
    return jnp.transpose(x.reshape(shape), tuple(np.argsort(perm)))


def _with_previous(keys: jax.Array, previous: Any) -> jax.Array:
    if previous is None:
        return keys
    alive = jnp.broadcast_to(jnp.asarray(previous, bool), keys.shape)
    return jnp.where(alive, keys, PRUNED_KEY)


def _and_previous(mask: jax.Array, previous: Any) -> jax.Array:
    return mask if previous is None else mask & jnp.asarray(previous, bool)


# The selection kernels are jitted on int32 keys (static layout arguments), so eager calls
# compile once per shape whatever the dtype, and a caller's jit simply inlines them.


@functools.partial(jax.jit, static_argnames=("pruned",))
def _lowest(keys: list[jax.Array], sparsity: jax.Array, pruned: bool) -> list[jax.Array]:
    """Keep masks of ``(B, N_i)`` keys pooled per row, ``round(s * sum N_i)`` removed per row."""
    total = sum(k.shape[1] for k in keys)
    return prune_lowest(keys, exact_count(sparsity, total), maybe_pruned=pruned)


def _unstructured(entries, sparsity, scope):
    """``entries``: ``[(index, score, role, previous)]`` → ``{index: mask}``."""
    out = {}
    if scope == "layer":
        for i, score, role, prev in entries:
            rows, layout = _to_rows(_with_previous(keys_of(score), prev), role.stacked)
            [keep] = _lowest([rows], sparsity, prev is not None)
            out[i] = _from_rows(keep, layout)
        return out
    keys = [_with_previous(keys_of(e[1]), e[3]).reshape(1, -1) for e in entries]
    keeps = _lowest(keys, sparsity, any(e[3] is not None for e in entries))
    return {e[0]: keep.reshape(e[1].shape) for e, keep in zip(entries, keeps)}


@functools.partial(jax.jit, static_argnames=("axis", "n", "m"))
def _nm_leaf(keys, axis, n, m):
    y = jnp.moveaxis(keys, axis, -1)
    grouped = y.reshape(*y.shape[:-1], y.shape[-1] // m, m)
    if m <= _PAIRWISE_MAX_M:
        # rank = how many in the group are kept before me: larger keys, or equal keys at a
        # higher position (equal keys: the lowest positions are pruned first).
        other, me = grouped[..., None, :], grouped[..., :, None]
        later = np.arange(m)[None, :] > np.arange(m)[:, None]
        rank = jnp.sum((other > me) | ((other == me) & later), axis=-1)
        keep = rank < n
    else:
        order = jnp.argsort(grouped, axis=-1, stable=True)  # ascending, ties by position
        position = jnp.argsort(order, axis=-1, stable=True)
        keep = position >= m - n
    keep = keep.reshape(y.shape) & (y != PRUNED_KEY)  # pruned before: stays pruned
    return jnp.moveaxis(keep, -1, axis)


def _nm(entries, nm: NM):
    return {
        i: _nm_leaf(_with_previous(keys_of(score), prev), role.group_axis, nm.n, nm.m)
        for i, score, role, prev in entries
    }


def _norm(x: jax.Array, axes: tuple[int, ...], norm: str) -> jax.Array:
    if norm == "l1":
        return jnp.sum(x, axis=axes, keepdims=True)
    return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def _scaled(x: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
    """``x / max(x)`` over ``axes`` (all when ``None``), so squares neither overflow nor vanish."""
    top = jnp.max(x, axis=axes, keepdims=axes is not None)
    return x / jnp.where(top > 0, top, jnp.float32(1))


def _normalised(norms: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
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
        norms = _normalised(norms, tuple(role.output))
    keys = keys_of(norms)
    if prev is not None:
        keys = jnp.where(jnp.any(prev, axis=inner, keepdims=True), keys, PRUNED_KEY)
    return _to_rows(keys, role.stacked)[0]


def _channels(entries, sparsity, scope, channels: Channels):
    """Channels of each leaf on their own (no groups)."""
    pruned = any(e[3] is not None for e in entries)
    keys, shapes = [], []
    for _, score, role, prev in entries:
        score = score.astype(jnp.float32)  # one compilation per shape, whatever the dtype
        keys.append(_channel_keys(score, prev, role, channels.norm, scope == "global"))
        kept_shape = tuple(
            d if a in role.output or a in role.stacked else 1 for a, d in enumerate(score.shape)
        )
        shapes.append((role.stacked, kept_shape))
    if scope == "layer":
        keeps = [_lowest([k], sparsity, pruned)[0] for k in keys]
    else:
        flat = [k.reshape(1, -1) for k in keys]
        keeps = [m.reshape(k.shape) for m, k in zip(_lowest(flat, sparsity, pruned), keys)]
    out = {}
    for (i, _, _, prev), keep, (stacked, kept_shape) in zip(entries, keeps, shapes):
        layout = _to_rows(jnp.zeros(kept_shape, bool), stacked)[1]
        out[i] = _and_previous(_from_rows(keep, layout), prev)
    return out


def _per_index(x: jax.Array, member: _MemberIndex, reduce) -> jax.Array:
    """``x`` reduced over every axis but the member's: ``(axis_size,)``, or
    ``(axis_size * blocks,)`` (index-major) for a grouped-convolution member."""
    if member.blocks == 1:
        return reduce(x, axis=tuple(a for a in range(x.ndim) if a != member.axis))
    b = member.block_axis
    other = tuple(a for a in range(x.ndim) if a not in (member.axis, b))
    y = reduce(x, axis=other)
    y = y if member.axis < b else y.T
    return reduce(y.reshape(y.shape[0], member.blocks, -1), axis=2).reshape(-1)


def _flat_index(member: _MemberIndex, size: int) -> np.ndarray:
    """``(channels, J)`` positions in :func:`_per_index`'s output; out-of-range pads."""
    if member.blocks == 1:
        return member.index
    flat = member.index * member.blocks + member.block[:, None]
    return np.where(member.index < size, flat, size * member.blocks)


def _member_vectors(x: jax.Array, member: _MemberIndex, norm: str) -> jax.Array:
    """Per channel of a group, the member's sum of |x| (l1) or of x**2 (l2): shape (size,)."""
    per_index = _per_index(x if norm == "l1" else x * x, member, jnp.sum)
    index = _flat_index(member, x.shape[member.axis])
    return jnp.sum(per_index.at[index].get(mode="fill", fill_value=0), axis=1)


def _member_alive(prev: jax.Array, member: _MemberIndex) -> jax.Array:
    """Per channel of a group: does the previous mask keep anything of it here? ``(size,)``."""
    per_index = _per_index(prev, member, jnp.any)
    index = _flat_index(member, prev.shape[member.axis])
    return jnp.any(per_index.at[index].get(mode="fill", fill_value=False), axis=1)


def _member_mask(keep: jax.Array, member: _MemberIndex, shape: tuple[int, ...]) -> jax.Array:
    """The member's mask from the group's keep vector: size-1 axes but the member's."""
    size, blocks = shape[member.axis], member.blocks
    width = member.index.shape[1]
    vec = (
        jnp.ones((size * blocks,), bool)
        .at[_flat_index(member, size).reshape(-1)]
        .set(jnp.repeat(keep, width), mode="drop")
    )
    out = [1] * len(shape)
    out[member.axis] = size
    if blocks == 1:
        return vec.reshape(out)
    vec = jnp.repeat(vec.reshape(size, blocks), shape[member.block_axis] // blocks, axis=1)
    out[member.block_axis] = shape[member.block_axis]
    return (vec if member.axis < member.block_axis else vec.T).reshape(out)


def _channel_groups(pairs, scores, previous, selected, sparsity, plan_: Plan):
    """Channels coupled by groups: scores summed over selected members, masks on every member.

    One jitted program per model layout (the index tables are constants in it), cached.
    """
    key = _layouts_key(pairs, selected, plan_.structure, plan_.roles)
    layouts = _layouts(*key)
    if plan_.scope == "global" and any(g.blocks > 1 for g, _ in layouts):
        raise ValueError(
            "channel groups of grouped convolutions (Group.blocks > 1) must lose equally many "
            "channels per block, which a global ranking cannot promise; use scope='layer'"
        )
    leaves = sorted({m.leaf for _, members in layouts for m in members})
    program = _group_program(
        key,
        plan_.structure.norm,
        plan_.scope,
    )
    score_in = [scores.get(i) for i in leaves]
    prev_in = [None if previous[i] is None else jnp.asarray(previous[i]) for i in leaves]
    masks = program(score_in, prev_in, sparsity)
    return dict(zip(leaves, masks))


def _lowest_sorted(keys: list[jax.Array], sparsity: jax.Array) -> list[jax.Array]:
    """:func:`_lowest` by a stable sort, for the small pools of channel groups.

    Same contract (``round(s * N)`` of each row's pooled ``(B, N_i)`` keys removed, or every
    :data:`PRUNED_KEY` if more; ties: lowest position first, arrays in order); a sort of a few
    thousand channels compiles several times faster than the histogram passes.
    """
    flat = jnp.concatenate(keys, axis=1)
    k = jnp.maximum(exact_count(sparsity, flat.shape[1]), jnp.sum(flat == PRUNED_KEY, axis=1))
    order = jnp.argsort(flat, axis=1, stable=True)
    position = jnp.argsort(order, axis=1, stable=True)
    keep = position >= k[:, None]
    return jnp.split(keep, np.cumsum([x.shape[1] for x in keys])[:-1].tolist(), axis=1)


@functools.lru_cache(maxsize=32)
def _group_program(key: tuple, norm: str, scope: str):
    """``(scores, previous, sparsity) -> masks`` for the groups of ``key``, jitted."""
    layouts = _layouts(*key)
    shapes = [shape for _, shape in key[1]]
    selected = key[2]
    leaves = sorted({m.leaf for _, members in layouts for m in members})
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
        for group, members in layouts:
            chosen = [m for m in members if selected[m.leaf]]
            top = jnp.max(jnp.stack([jnp.max(values[m.leaf]) for m in chosen]))
            top = jnp.where(top > 0, top, jnp.float32(1))
            score = 0
            for m in chosen:
                part = _member_vectors(values[m.leaf] / top, m, norm)
                score = score + (part if norm == "l1" else jnp.sqrt(part))
            if scope == "global":
                score = _normalised(score, None)
            key_ = keys_of(score)
            alive = [_member_alive(prevs[m.leaf], m) for m in chosen if m.leaf in prevs]
            if alive:
                key_ = jnp.where(functools.reduce(jnp.logical_or, alive), key_, PRUNED_KEY)
            keys.append(key_.reshape(group.blocks, -1))
        if scope == "layer":
            keeps = [_lowest_sorted([k], sparsity)[0] for k in keys]
        else:
            keeps = _lowest_sorted(keys, sparsity)
        out = {}
        for (_, members), keep in zip(layouts, keeps):
            keep = keep.reshape(-1)
            for m in members:
                vec = _member_mask(keep, m, shapes[m.leaf])
                out[m.leaf] = vec if m.leaf not in out else out[m.leaf] & vec
        return [_and_previous(out[leaf], prevs.get(leaf)) for leaf in leaves]

    return jax.jit(program)


def _unwrapped_structure(params: Params, n: int):
    """The treedef of ``params`` with nnx ``Variable`` s and compressed nodes as leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable) or jt.is_compressed(x)
    )
    if len(leaves) != n:
        raise ValueError(
            f"cannot unwrap the parameter tree: {len(leaves)} variables hold {n} arrays; "
            "each nnx Variable must hold one array"
        )
    return treedef


def masks_from_scores(
    params: Params,
    scores: Params | Mapping[str, Any],
    sparsity: jax.typing.ArrayLike | None,
    plan: Plan,
    *,
    previous: Masks | None = None,
) -> Masks:
    """Masks keeping the highest ``scores`` of the leaves ``plan`` selects; jittable.

    Exact counts: a pool of ``S`` weights (a leaf, a stacked slice, or every selected leaf for
    ``scope="global"``; channels for :class:`Channels`) loses exactly
    ``k = round(float32(sparsity) * S)`` (half to even, exact integer arithmetic). The threshold
    is found by histogram refinement over the scores' float32 bit patterns (two counting passes,
    no sort). Ties at the threshold: the lowest positions are pruned first, in the order leaves
    in tree order (:func:`jcompress.tree.leaves_with_paths`), then row-major inside a leaf
    (inside a stacked slice for ``scope="layer"``). Scores are compared by absolute value.

    Args:
      params: the parameter tree (only shapes and dtypes are used), as given to :func:`plan`.
      scores: a pytree or flat ``{path: array}`` dict with the parameters' paths: float arrays of
        the leaf's shape for selected leaves (element scores; :class:`Channels` combines them by
        its norm), anything for the others (ignored).
      sparsity: a float32 scalar, concrete or TRACED (shapes stay static, so one compilation
        serves every value); inside ``jit`` it is clipped to ``[0, 1]`` (NaN counts as 0).
        Ignored for :class:`NM`.
      plan: from :func:`plan`.
      previous: ``None`` or a masks tree with the same paths. Weights pruned there stay pruned:
        they rank below every score, so the count stays exact while ``k`` is at least the number
        already pruned; if more were pruned before, they all stay pruned and nothing else is
        (N:M: a group keeps fewer than ``n``).

    Returns:
      The masks tree with ``params``' structure, plain arrays (no nnx ``Variable`` wrappers):
      bool arrays for selected leaves (and, with channel groups, every group member), ``True``
      elsewhere.

    >>> import jax, jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0, -4.0], [3.0, 2.0]])}
    >>> p = plan(params)
    >>> f = jax.jit(lambda s: masks_from_scores(params, params, s, p))
    >>> f(0.5)["kernel"].tolist()
    [[False, True], [True, False]]
    """
    pairs = jt.leaves_with_paths(params)
    selected = [bool(s) for s in jt.match_paths(params, plan.selection, name="selection")]
    score_leaves = jt.match_paths(params, scores, name="scores")
    if previous is None:
        prev_leaves = [None] * len(pairs)
    else:
        prev_leaves = jt.match_paths(params, previous, name="previous")
        prev_leaves = [
            None if (s and isinstance(p, bool | np.bool_) and p) else p
            for p, s in zip(prev_leaves, selected)
        ]
    entries = []
    for i, ((path, leaf), chosen) in enumerate(zip(pairs, selected)):
        if not chosen:
            continue
        score = jnp.asarray(score_leaves[i])
        if score.shape != tuple(np.shape(leaf)) or not jnp.issubdtype(score.dtype, jnp.floating):
            raise ValueError(
                f"{path}: scores must be a float array of the leaf's shape {np.shape(leaf)}, "
                f"got {score.dtype}{score.shape}"
            )
        entries.append((i, score, plan.roles[path], prev_leaves[i]))
    structure = plan.structure
    if sparsity is not None:
        sparsity = jnp.asarray(sparsity, jnp.float32)
    elif not isinstance(structure, NM):
        raise ValueError(f"{type(structure).__name__} pruning needs a sparsity, got None")
    if isinstance(structure, Unstructured):
        masks = _unstructured(entries, sparsity, plan.scope)
    elif isinstance(structure, NM):
        masks = _nm(entries, structure)
    elif structure.groups is None:
        masks = _channels(entries, sparsity, plan.scope, structure)
    else:
        masks = _channel_groups(
            pairs, dict((e[0], e[1]) for e in entries), prev_leaves, selected, sparsity, plan
        )
    leaves = [masks.get(i, True) for i in range(len(pairs))]
    return jax.tree_util.tree_unflatten(_unwrapped_structure(params, len(pairs)), leaves)


# ----------------------------------------------------------------------------------------------
# Public mask functions
# ----------------------------------------------------------------------------------------------


def _plan_with_sparsity(params, sparsity, what, **kwargs) -> Plan:
    p = plan(params, sparsity=sparsity, what=what, **kwargs)
    if sparsity is None and not isinstance(p.structure, NM):
        raise ValueError(f"{what} needs a sparsity in [0, 1), got None")
    return p


def _float_value(leaf: Any) -> jax.Array:
    return leaf.dequantize() if jt.is_compressed(leaf) else jnp.asarray(leaf)


def _selected_values(params: Params, p: Plan, what: str) -> dict[str, Any]:
    """``{path: value or None}``; selected values checked for NaN/Inf when concrete."""
    out = {}
    for (path, leaf), chosen in zip(
        jt.leaves_with_paths(params), jt.match_paths(params, p.selection, name="selection")
    ):
        if chosen:
            jt.check_finite(path, leaf, what=what)
            out[path] = _float_value(leaf)
        else:
            out[path] = None
    return out


def magnitude_masks(
    params: Params,
    sparsity: jax.typing.ArrayLike | None,
    *,
    scope: str = "layer",
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Masks removing the weights of smallest magnitude ``|w|`` (Han et al., 2015).

    Args:
      params: parameter pytree (linen dict, ``nnx.State``, Equinox arrays, ...).
      sparsity: fraction removed, in ``[0, 1)``; exactly ``round(float32(sparsity) * S)`` of each
        pool of ``S`` weights (channels for :class:`Channels`). ``None`` for :class:`NM`.
      scope: ``"layer"`` (each leaf and stacked slice on its own) or ``"global"`` (one threshold
        over every selected leaf; channels ranked by norms divided by their layer's mean channel
        norm).
      structure: ``Unstructured()`` (default), ``NM(n, m)`` or ``Channels(norm=..., groups=...)``.
      where: selection (:func:`jcompress.tree.select`); default: matmul/conv/gather kernels
        (matmul/conv for N:M and channels).
      roles: ``{path: Role}`` (:func:`jcompress.roles`); default: Flax layouts.

    Returns:
      Masks with the params' paths (plain arrays): bool arrays for selected leaves, ``True``
      elsewhere.

    Raises:
      ValueError: NaN/Inf in a selected leaf, sparsity outside ``[0, 1)``, a bad selection or
        role, an N:M axis not divisible by ``m`` (each naming the path and the fix).

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.array([[0.1, -3.0], [2.0, 0.5]]), "bias": jnp.ones(2)}}
    >>> masks = magnitude_masks(params, 0.5)
    >>> masks["Dense_0"]["kernel"].tolist(), masks["Dense_0"]["bias"]
    ([[False, True], [True, False]], True)
    """
    what = "magnitude pruning"
    p = _plan_with_sparsity(
        params, sparsity, what, structure=structure, scope=scope, where=where, roles=roles
    )
    return masks_from_scores(params, _selected_values(params, p, what), sparsity, p)


def _path_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def random_masks(
    key: jax.Array,
    params: Params,
    sparsity: jax.typing.ArrayLike | None,
    *,
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Masks removing uniformly random weights (exact counts per layer), seeded by ``key``.

    Each leaf's scores come from ``jax.random.fold_in(key, crc32(path))``, so a leaf's mask
    depends only on the key and its path: same key, same masks. Structures as in
    :func:`magnitude_masks` (random channel scores for :class:`Channels`).

    >>> import jax, jax.numpy as jnp
    >>> params = {"kernel": jnp.ones((4, 4))}
    >>> masks = random_masks(jax.random.key(0), params, 0.25)
    >>> int((~masks["kernel"]).sum())
    4
    """
    if key is None:
        raise TypeError("random_masks needs an explicit jax.random key, got None")
    p = _plan_with_sparsity(
        params, sparsity, "random pruning", structure=structure, where=where, roles=roles
    )
    scores = {
        path: jax.random.uniform(_path_key(key, path), np.shape(leaf), jnp.float32)
        if chosen
        else None
        for (path, leaf), chosen in zip(
            jt.leaves_with_paths(params), jt.match_paths(params, p.selection, name="selection")
        )
    }
    return masks_from_scores(params, scores, sparsity, p)


def saliency_masks(
    params: Params,
    grads: Params,
    sparsity: jax.typing.ArrayLike | None,
    *,
    scope: str = "layer",
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Masks removing the weights of smallest first-order saliency ``|w * g|``.

    The Taylor estimate of the loss change from zeroing a weight (Molchanov et al., 2017;
    SNIP, Lee et al., 2019, arXiv:1810.02340, uses the same score at initialisation). ``grads``
    has the params' paths (e.g. ``jax.grad(loss)(params)``). Other arguments as in
    :func:`magnitude_masks`.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> grads = {"kernel": jnp.array([[4.0, 0.1], [1.0, 0.0]])}
    >>> saliency_masks(params, grads, 0.5)["kernel"].tolist()
    [[True, False], [True, False]]
    """
    what = "saliency pruning"
    p = _plan_with_sparsity(
        params, sparsity, what, structure=structure, scope=scope, where=where, roles=roles
    )
    values = _selected_values(params, p, what)
    # Gradients exist for the array leaves only: a whole Equinox module's functions get `None`
    # from eqx.filter_grad, so they are matched against the params' arrays.
    arrays = jax.tree.map(
        lambda x: x if jt.is_array_leaf(x) else None, params, is_leaf=jt.is_compressed
    )
    array_paths = [path for path, _ in jt.leaves_with_paths(arrays)]
    grad_of = dict(zip(array_paths, jt.match_paths(arrays, grads, name="grads")))
    scores = {}
    for path, value in values.items():
        if value is None:
            scores[path] = None
            continue
        g = _float_value(grad_of[path])
        if g.shape != value.shape:
            raise ValueError(
                f"{path}: grads has shape {g.shape} but the parameter has {value.shape}; pass "
                "gradients of the same parameter tree"
            )
        if jt.is_concrete(g):
            try:
                jt.check_finite(path, g, what=what)
            except ValueError as e:
                raise ValueError(str(e).replace("in the weights", "in the gradients")) from None
        scores[path] = value.astype(jnp.float32) * g.astype(jnp.float32)
    return masks_from_scores(params, scores, sparsity, p)


def nm_masks(
    params: Params,
    *,
    n: int,
    m: int,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """N:M magnitude masks: ``magnitude_masks(params, None, structure=NM(n=n, m=m), ...)``.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0], [-4.0], [3.0], [2.0]])}
    >>> nm_masks(params, n=2, m=4)["kernel"][:, 0].tolist()
    [False, True, True, False]
    """
    return magnitude_masks(params, None, structure=NM(n=n, m=m), where=where, roles=roles)


def structured_masks(
    params: Params,
    sparsity: jax.typing.ArrayLike,
    *,
    norm: str = "l2",
    groups: Any = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
) -> Masks:
    """Output-channel masks by weight norm (Li et al., 2017), optionally over channel groups.

    ``magnitude_masks(params, sparsity, structure=Channels(norm=norm, groups=groups), ...)``.
    Masks of a ``(in, out)`` kernel have shape ``(1, out)``.

    With ``groups`` (from ``jc.structure.dependencies``), a group of coupled channels is pruned
    only when a **selected leaf owns it**, holding it on an output axis: ``where="up/kernel"``
    prunes ``up``'s output channels (and their coupled members: bias, ``down``'s input rows)
    but not the residual stream that ``up`` reads. A channel's score sums its norms over the
    group members that are selected leaves (owner columns and selected readers' rows);
    unselected members (biases, norm parameters) are masked with the group but do not score.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0, 0.1, 3.0], [1.0, 0.2, -3.0]])}
    >>> structured_masks(params, 0.34)["kernel"].tolist()
    [[True, False, True]]
    """
    return magnitude_masks(
        params, sparsity, structure=Channels(norm=norm, groups=groups), where=where, roles=roles
    )


# ----------------------------------------------------------------------------------------------
# Applying masks, measuring sparsity
# ----------------------------------------------------------------------------------------------


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
        if jt.is_compressed(leaf):
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

    return jt.map_with_paths(one, params, masks, names=["masks"])


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
    selection = jt.select(params, where, roles=roles, what="sparsity")
    zeros, total = [], 0
    for (_, leaf), chosen in zip(
        jt.leaves_with_paths(params), jt.match_paths(params, selection, name="selection")
    ):
        if chosen:
            value = _float_value(leaf)
            zeros.append(jnp.sum(value == 0, dtype=jnp.int32))
            total += int(np.prod(value.shape, dtype=np.int64))
    if total == 0:
        return 0.0
    if all(jt.is_concrete(z) for z in zeros):
        return sum(int(z) for z in zeros) / total
    return sum(z.astype(jnp.float32) for z in zeros) / jnp.float32(total)
