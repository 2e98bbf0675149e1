"""``shrink``: physically remove pruned channels, and run the function at the smaller shapes.

Channels whose group mask is entirely zero are removed from every member of the group (kernel
columns, bias, norm parameters and statistics, the next layer's rows). Flax linen checks parameter
shapes against module attributes at ``apply`` time, so the smaller function cannot simply re-run
``fn``: ``small_fn`` re-interprets ``fn``'s jaxpr (traced at the original shapes) on the runtime's
jaxpr walker, re-emitting every equation with the smaller shapes (``reshape``, ``broadcast_in_dim``,
``slice``, ``gather`` and ``dynamic_slice`` sizes, depthwise ``feature_group_count``; a grouped
convolution keeps its ``feature_group_count`` and gets its kernel rows gathered per group;
GroupNorm's reshape gets the new number of groups; a ``scan`` is re-emitted with its body at
the smaller shapes). The result is an ordinary JAX function of
``(small_params, *args)``: jit it, differentiate it, vmap it; a new input shape re-traces ``fn``
once (cached per shape).

Inlined sub-jaxprs lose their custom derivative rules in ``small_fn`` (``jax.nn.relu``'s
custom JVP becomes the derivative of ``max(x, 0)``, which differs only exactly at 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.runtime import _interpret as ip
from jcompress.runtime._trace import signature
from jcompress.structure._graph import Dependencies, Fact, analyze, dependencies
from jcompress.tree import Group, Member, Params, member_table, per_channel

__all__ = ["shrink", "shrink_linen", "shrink_nnx"]


def _member_alive(mask: Any, shape: tuple[int, ...], member: Member, size: int) -> np.ndarray:
    """Per channel of the group: does ``mask`` keep anything of it in this member? ``(size,)``."""
    m = np.asarray(mask, bool)
    if m.ndim == 0:
        return np.full(size, bool(m))
    table = member_table(member, size, shape)
    return per_channel(np.broadcast_to(m, shape), table, np.any)


def _member_scores(leaf: Any, member: Member, size: int) -> np.ndarray:
    """Per channel, the sum of squares of the member's weights ``(size,)``."""
    x = np.asarray(leaf).astype(np.float32)
    return per_channel(x * x, member_table(member, size, x.shape), np.sum)


def _revive(dead: np.ndarray, score: np.ndarray, group: Group, round_to: int) -> np.ndarray:
    """``dead`` with the highest-scored channels of each block revived, so the kept width is a
    multiple of ``round_to`` (or full), equal in every block."""
    per = group.size // group.blocks
    kept = per - len(dead) // group.blocks
    extra = 0
    while (kept + extra) * group.blocks % round_to and kept + extra < per:
        extra += 1
    if not extra:
        return dead
    out = []
    in_block = group.block_of(dead)
    for b in range(group.blocks):
        d = dead[in_block == b]
        out.append(np.setdiff1d(d, d[np.argsort(-score[d], kind="stable")[:extra]]))
    return np.concatenate(out)


def _removed(
    groups: list[Group], leaves: dict[str, Any], masks: dict[str, Any], round_to: int
) -> dict[Group, np.ndarray]:
    """``{group: removed channel indices}`` for every prunable group losing channels."""
    prunable = [g for g in groups if g.blocked is None and g.size > 0]
    alive = {
        g: [
            _member_alive(masks[m.path], tuple(np.shape(leaves[m.path])), m, g.size)
            for m in g.members
        ]
        for g in prunable
    }
    for g in prunable:
        if not np.any(alive[g]):
            raise ValueError(
                f"the masks remove every one of the {g.size} channels of the group "
                f"{[m.path for m in g.members]}: the layer would vanish; prune a smaller "
                "fraction or exclude it with where="
            )
    out = {}
    for g in prunable:
        any_alive = np.any(alive[g], axis=0)
        all_alive = np.all(alive[g], axis=0)
        if not np.array_equal(any_alive, all_alive):
            c = int(np.flatnonzero(any_alive != all_alive)[0])
            dead = [f"{m.path} (axis {m.axis})" for m, a in zip(g.members, alive[g]) if not a[c]]
            kept = [f"{m.path} (axis {m.axis})" for m, a in zip(g.members, alive[g]) if a[c]]
            raise ValueError(
                f"masks disagree within a channel group of {g.size} channels: channel {c} is "
                f"removed in {dead} but kept in {kept}; build the masks with "
                "structured_masks(..., groups=jc.structure.dependencies(fn, params, *args)) so "
                "they cover every member"
            )
        if all_alive.all():
            continue
        dead = np.flatnonzero(~all_alive)
        counts = g.per_block(dead)
        if np.any(counts != counts[0]):
            raise ValueError(
                f"masks remove {counts.tolist()} channels from the {g.blocks} blocks of a group "
                f"of {g.size} channels (members {list(g.paths)}); a grouped convolution "
                "keeps one width per group, so every block must lose the same number; build "
                "the masks with structured_masks(..., groups=...), which ranks within each block"
            )
        if round_to > 1:
            score = sum(_member_scores(leaves[m.path], m, g.size) for m in g.members)
            dead = _revive(dead, score, g, round_to)
        if len(dead):
            out[g] = dead
    return out


