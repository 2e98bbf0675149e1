"""The calibration driver: walk the batches, capture one layer's statistics at a time, hand
them to a method, rebuild the tree.

Every calibrated method that needs a forward pass (GPTQ, AWQ, SparseGPT) is a layer-level
function plus a few lines that call :func:`select_layers` (which leaves, with which roles,
checked eagerly before any pass) and :func:`calibrate` (the loop). Methods that take statistics
the user captured (Wanda, whitened low rank) share :func:`check_stats` and
:class:`~jcompress.calibration.LeafMatrices`. A new method is one file: see ARCHITECTURE.md.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jcompress import tree as jtree
from jcompress.calibration._matrices import LeafMatrices
from jcompress.tree import Role, leaves_with_paths, map_with_paths

__all__ = [
    "Layer",
    "accumulate",
    "calibrate",
    "check_batches",
    "check_stats",
    "roles_from_fn",
    "select_layers",
]


class Layer(NamedTuple):
    """What a method's ``compress(path, leaf, stats)`` returns for one leaf.

    Attributes:
      leaf: what replaces the leaf in the returned tree (a ``QArray``, pruned weights, ...).
      value: its float value, the leaf's stand-in when later layers calibrate on the compressed
        outputs of earlier ones (``sequential=True``).
      extra: anything else the method hands back per leaf (SparseGPT: its mask), or ``None``.
    """

    leaf: Any
    value: Any
    extra: Any = None


def check_stats(paths: list[str], stats: Any, what: str) -> None:
    """Raise ``ValueError`` naming every selected path that ``stats`` lacks."""
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"{what} needs stats as the {{path: InputStats}} dict from jc.capture, got "
            f"{type(stats).__name__}"
        )
    missing = [p for p in paths if p not in stats]
    if missing:
        lines = []
        for p in missing[:5]:
            near = difflib.get_close_matches(p, list(stats), n=3, cutoff=0.5)
            lines.append(f"{p!r}" + (f" (nearest: {near})" if near else ""))
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{what}: no input statistics for the selected leaves {', '.join(lines)}{more}; "
            "capture them with jc.capture(fn, params, *batch) on the same params (a leaf that "
            "fn never multiplies has none: exclude it with where=)"
            + jtree.common_prefix_hint(missing, list(stats))
        )


def _arguments(batch: Any) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


def accumulate(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    what: str,
    *,
    paths: Collection[str] | None = None,
    gram: bool = True,
) -> dict:
    """``{path: InputStats}`` merged over every batch of ``batches`` (Gram matrices of the
    leaves at ``paths`` only, or of every leaf with ``paths=None``)."""
    from jcompress.runtime import capture  # calibration imports runtime, never the reverse

    total = None
    for batch in batches:
        stats = capture(fn, params, *_arguments(batch), gram=gram, paths=paths)
        total = stats if total is None else {k: total[k].merge(v) for k, v in stats.items()}
    if total is None:
        raise ValueError(
            f"{what}: batches gave no batch; pass a re-iterable of argument tuples (a list, "
            "not a generator: calibration walks it once per layer)"
        )
    return total


def _pass_groups(order: list[str], layers_per_pass: int | None) -> list[list[str]]:
    if layers_per_pass is None:
        return [order] if order else []
    return [order[i : i + layers_per_pass] for i in range(0, len(order), layers_per_pass)]


def roles_from_fn(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    roles: Mapping[str, Role] | None,
    what: str,
) -> Mapping[str, Role] | None:
    """``roles``, or (``None``) the roles ``fn`` gives every leaf on the first batch.

    Calibrated methods trace ``fn`` anyway, so by default they read each leaf's axes from its
    jaxpr (:func:`jcompress.roles`) instead of assuming Flax layouts: a GPT-2 ``(out, in)``
    kernel or an Equinox ``weight`` gets its true contracting axis. ``None`` comes back when
    ``batches`` is empty (the caller's batch check names that).
    """
    if roles is not None:
        return roles
    from jcompress.runtime import roles as infer_roles  # calibration imports runtime

    if iter(batches) is batches:
        return None  # check_batches names the one-shot iterator
    first = next(iter(batches), None)
    if first is None:
        return None
    try:
        inferred = dict(infer_roles(fn, params, *_arguments(first)))
    except ValueError as e:
        raise ValueError(
            f"{what}: could not read the roles of the parameters from fn's jaxpr ({e}); pass "
            "roles= explicitly: jc.roles(fn, params, *args) on an unambiguous call, or "
            "{path: jc.Role(...)} written by hand"
        ) from e
    # A Flax-named kernel that fn never multiplies keeps its default role, so the default
    # selection still picks it and the missing statistics are an error naming it.
    for path, leaf in leaves_with_paths(params):
        role = inferred.get(path)
        if role is None or role.kind == "other":
            default = jtree.default_role(path, leaf)
            if default is not None and default.kind in ("matmul", "conv"):
                inferred[path] = default
    return inferred


def check_batches(batches: Any, layers_per_pass: Any, what: str) -> None:
    """``batches`` must be re-iterable; ``layers_per_pass`` a positive int or ``None``."""
    if iter(batches) is batches:
        raise ValueError(
            f"{what}: batches is a one-shot iterator ({type(batches).__name__}); calibration "
            "walks the batches once per pass over the layers: pass a re-iterable of argument "
            "tuples (a list)"
        )
    if layers_per_pass is not None and (
        isinstance(layers_per_pass, bool)
        or not isinstance(layers_per_pass, int)
        or layers_per_pass < 1
    ):
        raise ValueError(
            f"{what}: layers_per_pass must be a positive int (Gram matrices held at once) or "
            f"None (every layer in one pass), got {layers_per_pass!r}"
        )


def select_layers(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    *,
    where: jtree.Where,
    roles: Mapping[str, Role] | None,
    what: str,
) -> jtree.Selection:
    """The leaves a calibrated method compresses, each with its role, checked eagerly.

    Roles come from ``fn``'s jaxpr unless given (:func:`roles_from_fn`); the default selection is
    every floating matmul/conv leaf; each selected leaf must be finite and lay out as stacked
    ``(in, out)`` matrices. Returns the :class:`~jcompress.tree.Selection` (its ``roles`` are
    the resolved roles of the selected leaves).
    """
    roles = roles_from_fn(fn, params, batches, roles, what)
    chosen = jtree.selection(params, where, roles=roles, kinds=("matmul", "conv"), what=what)
    for path, role in chosen.roles.items():
        leaf = chosen.leaves[path]
        jtree.check_finite(path, leaf, what=what)
        LeafMatrices.of(path, np.shape(leaf), role)
    return chosen


def calibrate(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    paths: Sequence[str],
    compress: Callable[[str, Any, Any], Layer],
    *,
    what: str,
    sequential: bool = False,
    layers_per_pass: int | None = 1,
    quiet: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Calibrate and compress the leaves at ``paths``: ``(new_params, {path: extra})``.

    ``compress(path, leaf, stats) -> Layer``. The leaves are taken in the order ``fn`` consumes
    them (found by one forward pass on the first batch, without Gram matrices),
    ``layers_per_pass`` at a time: each group's Gram matrices are accumulated by one walk over
    ``batches`` with ``jc.capture(..., paths=group)``, so at most ``layers_per_pass`` Gram
    matrices are alive (``None``: one walk for every leaf, all Grams at once, the fastest and
    most memory). Cost: ``ceil(L / layers_per_pass)`` walks over the batches (plus one forward
    pass), each a separately compiled program. Sequential mode: each group is calibrated on the
    outputs of the already-compressed earlier groups (``Layer.value`` replaces the leaf);
    otherwise on the original ``params``. ``new_params`` has ``params``' structure (nnx
    ``Variable`` s kept) with ``Layer.leaf`` at ``paths``.
    """
    from rich.progress import track

    from jcompress.runtime import capture

    check_batches(batches, layers_per_pass, what)
    first = next(iter(batches), None)
    if first is None:
        accumulate(fn, params, batches, what)  # raises "no batch"
    chosen = set(paths)
    seen = capture(fn, params, *_arguments(first), paths=chosen)
    check_stats(list(paths), seen, what)
    order = [p for p in seen if p in chosen]
    leaves = dict(leaves_with_paths(params))
    results: dict[str, Layer] = {}
    current = params
    groups = _pass_groups(order, layers_per_pass)
    for group in track(groups, description=what, disable=quiet, transient=True):
        stats = accumulate(fn, current if sequential else params, batches, what, paths=group)
        for path in group:
            results[path] = layer = compress(path, leaves[path], stats.pop(path))  # frees it
            if sequential:
                current = map_with_paths(
                    lambda p, x, v=layer.value, q=path: v if p == q else x, current
                )
    new = map_with_paths(lambda p, x: results[p].leaf if p in results else x, params)
    return new, {p: r.extra for p, r in results.items()}
