"""``prune``: pruning as the outermost optax transform, with masks kept in its state.

The masks, the target sparsity they were made for, a step count and a NaN/Inf flag live in the
optimizer state, so a training step stays one jitted function and the user's loop
needs no extra call: the returned updates drive pruned weights to exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jcompress import tree as jtree
from jcompress.pruning import _masks
from jcompress.pruning._plan import Plan, first_pruned, only, plan
from jcompress.pruning._schedules import Schedule, schedule_rules
from jcompress.pruning._structures import NM

__all__ = ["PruneState", "masks_of", "nonfinite", "prune"]

CRITERIA = ("magnitude", "saliency", "random")


class PruneState(NamedTuple):
    """The state of :func:`prune`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      masks: bool arrays with the parameters' paths (Variables unwrapped): broadcastable to the
        leaf for selected leaves, a scalar ``True`` for the rest. ``False`` marks a pruned weight.
      target: ``float32`` scalar, the target sparsity the masks were made for (with fixed
        ``masks=``: the fraction of selected weights they prune; with per-layer schedule rules:
        one target per rule that prunes, in rule order).
      count: ``int32`` scalar, the number of ``update`` calls so far (the schedule's step).
      nonfinite: ``bool`` scalar, sticky: set once an ``update`` met NaN/Inf in the incoming
        updates (checked every step) or in the parameters (checked whenever masks are
        computed from them). Masks are not recomputed after it is set.
    """

    inner_state: optax.OptState
    masks: Any
    target: jax.Array
    count: jax.Array
    nonfinite: jax.Array


def _as_masks(reference: Any, masks: Any) -> Any:
    """``masks`` in ``reference``'s structure, every entry a bool array (``True`` included)."""
    return jtree.map_with_paths(
        lambda _, __, m: jnp.asarray(m, jnp.bool_), reference, masks, names=["masks"]
    )


def _as_gradient_transformation(inner: Any) -> optax.GradientTransformationExtraArgs:
    if isinstance(inner, optax.MultiSteps):
        return optax.GradientTransformationExtraArgs(inner.init, inner.update)
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            f"prune: inner must be an optax GradientTransformation (an object with init and "
            f"update), got {type(inner).__name__}; e.g. prune(optax.adam(1e-3), schedule=...)"
        )
    if not isinstance(inner, optax.GradientTransformation):
        inner = optax.GradientTransformation(inner.init, inner.update)
    return optax.with_extra_args_support(inner)


def _check_key(key: Any) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"prune: key must be a single PRNG key, got shape {key.shape}")
        return key
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise TypeError(
            f"prune: key must be a PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got "
            f"dtype {key.dtype} and shape {key.shape}"
        )
    return key