def _drop_indices(removed: dict[Group, np.ndarray], shapes: dict[str, tuple]) -> dict:
    """``{(path, axis, block_axis, blocks): (blocks, removed indices along axis per block)}``.

    ``block_axis`` is ``None`` and ``blocks`` 1 for plain members (the same indices everywhere).
    """
    out: dict[tuple, list[set[int]]] = {}
    for g, dead in removed.items():
        for m in g.members:
            table = member_table(m, g.size, shapes[m.path])
            key = (m.path, m.axis, table.block_axis if m.blocks > 1 else None, m.blocks)
            sets = out.setdefault(key, [set() for _ in range(m.blocks)])
            for s, indices in zip(sets, table.occupied(dead)):
                s.update(indices.tolist())
    return {k: [np.array(sorted(s), np.int64) for s in v] for k, v in out.items()}


def _shrink_leaf(leaf: Any, mask: Any, drops: list[tuple]) -> jax.Array:
    """``leaf`` masked (``where(mask, leaf, 0)``) and with the ``drops`` indices removed.

    ``drops``: ``(axis, block_axis, removed indices per block)``; per-block removals (a grouped
    convolution kernel's input rows) are gathered block by block first, on the original
    columns. NumPy on concrete values (no XLA compile per shape), ``jnp`` otherwise.
    """
    xp = np if jtree.is_concrete(leaf) else jnp
    x = xp.asarray(leaf)
    m = np.asarray(mask, bool)
    if m.ndim or not m:
        x = xp.where(np.broadcast_to(m, x.shape), x, xp.zeros((), x.dtype))
    for axis, block_axis, per_block in sorted(drops, key=lambda d: d[1] is None):
        if block_axis is None:
            [idx] = per_block
            x = xp.take(x, np.setdiff1d(np.arange(x.shape[axis]), idx), axis=axis)
            continue
        parts = xp.split(x, len(per_block), axis=block_axis)
        x = xp.concatenate(
            [
                xp.take(part, np.setdiff1d(np.arange(x.shape[axis]), idx), axis=axis)
                for part, idx in zip(parts, per_block)
            ],
            axis=block_axis,
        )
    return jnp.asarray(x, dtype=leaf.dtype)


# ----------------------------------------------------------------------------------------------
# Re-emitting the jaxpr at the smaller shapes
# ----------------------------------------------------------------------------------------------


class _Program:
    """``fn`` traced at one input signature (original parameter shapes), with its groups."""

    def __init__(self, fn, param_structs, args, removed_by_members, order):
        self.traced, deps = analyze(fn, param_structs, args)
        self.spaces = deps.spaces
        self.removed: dict[int, np.ndarray] = {}
        for root, g in deps.spaces.groups(order).items():
            key = frozenset(g.members)
            if key in removed_by_members:
                self.removed[root] = removed_by_members[key]
            elif g.blocked is None and any(k & key for k in removed_by_members):
                raise ValueError(
                    "fn's channel groups at these input shapes differ from those shrink() "
                    f"analysed (a group of members {sorted(m.path for m in key)}); call shrink "
                    "again with example inputs of these shapes"
                )

    def removed_count(self, layout: tuple, n: int) -> int:
        gone: set[int] = set()
        for seg in layout:
            root = self.spaces.find(seg.space)
            dead = self.removed.get(root)
            if dead is None:
                continue
            units = self.spaces.units[root]
            width = self.spaces.size[seg.space] // units
            if self.spaces.layers(root) > 1:  # one layer's channels (every layer loses as many)
                dead = dead[dead < units]
            for c in dead:
                for start in range(seg.offset + int(c) * width, seg.offset + (int(c) + 1) * width):
                    gone.update(range(start, n, seg.stride) if seg.stride else (start,))
        return len(gone)


