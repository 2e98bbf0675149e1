"""Paths, selection, roles, the compressed-leaf protocol and channel groups: the ground floor.

Every jcompress function names a parameter leaf by its *path*: the key path joined with ``/``
(``params/Dense_0/kernel``; the trailing ``.value`` of an ``nnx.Variable`` dropped). Trees that
should correspond (params, masks, roles, statistics) are matched by exact path, never by position.

This package imports nothing else from jcompress. One concept per module:

* ``_compressed``: :class:`Compressed`, the base class of compressed leaves (``QArray``, low-rank
  factors, ...), whose fields are declared with :func:`field`. Every jcompress tree walk treats
  a compressed node as one leaf; :func:`is_compressed` is the ``is_leaf=`` to pass to your own
  ``jax.tree.map``. ``_kinds``: the names under which checkpoints store leaf classes, filled in
  by the classes themselves.
* ``_paths``: :func:`path_str`, :func:`leaves_with_paths`, matching trees by path
  (:func:`match_paths`, :func:`match_by_path`, :func:`map_with_paths`).
* ``_forms``: tree forms (nnx ``Variable`` s: :func:`unwrap` / :func:`rewrap`; Equinox modules)
  and eager value checks (:func:`check_finite`).
* ``_roles``: :class:`Role`, what a leaf *is* (``matmul``, ``conv``, ``gather`` or ``other``) and
  which axes contract, index output channels, or stack separate layers; :func:`default_role`.
* ``_rules``: ordered per-leaf ``[(regex, value), ...]`` rules, the first ``re.fullmatch`` wins
  (:func:`parse_rules`, :func:`assign`): quantization specs and per-layer sparsities.
* ``_selection``: ``where=`` resolved once: :func:`selection` (a :class:`Selection` of paths,
  leaves, roles and the way back to a tree) and :func:`select` (the same as a bool pytree).
* ``_partition``: :func:`partition` / :func:`combine`: the trainable children of compressed
  leaves (codebook tables, low-rank factors, scales if asked) and float leaves, apart from the
  fixed integers, for ``jax.grad`` and optax.
* ``_groups``: :class:`Member` / :class:`Group`, plain data naming parameter axes that must
  lose the same channels together (filled in by ``jcompress.structure.dependencies``), and the
  index arithmetic between a group's channels and its members' indices.
"""

from jcompress.tree._compressed import Compressed, field, fields, is_compressed
from jcompress.tree._forms import (
    check_array_leaf,
    check_finite,
    describe_form,
    is_array_leaf,
    is_concrete,
    is_equinox_module,
    is_variable,
    rewrap,
    unwrap,
)
from jcompress.tree._groups import (
    Group,
    Member,
    MemberTable,
    channel_mask,
    member_table,
    per_channel,
)
from jcompress.tree._partition import combine, partition
from jcompress.tree._paths import (
    Params,
    common_prefix_hint,
    leaves_with_paths,
    map_with_paths,
    match_by_path,
    match_paths,
    path_str,
)
from jcompress.tree._roles import Role, default_role
from jcompress.tree._rules import Rule, assign, is_rules, parse_rules
from jcompress.tree._selection import (
    Selection,
    Where,
    resolve_roles,
    select,
    selected_paths,
    selection,
)

__all__ = [
    "Compressed",
    "Group",
    "Member",
    "MemberTable",
    "Params",
    "Role",
    "Rule",
    "Selection",
    "Where",
    "assign",
    "channel_mask",
    "check_array_leaf",
    "check_finite",
    "combine",
    "common_prefix_hint",
    "default_role",
    "describe_form",
    "field",
    "fields",
    "is_array_leaf",
    "is_compressed",
    "is_concrete",
    "is_equinox_module",
    "is_rules",
    "is_variable",
    "leaves_with_paths",
    "map_with_paths",
    "match_by_path",
    "match_paths",
    "member_table",
    "parse_rules",
    "partition",
    "path_str",
    "per_channel",
    "resolve_roles",
    "rewrap",
    "select",
    "selected_paths",
    "selection",
    "unwrap",
]