def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating leaf of ``tree`` is free of NaN and Inf (a bool scalar)."""
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(tree):
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.size == 0:
            continue
        # x - x is +0 for every finite x and NaN for NaN and +-Inf; sums of zeros cannot
        # overflow. Matrices are summed row by row as a product with a vector of ones, which
        # XLA:CPU runs as one loop fusion over all cores; a full reduction runs on one thread.
        # (Not max(|x|): vectorized max reductions may drop NaN; not x * 0: XLA:CPU
        # materializes the broadcast zero as a second operand.)
        zeros = leaf - leaf
        if zeros.ndim >= 2:
            rows = zeros.reshape(-1, zeros.shape[-1])
            ones = jnp.ones(rows.shape[-1], rows.dtype)
            zeros = jnp.dot(rows, ones, preferred_element_type=jnp.float32)
        total = total + jnp.sum(zeros, dtype=jnp.float32)
    return jnp.isfinite(total)


def _raw_target(schedule: Schedule, count: jax.Array) -> jax.Array:
    s = jnp.asarray(schedule(count))
    if s.shape != () or not jnp.issubdtype(s.dtype, jnp.floating):
        raise TypeError(
            f"prune: schedule(step) must return a float scalar, got dtype {s.dtype} and shape "
            f"{s.shape}"
        )
    return s.astype(jnp.float32)


def _fixed_masks(params: Any, masks: Any) -> tuple[Any, jax.Array]:
    """Validate user masks against ``params`` (unwrapped); also the fraction they prune."""
    counts = [0, 0]  # pruned, total over leaves with a non-scalar mask

    def check(path, leaf, m):
        dtype = getattr(m, "dtype", None) if not isinstance(m, bool) else np.dtype(bool)
        if dtype is None or dtype != np.bool_:
            raise TypeError(
                f"{path}: masks must hold bool arrays (True keeps a weight), got "
                f"{dtype if dtype is not None else type(m).__name__}; build them with "
                "jc.pruning.magnitude_masks or masks_of(opt_state)"
            )
        shape = tuple(np.shape(leaf))
        try:
            full = np.broadcast_shapes(np.shape(m), shape)
        except ValueError:
            full = None
        if full != shape:
            raise ValueError(
                f"{path}: mask of shape {np.shape(m)} does not broadcast to the leaf's shape "
                f"{shape}; masks need the parameters' shapes"
            )
        if np.ndim(m):
            kept = np.broadcast_to(np.asarray(m), shape)
            counts[0] += int(kept.size - np.count_nonzero(kept))
            counts[1] += int(kept.size)
        return jnp.array(m, copy=True)  # the state owns its buffers (donation-safe)

    given = dict(jtree.leaves_with_paths(jtree.unwrap(masks)))
    wanted = {path for path, _ in jtree.leaves_with_paths(params)}
    for path, m in list(given.items()):
        if path in wanted:
            continue
        if np.all(np.asarray(m)):  # keeps everything: a leaf optax.masked (say) hid from prune
            del given[path]
        else:
            raise ValueError(
                f"{path}: masks prune this leaf, but prune does not see it among the parameters "
                "(inside optax.masked, the masked-out leaves are removed before prune): unmask "
                "it, or make its mask True"
            )
    out = jtree.map_with_paths(check, params, given, names=["masks"])
    return out, jnp.float32(counts[0] / counts[1] if counts[1] else 0.0)


def prune(
    inner: optax.GradientTransformation,
    *,
    schedule: Schedule | None = None,
    masks: Any = None,
    criterion: str | Callable[[Any, Any], Any] = "magnitude",
    structure: Any = None,
    scope: str = "layer",
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
    key: jax.Array | None = None,
    check_finite: bool = True,
    mask_gradients: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Prune while training: wrap any optax optimizer, keep the masks in its state.

    ``prune`` is the **outermost** transform. It sees the raw gradients and the current
    parameters, recomputes the masks (under ``lax.cond``) exactly when ``schedule(count)``
    differs from the target they were made for, zeroes the gradients of pruned weights before
    ``inner`` sees them, and returns ``jnp.where(mask, inner_update, -params)``: after
    ``optax.apply_updates`` pruned weights are **exactly** zero (``p + (-p) == 0`` in floating
    point) whatever ``inner`` does — momentum, Adam, weight decay. Nest other wrappers inside::

        prune(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), schedule=...)
        prune(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), schedule=...)
        prune(optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4), schedule=...)

    (with ``MultiSteps`` inside, the schedule counts micro-batches: every ``update`` call). Read
    the state through :func:`masks_of` and :func:`nonfinite`, which find it inside any wrapper.

    Within one schedule masks only grow: each recomputation passes the old masks as
    ``previous``, so a pruned weight never returns. After the schedule's last change the masks are
    fixed. Scores are computed from the parameters passed to ``update``:

    * ``"magnitude"``: ``|p|`` (gradual magnitude pruning with a polynomial schedule);
    * ``"saliency"``: ``|p · g|`` with the incoming updates as gradients (keep ``prune``
      outermost so they are raw gradients);
    * ``"random"``: uniform scores from ``key`` folded with the step count.

    With ``structure=NM(n, m)`` the schedule only switches pruning on: a positive target means
    N:M masks (sparsity ``1 - n/m``).

    Cost per step, on top of ``inner`` (XLA fuses the selects into the passes that ``inner``
    and ``optax.apply_updates`` make anyway): one read of the gradients (the NaN/Inf check), a
    read of the masks (one byte per selected weight) in each pass that consumes the masked
    gradients and in the final select, and a ``lax.cond`` whose mask recomputation (a ranking of
    every selected weight) runs only on the steps where the target changes. Inside one jitted
    ``lax.scan`` over the training steps the masks stay in place; with one jitted call per step,
    every output, unchanged masks included, is a new buffer unless the parameters and state are
    donated (``jax.jit(step, donate_argnums=(0, 1))``). ``check_finite=False,
    mask_gradients=False`` drop the two optional passes, and once the masks are final, fixed
    masks drop the ``lax.cond``::

        fixed = prune(optax.adam(1e-3), masks=masks_of(state))
        state = fixed.init(params)._replace(inner_state=state.inner_state)

    ``benchmarks/pruning_overhead.py`` measures these against plain optax (BENCHMARKS.md).
    Nothing is recompiled when the masks change. The state holds one bool per selected weight.
    Unstructured sparsity saves no time on XLA: it is the accuracy-preserving step before an
    encoded checkpoint or structured shrinking.

    Args:
      inner: the optax transform to wrap (``GradientTransformation``, with or without extra
        args, or ``optax.MultiSteps``). Extra keyword arguments of ``update`` reach it.
      schedule: ``step -> target sparsity`` (:func:`constant_schedule`,
        :func:`polynomial_schedule`, or any non-decreasing function into ``[0, 1)``; checked
        at step 0 when ``prune`` is called, clipped to ``[0, 1]`` inside ``jit``). Or per-layer
        rules ``[(regex, schedule | None), ...]``: the first ``re.fullmatch`` on a selected
        leaf's path gives its schedule (``None`` or no rule: dense); every rule must win a
        leaf; ``scope="layer"`` only, no channel ``groups``. Masks are recomputed when any
        rule's target changes, each leaf ranked against its own rule's target.
      masks: fixed masks to fine-tune with, instead of a schedule (bool arrays with the
        parameters' paths, e.g. from ``magnitude_masks`` or :func:`masks_of`).
      criterion: ``"magnitude"``, ``"saliency"``, ``"random"``, or a function
        ``(params, grads) -> scores`` (plain arrays with the params' paths, higher = keep; the
        criterion of your own that :func:`score_masks` takes one-shot), traced inside the step.
      structure: ``None`` / ``Unstructured()``, ``NM(n, m)`` or ``Channels(...)``.
      scope: ``"layer"`` (each leaf pruned to the target) or ``"global"`` (one threshold).
      where: which leaves to prune (regex, callable, bool pytree; default: Flax ``kernel`` /
        ``embedding`` leaves, or matmul/conv/gather leaves with ``roles``).
      roles: ``{path: Role}`` for the selected leaves (from ``jc.roles``), for other layouts.
      key: PRNG key, required by ``criterion="random"`` only.
      check_finite: check the incoming updates for NaN/Inf at every step (the sticky flag read
        by :func:`nonfinite`). With ``False`` they are checked only when masks are recomputed
        (parameters and updates), which saves one pass over the gradients per step.
      mask_gradients: zero the gradients of pruned weights before ``inner`` sees them, so
        global-norm clipping and optimizer statistics ignore pruned weights. Pruned weights stay
        exactly zero either way (the final select); ``False`` saves one pass per step.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`PruneState`.
      ``update(updates, state, params, **extra_args)`` requires ``params``.

    Raises:
      ValueError / TypeError: both or neither of ``schedule`` and ``masks``; an unknown
        criterion; ``"random"`` without ``key`` (or a ``key`` without it); options that
        ``masks=`` would ignore; and at ``init``: bad ``where``/``roles``/``structure`` (N:M
        divisibility), masks that do not match the parameters, NaN/Inf in the parameters.

    References:
      Zhu & Gupta, "To prune, or not to prune", 2017 (gradual magnitude pruning).
      Lee et al., "SNIP: single-shot network pruning based on connection sensitivity", 2019
      (the ``|w · g|`` saliency).

    >>> import jax, jax.numpy as jnp, optax
    >>> from jcompress.pruning import constant_schedule, masks_of
    >>> params = {"Dense_0": {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4),
    ...                       "bias": jnp.ones(4)}}
    >>> tx = prune(optax.sgd(0.1), schedule=constant_schedule(0.5))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["Dense_0"]["kernel"]  # the 4 smallest weights are exactly zero
    Array([[0. , 0. , 0. , 0. ],
           [4.9, 5.9, 6.9, 7.9]], dtype=float32)
    >>> int(masks_of(state)["Dense_0"]["kernel"].sum())
    4
    """
    if (schedule is None) == (masks is None):
        raise ValueError(
            "prune: pass exactly one of schedule= (prune while training, e.g. "
            "polynomial_schedule(0.9, begin_step=..., end_step=...)) or masks= (fine-tune with "
            "fixed masks)"
        )
    if not callable(criterion) and criterion not in CRITERIA:
        raise ValueError(
            f"prune: criterion must be one of {CRITERIA} or a function (params, grads) -> "
            f"scores, got {criterion!r}"
        )
    if scope not in ("layer", "global"):
        raise ValueError(f"prune: scope must be 'layer' or 'global', got {scope!r}")
    if criterion == "random" and key is None:
        raise ValueError("prune: criterion='random' needs key=jax.random.key(seed)")
    if key is not None and criterion != "random":
        raise ValueError(
            f"prune: key= is only used by criterion='random', not {criterion!r}; drop it"
        )
    if key is not None:
        key = _check_key(key)
    if masks is not None:
        ignored = [
            name
            for name, given in (
                ("criterion", criterion != "magnitude"),
                ("structure", structure is not None),
                ("scope", scope != "layer"),
                ("where", where is not None),
                ("roles", roles is not None),
            )
            if given
        ]
        if ignored:
            raise ValueError(
                f"prune: with masks= the masks decide what is pruned; {ignored} would be "
                "ignored: drop them (or use schedule= to compute masks)"
            )
    rules = schedule_rules(schedule, structure=structure, scope=scope)
    # the schedules in effect: none (fixed masks), one, or one per rule that prunes (None rules
    # keep their leaves dense)
    if rules is not None:
        schedules = [r.value for r in rules if r.value is not None]
    else:
        schedules = [] if schedule is None else [schedule]
    inner = _as_gradient_transformation(inner)
    fixed = masks

    def one_target(sched: Schedule, count: jax.Array) -> jax.Array:
        s = jnp.clip(_raw_target(sched, count), 0.0, 1.0)
        if isinstance(structure, NM):
            # The schedule only switches N:M pruning on.
            s = jnp.where(s > 0, jnp.float32(structure.sparsity), jnp.float32(0.0))
        return s

    def target_at(count: jax.Array) -> jax.Array:
        """A scalar; with schedule rules one target per pruning rule."""
        if rules is None:
            return one_target(schedule, count)
        return jnp.stack([one_target(sched, count) for sched in schedules])

    for sched in schedules:
        first = float(_raw_target(sched, jnp.int32(0)))
        if not 0.0 <= first < 1.0:
            raise ValueError(
                f"prune: schedule(0) = {first}; a schedule returns sparsities in [0, 1)"
            )

    def init(params: Any) -> PruneState:
        # prune's own state is built on plain arrays; the inner optimizer sees exactly what
        # the caller passed (Variables or arrays), as it would without prune.
        plain = jtree.unwrap(params)
        for path, leaf in jtree.leaves_with_paths(plain):
            jtree.check_finite(path, leaf, what="prune")
        if fixed is not None:
            state_masks, target = _fixed_masks(plain, fixed)
        else:
            plan_, _ = make_plans(plain)
            shapes = jax.eval_shape(
                lambda p: _masks.masks_from_scores(p, p, jnp.float32(0.0), plan_), plain
            )
            state_masks = jax.tree.map(lambda s: jnp.ones(s.shape, jnp.bool_), shapes)
            state_masks = _as_masks(plain, state_masks)
            target = jnp.zeros(() if rules is None else (len(schedules),), jnp.float32)
        return PruneState(
            inner_state=inner.init(params),
            masks=state_masks,
            target=target,
            count=jnp.zeros((), jnp.int32),
            nonfinite=jnp.zeros((), jnp.bool_),
        )

    def make_plan(params: Any, chosen: jtree.Where) -> Plan:
        # The schedule's values are checked here and clipped inside jit; plan only needs
        # a valid stand-in (N:M takes none).
        return plan(
            params,
            structure=structure,
            scope=scope,
            where=chosen,
            roles=roles,
            sparsity=None if isinstance(structure, NM) else 0.0,
            what="prune",
        )

    def make_plans(params: Any) -> tuple[Plan, list[Plan]]:
        """The plan of every pruned leaf, and one plan per schedule (per pruning rule)."""
        every = make_plan(params, where)
        if rules is None:
            return every, [every]
        all_paths = [path for path, _ in jtree.leaves_with_paths(params)]
        numbered = [rule._replace(value=i) for i, rule in enumerate(rules)]
        assigned = jtree.assign(list(every.roles), numbered, what="prune", all_paths=all_paths)
        groups = [
            [path for path, i in assigned.items() if i == k]
            for k, rule in enumerate(rules)
            if rule.value is not None
        ]
        pruned = [path for paths in groups for path in paths]
        return make_plan(params, only(pruned)), [make_plan(params, only(ps)) for ps in groups]

    def scores_of(params: Any, grads: Any, chosen_plan: Plan, count: jax.Array) -> Any:
        if callable(criterion):
            return criterion(params, grads)
        if criterion == "magnitude":
            return jax.tree.map(jnp.abs, params)
        if criterion == "saliency":
            return jax.tree.map(lambda p, g: jnp.abs(p * g.astype(p.dtype)), params, grads)
        # One draw for every selected weight (one random-bits computation to compile), cut
        # into the leaves in tree order.
        leaves, treedef = jax.tree.flatten(params)
        chosen = [path in chosen_plan.roles for path, _ in jtree.leaves_with_paths(params)]
        total = sum(int(np.size(p)) for p, s in zip(leaves, chosen) if s)
        draw = jax.random.uniform(jax.random.fold_in(key, count), (total,), jnp.float32)
        out, start = [], 0
        for p, s in zip(leaves, chosen):
            if s:
                out.append(draw[start : start + p.size].reshape(p.shape))
                start += p.size
            else:
                out.append(jnp.abs(p))
        return jax.tree.unflatten(treedef, out)

    def update(
        updates: optax.Updates,
        state: PruneState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, PruneState]:
        if params is None:
            raise ValueError(
                "prune: update needs the current parameters: tx.update(grads, state, params)"
            )
        # Everything inside runs on the masks' structure (plain arrays), matched by path.
        p = jtree.rewrap(state.masks, jtree.unwrap(params), name="params")
        g = jtree.rewrap(state.masks, jtree.unwrap(updates), name="updates")
        # NaN/Inf: the incoming updates every step; the parameters (and updates) where masks
        # are computed from them (a finite update keeps finite weights finite). The per-step
        # check only feeds the returned flag, so it stays off the path to the updates.
        bad = (state.nonfinite | ~_all_finite(g)) if check_finite else state.nonfinite

        if fixed is not None:
            masks, target = state.masks, state.target
            touched = jax.tree.map(lambda _: True, masks)
        else:
            plan_, plans = make_plans(p)
            # Unselected leaves (scalar True masks) keep their updates untouched; channel
            # groups also mask unselected members (biases, norms), which have array masks.
            touched = jax.tree.map(lambda m: m.ndim > 0, state.masks)
            target = target_at(state.count)
            change = jnp.any(target != state.target) & ~state.nonfinite

            def recompute(old):
                scores = scores_of(p, g, plan_, state.count)
                if rules is None:
                    new = _masks.masks_from_scores(p, scores, target, plan_, previous=old)
                else:  # each rule's leaves ranked against its own schedule's target
                    new = old
                    for k, group_plan in enumerate(plans):
                        part = _masks.masks_from_scores(
                            p, scores, target[k], group_plan, previous=old
                        )
                        new = jax.tree.map(first_pruned, part, new)
                ok = _all_finite((p, g))
                new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), _as_masks(old, new), old)
                return new, ok

            def keep(old):
                return old, jnp.array(True)

            if jtree.is_concrete(change):  # eager: branch in Python, compile nothing extra
                masks, ok = (recompute if bool(change) else keep)(state.masks)
            else:
                masks, ok = lax.cond(change, recompute, keep, state.masks)
            bad = bad | ~ok
            target = jnp.where(change & ok, target, state.target)

        def mask_gradient(t, m, x):
            return jnp.where(m, x, jnp.zeros((), x.dtype)) if t else x

        inner_in = updates
        if mask_gradients:
            inner_in = jtree.rewrap(
                updates, jax.tree.map(mask_gradient, touched, masks, g), name="updates"
            )
        inner_updates, inner_state = inner.update(inner_in, state.inner_state, params, **extra_args)

        def final(_, u, x, m, t):
            if not t:
                return u
            dtype = jnp.promote_types(u.dtype, x.dtype)
            return jnp.where(m, u.astype(dtype), -x.astype(dtype))

        new_updates = jtree.map_with_paths(
            final, inner_updates, p, masks, touched, names=["params", "masks", "selection"]
        )
        return new_updates, PruneState(
            inner_state=inner_state,
            masks=masks,
            target=target,
            count=optax.safe_int32_increment(state.count),
            nonfinite=bad,
        )

    return optax.GradientTransformationExtraArgs(init, update)