class _Shrinker(Dependencies):
    """Re-runs the analysis (same space ids) while binding equations at the smaller shapes."""

    def __init__(self, program: _Program, small_shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.program = program
        self.small_shapes = small_shapes

    def _shape(self, old: tuple[int, ...], fact: Fact | None) -> tuple[int, ...]:
        if fact is None:
            return tuple(old)
        new = []
        for n, f in zip(old, fact.axes):
            if isinstance(f, tuple):
                n = n - self.program.removed_count(f, n)
            elif isinstance(f, frozenset):
                path, axis = min(f)
                n = self.small_shapes[path][axis]
            new.append(int(n))
        return tuple(new)

    def bind(self, eqn, invals, outfacts):
        name = eqn.primitive.name
        new = [self._shape(tuple(v.aval.shape), f) for v, f in zip(eqn.outvars, outfacts)]
        params = dict(eqn.params)
        old_in = tuple(eqn.invars[0].aval.shape) if eqn.invars else ()
        new_in = tuple(np.shape(invals[0])) if invals else ()
        if name == "reshape":
            params["new_sizes"] = new[0]
        elif name == "broadcast_in_dim":
            params["shape"] = new[0]
        elif name in ("gather", "dynamic_slice"):
            params["slice_sizes"] = tuple(
                b if s == a else s for s, a, b in zip(params["slice_sizes"], old_in, new_in)
            )
        elif name == "slice":
            params["limit_indices"] = tuple(
                b if (lim == a and st == 0) else lim
                for st, lim, a, b in zip(
                    params["start_indices"], params["limit_indices"], old_in, new_in
                )
            )
        elif name == "conv_general_dilated" and params["feature_group_count"] > 1:
            dn = params["dimension_numbers"]
            kernel = eqn.invars[1].aval.shape
            if kernel[dn.rhs_spec[1]] == 1 and kernel[dn.rhs_spec[0]] == old_in[dn.lhs_spec[1]]:
                params["feature_group_count"] = new_in[dn.lhs_spec[1]]  # depthwise: per channel
            # a grouped convolution keeps its groups (each lost equally many channels)
        outs = ip.bind(eqn.replace(params=params), invals)
        for o, n in zip(outs, new):
            if tuple(np.shape(o)) != n:
                raise ValueError(
                    f"shrink: {name} gave shape {tuple(np.shape(o))} where {n} was expected; "
                    "this layout is not supported by shrink (please report it)"
                )
        return outs


def _signature(args: tuple) -> tuple:
    key = signature(args)
    for x in jax.tree.leaves(args, is_leaf=jtree.is_compressed):
        if not ip.is_array_like(x):
            try:
                hash(x)
            except TypeError:
                raise TypeError(
                    f"small_fn: a non-array argument of type {type(x).__name__} is not hashable; "
                    "non-array arguments are static and must be hashable"
                ) from None
    return key


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if ip.is_array_like(x) else x,
        tree,
        is_leaf=jtree.is_compressed,
    )


def _small_fn(fn, param_structs, removed, order) -> Callable[..., Any]:
    by_members = {frozenset(g.members): dead for g, dead in removed.items()}
    cache: dict[Any, _Program] = {}

    def small_fn(small_params: Params, *args: Any) -> Any:
        key = _signature(args)
        if key not in cache:
            cache[key] = _Program(fn, param_structs, _abstract(args), by_members, order)
        program = cache[key]
        flat, _ = jax.tree_util.tree_flatten(
            ((small_params, *args), {}), is_leaf=jtree.is_compressed
        )
        leaves = [x for x in flat if ip.is_array_like(x)]
        shapes = {p: tuple(np.shape(x)) for p, x in jtree.leaves_with_paths(small_params)}
        runner = _Shrinker(program, shapes)
        outs, _ = runner.run(program.traced.jaxpr, leaves, runner.initial(program.traced))
        return jax.tree_util.tree_unflatten(program.traced.out_tree, outs)

    small_fn.cache = cache  # type: ignore[attr-defined]
    return small_fn


