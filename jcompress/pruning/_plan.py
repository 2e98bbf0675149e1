"""Pruning plans: eager validation of what gets pruned and how, before any score is computed.

A :class:`Plan` is the static part of every mask function (and of ``prune``'s state): the
selection, the roles of the selected leaves, the structure and the scope, checked once on
concrete shapes (N:M divisibility, channel axes and groups, the sparsity's range) so that the
jittable part (:func:`jcompress.pruning._masks.masks_from_scores`) only ranks scores.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np

from jcompress import tree as jtree
from jcompress.pruning._groups import owned_groups
from jcompress.pruning._structures import NM, Channels, Structure, Unstructured
from jcompress.tree import Params, Role, Where

__all__ = [
    "Plan",
    "SparsityRules",
    "by_rules",
    "check_fraction",
    "check_nm_size",
    "check_rule_structure",
    "check_sparsity",
    "first_pruned",
    "only",
    "plan",
    "plan_selection",
    "rule_sparsities",
    "takes_rules",
]

SCOPES = ("layer", "global")


@dataclasses.dataclass(frozen=True)
class Plan:
    """An eager, static description of what gets pruned and how (from :func:`plan`).

    Attributes:
      selection: bool pytree with the parameters' structure (:func:`jcompress.tree.select`).
      roles: ``{path: Role}`` for the selected leaves (:func:`jcompress.tree.resolve_roles`);
        its keys are the selected paths.
      structure: ``Unstructured()``, ``NM(n, m)`` or ``Channels(...)``.
      scope: ``"layer"`` (each leaf, each stacked slice, its own count) or ``"global"`` (one
        count and one threshold over every selected leaf).
    """

    selection: Any
    roles: dict
    structure: Any
    scope: str


def _kinds(structure: Structure) -> tuple[str, ...]:
    return (
        ("matmul", "conv", "gather") if isinstance(structure, Unstructured) else ("matmul", "conv")
    )


def check_sparsity(
    sparsity: Any, structure: Structure, *, what: str = "pruning", required: bool = False
) -> None:
    """Raise unless ``sparsity`` fits ``structure``: a number in ``[0, 1)`` (checked when
    concrete; a traced value is clipped by :func:`~jcompress.pruning._threshold.exact_count`),
    ``None`` or ``n/m`` for :class:`NM`; ``None`` elsewhere only when not ``required``."""
    if sparsity is None:
        if required and not isinstance(structure, NM):
            raise ValueError(f"{what} needs a sparsity in [0, 1), got None")
        return  # the caller passes it later (masks_from_scores); NM needs none
    if isinstance(sparsity, Unstructured | NM | Channels):
        raise TypeError(
            f"sparsity must be a number, got the structure {sparsity!r}; pass it as "
            f"structure={sparsity!r} (with sparsity=None for NM)"
        )
    if not jtree.is_concrete(sparsity):
        return  # traced: checked by the caller's flag, clipped to [0, 1] by exact_count
    if np.ndim(sparsity) != 0:
        raise ValueError(f"sparsity must be a scalar, got shape {np.shape(sparsity)}")
    value = float(sparsity)
    if isinstance(structure, NM):
        if abs(value - structure.sparsity) > 1e-6:
            raise ValueError(
                f"NM(n={structure.n}, m={structure.m}) prunes {structure.sparsity:g} of the "
                f"weights, but sparsity={value:g} was given; pass sparsity=None (or "
                f"{structure.sparsity:g})"
            )
        return
    check_fraction(value)


def check_fraction(value: float, name: str = "sparsity") -> float:
    """``float(value)``, raising a ``ValueError`` naming ``name`` unless it is in ``[0, 1)``
    (NaN included): the one range check of every sparsity argument.

    >>> check_fraction(0.9)
    0.9
    """
    value = float(value)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(
            f"{name} must be in [0, 1) (the fraction of weights removed), got {value!r}; for "
            "90% sparsity pass 0.9"
        )
    return value


def _check_nm(path: str, shape: tuple[int, ...], role: Role, nm: NM) -> None:
    if role.kind not in ("matmul", "conv") or not role.contracting:
        raise ValueError(
            f"{path}: {nm.n}:{nm.m} sparsity needs a matmul/conv leaf with a contracting axis, "
            f"got role {role}; pass roles= (jc.roles) or exclude it with where="
        )
    check_nm_size(path, shape[role.group_axis], nm)


def check_nm_size(path: str, size: int, nm: NM) -> None:
    """Raise unless the contracting axis (``size``) splits into groups of ``m``."""
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


def _check_structure(structure: Any, scope: str) -> Structure:
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
    return structure


def plan_selection(
    params: Params,
    *,
    structure: Structure | None = None,
    scope: str = "layer",
    where: Where | jtree.Selection = None,
    roles: Mapping[str, Role] | None = None,
    sparsity: Any = None,
    what: str = "pruning",
    kinds: Iterable[str] | None = None,
    require_sparsity: bool = False,
) -> tuple[Plan, jtree.Selection]:
    """:func:`plan`, and the :class:`~jcompress.tree.Selection` it was made from.

    ``where`` may be a ready :class:`~jcompress.tree.Selection` of ``params`` (a calibrated
    method's layers); ``kinds`` overrides the structure's default kinds; ``require_sparsity``
    makes a ``None`` sparsity an error (except for :class:`NM`).
    """
    structure = _check_structure(structure, scope)
    check_sparsity(sparsity, structure, what=what, required=require_sparsity)
    if isinstance(where, jtree.Selection):
        chosen = where
    else:
        kinds = _kinds(structure) if kinds is None else tuple(kinds)
        chosen = jtree.selection(params, where, roles=roles, kinds=kinds, what=what)
    resolved = chosen.roles
    for path, leaf in chosen.leaves.items():
        if isinstance(structure, NM):
            _check_nm(path, tuple(np.shape(leaf)), resolved[path], structure)
        elif isinstance(structure, Channels):
            _check_channels(path, resolved[path])
    if isinstance(structure, Channels) and structure.groups is not None:
        selected = [p in resolved for p in chosen.all_paths]
        if not owned_groups(chosen.pairs, selected, structure.groups, resolved):
            blocked = [g.blocked for g in structure.groups if g.blocked is not None]
            raise ValueError(
                f"{what}: no prunable channel group is owned by a selected leaf (a group is "
                "pruned only through a selected leaf holding it on its output axis; "
                f"{len(structure.groups)} groups, {len(blocked)} blocked"
                + (f", e.g. {blocked[0]!r}" if blocked else "")
                + "); widen where= or compute groups with jc.structure.dependencies"
            )
    selection = chosen.unflatten({p: True for p in chosen.paths}, default=False)
    return Plan(selection=selection, roles=resolved, structure=structure, scope=scope), chosen


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

    Checks the selection (:func:`jcompress.tree.selection`; kinds matmul/conv/gather for
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
    return plan_selection(
        params,
        structure=structure,
        scope=scope,
        where=where,
        roles=roles,
        sparsity=sparsity,
        what=what,
    )[0]


SparsityRules: TypeAlias = Sequence[tuple[str, "float | NM | None"]]
"""Ordered per-layer sparsities ``[(regex, sparsity | NM | None), ...]``: the first
``re.fullmatch`` on a leaf's path wins; ``None`` leaves the leaf dense."""


def _rule_value(i: int, regex: str, value: Any) -> Any:
    if value is None or isinstance(value, NM):
        return value
    numeric = jtree.is_concrete(value) and not isinstance(value, str | bytes)
    if isinstance(value, Unstructured | Channels) or not (
        numeric and np.issubdtype(np.asarray(value).dtype, np.number)
    ):
        raise TypeError(
            f"rule {i} ({regex!r}): a per-layer sparsity must be a number in [0, 1), NM(n, m) or "
            f"None, got {value!r}"
        )
    if np.ndim(value) != 0:
        raise ValueError(f"rule {i} ({regex!r}): the sparsity must be a scalar, got {value!r}")
    return check_fraction(value, f"rule {i} ({regex!r}): the sparsity")


def check_rule_structure(
    structure: Structure | None, scope: str, *, what: str, rules_of: str, one: str
) -> Structure:
    """The structure, checked for per-layer rules of any kind (sparsities, schedules): they need
    ``scope="layer"`` (a global threshold ranks every leaf against one target) and no channel
    ``groups`` (a group spans several leaves). ``rules_of`` / ``one`` name the rules' values in
    the messages."""
    base = _check_structure(structure, scope)
    if scope != "layer":
        raise ValueError(
            f"{what}: per-layer {rules_of} rules need scope='layer' (got {scope!r}); a global "
            f"threshold ranks every leaf against one target, so pass one {one} for that"
        )
    if isinstance(base, Channels) and base.groups is not None:
        raise ValueError(
            f"{what}: per-layer {rules_of} rules cannot prune channel groups (a group spans "
            f"several leaves); pass one {one}, or rules without groups="
        )
    return base


def rule_sparsities(
    chosen: jtree.Selection, rules: Any, *, structure: Structure | None, scope: str, what: str
) -> dict[Any, tuple[str, ...]]:
    """``{value: paths}``: the selected paths each per-layer sparsity rule value wins, in tree
    order (``None`` values, which keep their leaves dense, left out).

    Rules need ``scope="layer"`` (a global threshold across leaves of different sparsities has no
    meaning) and no channel ``groups`` (a group spans several leaves); an ``NM(n, m)`` value goes
    with the default unstructured structure.

    Raises:
      TypeError / ValueError: a malformed rule, a rule winning no leaf, every leaf left dense,
        ``scope="global"``, channel groups, ``structure=NM`` or an ``NM`` rule with channels;
        each naming the rule and the fix.
    """
    base = check_rule_structure(structure, scope, what=what, rules_of="sparsity", one="sparsity")
    if isinstance(base, NM):
        raise ValueError(
            f"{what}: structure=NM fixes each leaf's sparsity; put NM(n, m) in the rules instead "
            "(e.g. [('.*attn.*', NM(2, 4)), ('.*', 0.5)])"
        )
    parsed = jtree.parse_rules(rules, check=_rule_value, kind="sparsity | NM | None")
    assigned = jtree.assign(chosen.paths, parsed, what=what, all_paths=list(chosen.all_paths))
    by_value: dict[Any, list[str]] = {}
    for path, value in assigned.items():
        if value is not None:
            by_value.setdefault(value, []).append(path)
    if not by_value:
        raise ValueError(
            f"{what}: every selected leaf is left dense by the rules (None); nothing to prune"
        )
    for value in by_value:
        if isinstance(value, NM) and not isinstance(base, Unstructured):
            raise ValueError(
                f"{what}: the rule value {value!r} is N:M but structure={base!r}; N:M rules go "
                "with the default unstructured structure"
            )
    return {value: tuple(paths) for value, paths in by_value.items()}


def by_rules(
    masks_for: Any,
    params: Params,
    rules: Any,
    *,
    structure: Structure | None,
    scope: str,
    where: Where,
    roles: Mapping[str, Role] | None,
    what: str,
    kinds: Iterable[str] | None = None,
) -> Any:
    """Masks for ordered per-layer sparsity rules (:func:`rule_sparsities`), built from one call
    per distinct value.

    ``masks_for(sparsity, structure, paths)`` is the criterion itself (e.g. ``magnitude_masks``
    with ``where=only(paths)`` and its other arguments fixed); it is called once per distinct
    rule value with the paths that value wins (in tree order), and the masks are merged (each
    selected leaf is pruned by exactly one call; ``None`` rules leave theirs dense). An
    ``NM(n, m)`` value prunes its leaves N:M.
    """
    base = _check_structure(structure, scope)
    kinds = _kinds(base) if kinds is None else tuple(kinds)
    chosen = jtree.selection(params, where, roles=roles, kinds=kinds, what=what)
    groups = rule_sparsities(chosen, rules, structure=base, scope=scope, what=what)
    parts = []
    for value, paths in groups.items():
        nm = isinstance(value, NM)
        parts.append(masks_for(None if nm else value, value if nm else base, paths))
    return jax.tree.map(first_pruned, *parts)


def takes_rules(what: str, *, kinds: Iterable[str] | None = None, narrow: Any = None) -> Any:
    """Decorate a mask criterion so that its ``sparsity`` may be per-layer rules (:func:`by_rules`).

    The criterion must name its arguments ``params``, ``sparsity``, ``where``, ``roles`` (and
    ``structure`` / ``scope`` where it has them); with rules it is called once per rule value with
    ``sparsity``, ``structure`` and ``where`` replaced. ``narrow(arguments, paths)`` may adjust
    the other arguments to the narrowed paths (a flat score dict).
    """

    def decorate(criterion: Any) -> Any:
        signature = inspect.signature(criterion)

        @functools.wraps(criterion)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            if not jtree.is_rules(given["sparsity"]):
                return criterion(*args, **kwargs)

            def masks_for(sparsity: Any, structure: Any, paths: tuple[str, ...]) -> Any:
                call = dict(given, sparsity=sparsity, where=only(paths))
                if "structure" in call:
                    call["structure"] = structure
                if narrow is not None:
                    call = narrow(call, paths)
                return criterion(**call)

            return by_rules(
                masks_for,
                given["params"],
                given["sparsity"],
                structure=given.get("structure"),
                scope=given.get("scope", "layer"),
                where=given["where"],
                roles=given["roles"],
                what=what,
                kinds=kinds,
            )

        return wrapper

    return decorate


def only(paths: Iterable[str]) -> Any:
    """A ``where=`` callable selecting exactly ``paths``."""
    wins = frozenset(paths)
    return lambda path, _leaf: path in wins


def first_pruned(*masks: Any) -> Any:
    """The one mask of a leaf that some rule pruned, else ``True`` (kept)."""
    for m in masks:
        if not (isinstance(m, bool | np.bool_) and m):
            return m
    return True