def _find_states(opt_state: Any) -> PruneState:
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
        if isinstance(x, PruneState)
    ]
    if not found:
        raise ValueError(
            "no prune state found in this optimizer state; it comes from "
            "tx = jc.pruning.prune(optax_optimizer, schedule=...) and tx.init(params)"
        )
    if len(found) > 1:
        raise ValueError(
            f"found {len(found)} prune states in this optimizer state; pass the one you mean"
        )
    return found[0]


def masks_of(opt_state: Any) -> Any:
    """The current masks inside an optimizer state made by :func:`prune` (plain arrays).

    Finds the :class:`PruneState` inside any wrapping (tuples, ``nnx.Optimizer.opt_state``)
    and returns its masks with nnx ``Variable`` s unwrapped: bool arrays with the parameters'
    paths, ``False`` where a weight is pruned.

    Raises:
      ValueError: no prune state (or more than one) in ``opt_state``.
    """
    return jtree.unwrap(_find_states(opt_state).masks)


def nonfinite(opt_state: Any) -> jax.Array:
    """The sticky NaN/Inf flag of the :func:`prune` state inside ``opt_state`` (bool scalar).

    ``True`` once an ``update`` met NaN or Inf in the incoming updates (checked every step) or
    in the parameters (checked whenever masks are computed from them: finite updates keep
    finite weights finite); masks are not recomputed from then on. Reading it forces a device
    sync, so check it every few hundred steps or at the end.

    Raises:
      ValueError: no prune state (or more than one) in ``opt_state``.
    """
    return jtree.unwrap(_find_states(opt_state).nonfinite)