def shrink(
    fn: Callable[..., Any],
    params: Params,
    masks: Params,
    *args: Any,
    round_to: int = 1,
) -> tuple[Callable[..., Any], Params]:
    """Remove every channel whose group mask is entirely zero, and everything coupled to it.

    Channel groups come from :func:`jcompress.structure.dependencies` (``fn(params, *args)``);
    make the masks with ``structured_masks(params, s, groups=dependencies(fn, params, *args))``
    (or ``prune(..., structure=Channels(groups=...))``) so they cover every member. Blocked groups
    keep every channel. Zeros the masks leave inside kept channels stay zeros.

    ``shrink`` removes exactly what the masks say; which groups the masks prune is decided when
    they are made: ``structured_masks(..., where=...)`` prunes a group only through a selected
    leaf that owns it (holds it on an output axis), scoring each channel over the members that
    are selected leaves. A leaf that only reads a group (a residual stream entering ``up``)
    neither selects nor loses it.

    Args:
      fn: ``fn(params, *args)``; for linen ``lambda v, x: model.apply(v, x)`` with the whole
        variables dict (``batch_stats`` included) and the inference-mode model.
      params: the parameter tree (concrete arrays; linen dict, ``nnx.State``, nested dicts).
      masks: bool masks with ``params``' paths (``True`` for unmasked leaves).
      *args: example inputs (arrays or ``jax.ShapeDtypeStruct`` s).
      round_to: keep every shrunken group's width a multiple of this (or its full width),
        keeping back the removed channels of highest weight norm over the members (with their
        masked values: ``small_fn`` still equals the masked model; fine-tuning can revive them).

    Returns:
      ``(small_fn, small_params)``: ``small_fn(small_params, *args)`` equals
      ``fn(apply_masks(params, masks), *args)`` within float rounding. ``small_fn`` is an
      ordinary JAX function (jittable, differentiable), re-tracing ``fn`` once per new input
      shape (cached). ``small_params`` has ``params``' structure with smaller leaves.

    Raises:
      ValueError: masks that disagree within a group (naming the members on each side), masks
      removing different numbers of channels from the blocks of a grouped convolution's group
      (naming the members and the counts), masks removing every channel of a group, masks that do
      not match ``params`` by path, NaN/Inf in ``params``, a ``round_to`` below 1, a result that
      fails the ``jax.eval_shape`` check.

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.pruning import apply_masks, structured_masks
    >>> params = {"a": {"kernel": jnp.arange(32.0).reshape(4, 8)},
    ...           "b": {"kernel": jnp.ones((8, 2))}}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
    >>> x = jnp.ones((3, 4))
    >>> masks = structured_masks(params, 0.5, groups=dependencies(fn, params, x))
    >>> small_fn, small = shrink(fn, params, masks, x)
    >>> small["a"]["kernel"].shape, small["b"]["kernel"].shape
    ((4, 4), (4, 2))
    >>> bool(jnp.allclose(small_fn(small, x), fn(apply_masks(params, masks), x)))
    True
    """
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    pairs = jtree.leaves_with_paths(params)
    by_path = jtree.unwrap(jtree.match_by_path(params, masks, name="masks"))
    for path, m in by_path.items():
        if not jtree.is_concrete(m):
            raise ValueError(f"{path}: shrink needs concrete masks; call it outside jit")
    leaves = dict(pairs)
    for path, leaf in leaves.items():
        jtree.check_finite(path, leaf, what="shrink")
    groups = dependencies(fn, params, *args)
    removed = _removed(groups, leaves, by_path, round_to)
    shapes = {p: tuple(np.shape(x)) for p, x in leaves.items()}
    drops = _drop_indices(removed, shapes)
    small_params = jtree.map_with_paths(
        lambda p, x: _shrink_leaf(
            x, by_path[p], [(a, b, i) for (q, a, b, _), i in drops.items() if q == p]
        ),
        params,
    )
    param_structs = _abstract(params)
    order = {p: i for i, (p, _) in enumerate(pairs)}
    small_fn = _small_fn(fn, param_structs, removed, order)
    want = jax.eval_shape(fn, param_structs, *_abstract(args))
    got = jax.eval_shape(small_fn, _abstract(small_params), *_abstract(args))
    if jax.tree.structure(want) != jax.tree.structure(got) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))
    ):
        raise ValueError(f"shrink: the shrunken function returns {got}, not {want}")
    return small_fn, small_params


def shrink_linen(
    module: Any, variables: Params, masks: Params, *args: Any, round_to: int = 1
) -> tuple[Params, dict[str, int]]:
    """Shrink a linen model's variables; returns ``(variables, widths)``.

    ``fn`` is ``lambda v, *a: module.apply(v, *a)`` over the whole ``variables`` dict (use the
    inference-mode module: ``BatchNorm(use_running_average=True)``), so ``masks`` has its paths
    (``params/...``, ``batch_stats/...``). ``widths`` maps each module whose kernel lost output
    channels (``"Dense_0"``, ``"Block_0/Conv_1"``) to its new feature count: rebuild the module
    with those attributes (``MLP(features=(150, 50, 10))``) and ``apply`` the returned variables
    to it. Widths written as literals inside an ``@nn.compact`` method cannot be rewritten from
    outside; expose them as attributes, or use :func:`shrink`'s ``small_fn``, which needs no
    rebuilt module. A grouped ``Conv`` keeps its ``feature_group_count``; a ``GroupNorm`` loses
    whole groups, so rebuild it with ``num_groups = new channels // channels per group`` (or
    keep ``group_size=``).

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.demo import MLP
    >>> from jcompress.pruning import structured_masks
    >>> model, x = MLP((8, 4, 2)), jnp.ones((1, 3))
    >>> v = model.init(jax.random.key(0), x)
    >>> groups = dependencies(lambda v, x: model.apply(v, x), v, x)
    >>> small, widths = shrink_linen(model, v, structured_masks(v, 0.5, groups=groups), x)
    >>> widths
    {'Dense_0': 4, 'Dense_1': 2}
    >>> MLP((4, 2, 2)).apply(small, x).shape
    (1, 2)
    """

    def fn(v, *a):
        return module.apply(v, *a)

    small_fn, small = shrink(fn, variables, masks, *args, round_to=round_to)
    del small_fn
    shapes = {p: tuple(np.shape(x)) for p, x in jtree.leaves_with_paths(variables)}
    small_shapes = {p: tuple(np.shape(x)) for p, x in jtree.leaves_with_paths(small)}
    widths = {}
    for p, shape in shapes.items():
        head, _, name = p.rpartition("/")
        if name == "kernel" and small_shapes[p][-1] != shape[-1]:
            widths[head.removeprefix("params/")] = small_shapes[p][-1]
    return small, dict(sorted(widths.items()))


def shrink_nnx(model: Any, masks: Params, *args: Any, round_to: int = 1) -> Any:
    """Shrink an ``nnx`` model: a new model with fewer channels (the input model is unchanged).

    ``masks`` has the paths of ``nnx.state(model)`` (every variable, ``BatchStat`` s included):
    ``structured_masks(nnx.state(model), s, groups=dependencies(fn, nnx.state(model), *args))``
    with ``fn = lambda s, *a: nnx.merge(nnx.graphdef(model), s)(*a)``. Run the model in
    inference mode (``model.eval()``) first. The new model's ``Linear`` / ``Conv``
    ``in_features`` / ``out_features`` (a grouped ``Conv`` keeps its ``feature_group_count``),
    norm ``num_features`` and ``GroupNorm.num_groups`` (whole norm groups go; ``group_size``
    stays) are updated to the new shapes; widths stored in other attributes of your own modules
    are not.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jcompress.pruning import structured_masks
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.a, self.b = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.b(nnx.relu(self.a(x)))
    >>> model, x = Net(nnx.Rngs(0)), jnp.ones((1, 3))
    >>> graphdef, state = nnx.split(model)
    >>> fn = lambda s, x: nnx.merge(graphdef, s)(x)
    >>> masks = structured_masks(state, 0.5, groups=dependencies(fn, state, x))
    >>> small = shrink_nnx(model, masks, x)
    >>> small.a.kernel.shape, small.a.out_features, small(x).shape
    ((3, 4), 4, (1, 2))
    """
    from flax import nnx

    graphdef, state = nnx.split(model)

    def fn(s, *a):
        return nnx.merge(graphdef, s)(*a)

    _, small_state = shrink(fn, state, masks, *args, round_to=round_to)
    small = nnx.merge(graphdef, small_state)
    for _, m in nnx.iter_modules(small):
        if isinstance(m, nnx.Conv):
            m.in_features = m.kernel.shape[-2] * m.feature_group_count
            m.out_features, m.kernel_shape = m.kernel.shape[-1], tuple(m.kernel.shape)
        elif isinstance(m, nnx.Linear):
            m.in_features, m.out_features = m.kernel.shape[-2], m.kernel.shape[-1]
        elif isinstance(m, nnx.GroupNorm):
            v = m.scale if m.scale is not None else m.bias
            if v is not None:
                m.num_groups = v.shape[0] // m.group_size
        elif isinstance(m, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm) and m.scale is not None:
            m.num_features = m.scale.shape[0]
    return small
