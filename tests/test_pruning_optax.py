"""``prune``: the optax transform that keeps pruning masks in its state.

Real properties: exact counts, pruned weights exactly zero after every step for every optimizer,
no regrowth, masks change only when the scheduled target changes, jit == eager, determinism, one
compilation, and the layouts users have (linen dicts, nnx.Optimizer).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import tree as jtree
from jcompress.demo import MLP
from jcompress.pruning import (
    NM,
    PruneState,
    constant_schedule,
    magnitude_masks,
    masks_of,
    nonfinite,
    polynomial_schedule,
    prune,
)

MODEL = MLP((16, 8))  # kernels (12, 16) and (16, 8)
X = jax.random.normal(jax.random.key(1), (32, 12))
Y = jax.random.randint(jax.random.key(2), (32,), 0, 8)
KERNELS = ("Dense_0/kernel", "Dense_1/kernel")


def init_params(seed=0, dtype=jnp.float32):
    params = MODEL.init(jax.random.key(seed), X[:1])["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def loss_fn(params, x, y):
    logits = MODEL.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def make_step(tx, counter=None):
    """A training step (not jitted: callers jit it, or not, to compare)."""

    def step(params, opt_state, x, y):
        if counter is not None:
            counter.append(1)  # runs once per trace
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def leaf(tree, path):
    return np.asarray(dict(jtree.leaves_with_paths(tree))[path])


def n_pruned(mask):
    mask = np.asarray(mask)
    return int(mask.size - mask.sum())


# One schedule for the training-loop tests: targets change at steps 2, 5, 8, 11 and 12.
SCHEDULE = polynomial_schedule(
    0.8, begin_step=2, end_step=12, power=3, update_every=3, initial_sparsity=0.1
)
TARGETS = [float(SCHEDULE(t)) for t in range(260)]
INNER = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}


@functools.cache
def stepper(name):
    """``(tx, jitted step, traces)`` for ``prune(INNER[name](), schedule=SCHEDULE)``, shared by
    every test (each new transform is a new XLA compilation)."""
    tx = prune(INNER[name](), schedule=SCHEDULE)
    traces = []
    return tx, jax.jit(make_step(tx, traces)), traces


def run(name, steps, *, dtype=jnp.float32):
    """Train ``steps`` steps; the params and masks after every step, and the last state."""
    tx, step, _ = stepper(name)
    params = init_params(dtype=dtype)
    state = tx.init(params)
    history = []
    for _ in range(steps):
        params, state = step(params, state, X, Y)
        history.append((params, masks_of(state)))
    return history, state


def run_tx(tx, steps, params=None):
    """Like :func:`run` for a one-off transform."""
    params = init_params() if params is None else params
    state = tx.init(params)
    step = jax.jit(make_step(tx))
    history = []
    for _ in range(steps):
        params, state = step(params, state, X, Y)
        history.append((params, masks_of(state)))
    return history, state


@functools.cache
def adam_run():
    """Adam, the schedule's 12 steps and 200 more."""
    return run("adam", 212)


# ----------------------------------------------------------------------------------------------
# Exact counts, zeros, no regrowth, when masks change
# ----------------------------------------------------------------------------------------------


def test_exact_final_sparsity_and_dense_biases():
    history, state = adam_run()
    params, masks = history[-1]
    for path in KERNELS:
        kernel, mask = leaf(params, path), leaf(masks, path)
        assert mask.shape == kernel.shape and mask.dtype == bool
        assert n_pruned(mask) == round(np.float32(0.8) * kernel.size)
        assert np.all(kernel[~mask] == 0)
        assert np.count_nonzero(kernel == 0) == n_pruned(mask)  # survivors are not zero
    for path in ("Dense_0/bias", "Dense_1/bias"):
        assert leaf(masks, path).shape == () and bool(leaf(masks, path))
    assert float(state.target) == np.float32(0.8)
    assert int(state.count) == 212
    assert not bool(nonfinite(state))


def check_history(history):
    """Zeros after every step, exact counts of the step's target, masks only grow, masks change
    exactly when the target does."""
    prev_masks = None
    for t, (params, masks) in enumerate(history):
        for path in KERNELS:
            mask, kernel = leaf(masks, path), leaf(params, path)
            assert np.all(kernel[~mask] == 0), (t, path)
            # The target at step t is schedule(t) (the count before the update).
            assert n_pruned(mask) == round(np.float32(TARGETS[t]) * mask.size), (t, path)
            if prev_masks is not None:
                before = leaf(prev_masks, path)
                assert not np.any(mask & ~before), (t, path)  # a pruned weight never returns
                if TARGETS[t] == TARGETS[t - 1]:
                    np.testing.assert_array_equal(mask, before)
        prev_masks = masks


def test_no_regrowth_and_masks_change_only_at_target_changes():
    history, _ = adam_run()
    check_history(history)
    # After the schedule ends (step 12) the masks never change again over 200 steps.
    final = history[12][1]
    for _, masks in history[12:]:
        for path in KERNELS:
            np.testing.assert_array_equal(leaf(masks, path), leaf(final, path))


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("sgd", jnp.float32),
        ("momentum", jnp.float32),
        ("adam", jnp.float32),
        ("adamw", jnp.float32),
        ("adamw", jnp.bfloat16),
    ],
)
def test_pruned_weights_exactly_zero_every_step(name, dtype):
    history, _ = (
        adam_run() if (name, dtype) == ("adam", jnp.float32) else run(name, 14, dtype=dtype)
    )
    history = history[:14]
    check_history(history)
    assert all(leaf(p, path).dtype == dtype for p, _ in history for path in KERNELS)
    # The surviving weights did train (momentum and weight decay did not touch the zeros).
    last, before = (leaf(history[i][0], "Dense_0/kernel") for i in (-1, -2))
    assert np.any(last != before)


def test_deterministic():
    a, _ = run("sgd", 6)
    b, _ = run("sgd", 6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_one_compilation_across_mask_changes():
    run("momentum", 14)  # the targets change at steps 2, 5, 8, 11, 12 and not in between
    run("momentum", 3)
    _, _, traces = stepper("momentum")
    assert len(traces) == 1


def test_jit_equals_eager_bit_for_bit():
    # The same gradients into the jitted and the eager update; the inner optimizer is a plain
    # scaling, so any difference would come from prune itself. One small leaf keeps the eager
    # (op-by-op) run cheap.
    schedule = polynomial_schedule(0.6, begin_step=0, end_step=2, update_every=1)
    tx = prune(optax.sgd(0.1), schedule=schedule)
    params_j = params_e = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
    state_j = state_e = tx.init(params_j)
    update = jax.jit(tx.update)
    for t in range(3):  # masks recomputed at steps 1 and 2
        g = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(t), (6, 4))}}
        u_j, state_j = update(g, state_j, params_j)
        u_e, state_e = tx.update(g, state_e, params_e)
        for a, b in zip(jax.tree.leaves((u_j, state_j)), jax.tree.leaves((u_e, state_e))):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        params_j = params_e = optax.apply_updates(params_j, u_j)
    assert float(state_j.target) == np.float32(0.6)
    assert n_pruned(state_j.masks["Dense_0"]["kernel"]) == round(0.6 * 24)


# ----------------------------------------------------------------------------------------------
# Fixed masks, structures, criteria
# ----------------------------------------------------------------------------------------------


def test_fixed_masks_fine_tuning():
    params = init_params()
    masks = magnitude_masks(params, 0.6)
    tx = prune(optax.adam(1e-2), masks=masks)
    history, state = run_tx(tx, 5, params)
    out = history[-1][0]
    for _, m in history:
        for path in KERNELS:
            np.testing.assert_array_equal(leaf(m, path), leaf(masks, path))
    for path in KERNELS:
        mask = leaf(masks, path)
        assert np.all(leaf(out, path)[~mask] == 0)
        assert np.all(leaf(out, path)[mask] != leaf(params, path)[mask])  # survivors trained
    assert float(state.target) == pytest.approx(0.6, abs=1e-3)


def test_nm_via_schedule_switches_on_once():
    schedule = polynomial_schedule(0.3, begin_step=2, end_step=8, update_every=2)
    switch = next(t for t in range(10) if float(schedule(t)) > 0)  # 4: s(2) = initial = 0
    tx = prune(optax.adam(1e-2), structure=NM(n=2, m=4), schedule=schedule)
    history, state = run_tx(tx, 10)
    for t, (params, masks) in enumerate(history):
        for path in KERNELS:
            mask, kernel = leaf(masks, path), leaf(params, path)
            if t < switch:
                assert mask.all()
                continue
            # Groups of 4 along the contracting axis (axis 0 of a Dense kernel): exactly 2 kept.
            groups = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1]).sum(axis=1)
            assert np.all(groups == 2), (t, path)
            assert np.all(kernel[~mask] == 0)
            np.testing.assert_array_equal(mask, leaf(history[switch][1], path))  # set once
    assert float(state.target) == 0.5


def test_random_criterion_depends_on_the_key_only():
    tx0, update0 = property_update("random")
    tx1 = prune(
        optax.sgd(0.1), schedule=fraction_schedule, criterion="random", key=jax.random.key(1)
    )
    params, grads = property_tree(0, None)
    state = tx0.init(params)._replace(count=jnp.int32(RESOLUTION // 2))
    a = masks_of(update0(grads, state, params)[1])
    b = masks_of(update0(grads, state, params)[1])
    c = masks_of(jax.jit(tx1.update)(grads, state, params)[1])
    for path in ("a/kernel", "c/kernel"):
        np.testing.assert_array_equal(leaf(a, path), leaf(b, path))
        assert np.any(leaf(a, path) != leaf(c, path))
        magnitude = reference_mask(leaf(params, path), 0.5)
        assert np.any(leaf(a, path).ravel() != magnitude)  # not magnitude in disguise


# ----------------------------------------------------------------------------------------------
# Composition with optax wrappers
# ----------------------------------------------------------------------------------------------


def test_inject_hyperparams_inside():
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    tx = prune(inner, schedule=constant_schedule(0.5, begin_step=1))
    step = jax.jit(make_step(tx))
    params = init_params()
    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state, X, Y)
    assert float(state.inner_state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    mask = leaf(masks_of(state), "Dense_0/kernel")
    assert n_pruned(mask) == mask.size // 2
    # A learning rate set in the state reaches the inner optimizer: nothing moves at 0.
    hyper = {**state.inner_state.hyperparams, "learning_rate": jnp.float32(0.0)}
    state = state._replace(inner_state=state.inner_state._replace(hyperparams=hyper))
    new_params, _ = step(params, state, X, Y)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def surviving_norm(updates, masks):
    """The global L2 norm of the updates of weights the masks keep (float64)."""
    kept = [
        np.asarray(u)[np.broadcast_to(np.asarray(m), np.shape(u))]
        for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(masks))
    ]
    return np.sqrt(sum(float(np.sum(k.astype(np.float64) ** 2)) for k in kept))


def test_chain_inside_with_clipping_sees_masked_gradients():
    inner = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    tx = prune(inner, schedule=constant_schedule(0.5))
    params = init_params()
    grads = jax.grad(loss_fn)(params, X, Y)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    masks = masks_of(state)
    # Clipping saw only the surviving gradients: the surviving updates have norm 1e-3.
    norm = surviving_norm(updates, masks)
    assert norm == pytest.approx(1e-3, rel=1e-4)


def test_multisteps_inside():
    inner = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    tx = prune(inner, schedule=polynomial_schedule(0.5, begin_step=1, end_step=5, update_every=2))
    history, state = run_tx(tx, 8)
    for params_t, masks in history:
        for path in KERNELS:
            assert np.all(leaf(params_t, path)[~leaf(masks, path)] == 0)
    assert n_pruned(leaf(masks_of(state), "Dense_0/kernel")) == round(0.5 * 12 * 16)
    # Weights move on every second micro-step only.
    a, b, c = (leaf(history[i][0], "Dense_1/bias") for i in (5, 6, 7))
    assert np.array_equal(a, b) != np.array_equal(b, c)


def test_extra_args_reach_the_inner_transform():
    def update(updates, state, params=None, *, scale):
        return jax.tree.map(lambda u: u * scale, updates), state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    tx = prune(inner, schedule=constant_schedule(0.5))
    params = init_params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, scale=3.0)
    np.testing.assert_array_equal(np.asarray(updates["Dense_0"]["bias"]), 3.0)


# ----------------------------------------------------------------------------------------------
# Layouts: linen dicts, nnx
# ----------------------------------------------------------------------------------------------


def test_linen_variables_dict_with_params_prefix():
    variables = MODEL.init(jax.random.key(0), X[:1])
    tx = prune(optax.sgd(0.1), schedule=constant_schedule(0.5), where=r"params/.*/kernel")

    def loss(v):
        return optax.softmax_cross_entropy_with_integer_labels(MODEL.apply(v, X), Y).mean()

    updates, state = jax.jit(tx.update)(jax.grad(loss)(variables), tx.init(variables), variables)
    out = optax.apply_updates(variables, updates)
    for path in KERNELS:
        mask = leaf(masks_of(state), "params/" + path)
        assert n_pruned(mask) == mask.size // 2
        assert np.all(leaf(out, "params/" + path)[~mask] == 0)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(12, 16, rngs=rngs)
        self.out = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_optimizer_with_nnx_grad():
    model = NnxMLP(nnx.Rngs(0))
    tx = prune(optax.adamw(1e-2, weight_decay=0.1), schedule=constant_schedule(0.75, begin_step=1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(4):
        train_step(model, optimizer, X, Y)
    masks = masks_of(optimizer.opt_state)
    assert not bool(nonfinite(optimizer.opt_state))
    for path, layer in (("hidden/kernel", model.hidden), ("out/kernel", model.out)):
        mask = leaf(masks, path)
        kernel = np.asarray(layer.kernel[...])
        assert mask.dtype == bool and n_pruned(mask) == round(0.75 * kernel.size)
        assert np.all(kernel[~mask] == 0)
        assert np.count_nonzero(kernel == 0) == n_pruned(mask)
    assert leaf(masks, "hidden/bias").shape == ()


def test_variables_in_init_plain_arrays_in_update():
    model = NnxMLP(nnx.Rngs(0))
    variables = nnx.state(model, nnx.Param)  # Param Variables, as nnx.Optimizer's init sees
    tx = prune(optax.sgd(0.1), schedule=constant_schedule(0.5))
    opt_state = tx.init(variables)
    assert (
        jax.tree.leaves(opt_state.masks, is_leaf=lambda x: isinstance(x, nnx.Variable))[0].dtype
        == jnp.bool_
    )  # plain arrays in the state
    arrays = nnx.as_pure(variables)  # plain arrays, as its update sees
    grads = jax.tree.map(jnp.ones_like, arrays)
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, arrays)
    out = optax.apply_updates(arrays, updates)
    mask = leaf(masks_of(opt_state), "hidden/kernel")
    assert n_pruned(mask) == 12 * 16 // 2
    assert np.all(leaf(out, "hidden/kernel")[~mask] == 0)


FORMS = ("variables", "arrays")


@functools.cache
def _nnx_split():
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)
    return graphdef, state


def _form(tree, form):
    return tree if form == "variables" else nnx.as_pure(tree)


@pytest.mark.parametrize("inner", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("init_form", FORMS)
@pytest.mark.parametrize("update_form", FORMS)
@pytest.mark.parametrize("grad_form", FORMS)
def test_prune_works_wherever_its_inner_optimizer_works(inner, init_form, update_form, grad_form):
    """The plain nnx loop (split / grad / update) in every mix of Variables and arrays: prune
    runs exactly where the bare optimizer runs, and gives the bare optimizer's updates on the
    weights it keeps (regression: Variables in init broke ``tx.update``)."""
    graphdef, state = _nnx_split()

    def loss(s):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, s)(X), Y).mean()

    make = {
        "sgd": lambda: optax.sgd(0.1, momentum=0.9),
        "adam": lambda: optax.adam(1e-2),
        "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    }[inner]
    grads = _form(jax.grad(loss)(state), grad_form)
    results = []
    for tx in (make(), prune(make(), schedule=constant_schedule(0.5), mask_gradients=False)):
        try:
            opt_state = tx.init(_form(state, init_form))
            params = _form(state, update_form)
            updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
            results.append((optax.apply_updates(params, updates), opt_state))
        except (ValueError, TypeError) as e:
            results.append(e)
    plain, pruned = results
    if isinstance(plain, Exception):  # a combination the optimizer itself rejects
        assert isinstance(pruned, Exception)
        return
    assert not isinstance(pruned, Exception), pruned
    (plain_params, _), (pruned_params, opt_state) = plain, pruned
    mask = leaf(masks_of(opt_state), "hidden/kernel")
    assert n_pruned(mask) == 12 * 16 // 2
    got, want = (
        leaf(nnx.as_pure(pruned_params), "hidden/kernel"),
        leaf(nnx.as_pure(plain_params), "hidden/kernel"),
    )
    assert np.all(got[~mask] == 0)
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-6)
    assert type(jax.tree.leaves(pruned_params, is_leaf=_is_var)[0]) is type(
        jax.tree.leaves(plain_params, is_leaf=_is_var)[0]
    )


def _is_var(x):
    return isinstance(x, nnx.Variable)


# ----------------------------------------------------------------------------------------------
# NaN/Inf flag, masks_of
# ----------------------------------------------------------------------------------------------


@functools.cache
def nonfinite_update():
    schedule = polynomial_schedule(0.6, begin_step=0, end_step=6, update_every=2)
    tx = prune(optax.sgd(0.1), schedule=schedule)
    return tx, jax.jit(tx.update)


def test_nonfinite_flag_is_sticky_and_freezes_masks():
    tx, update = nonfinite_update()
    params = init_params()
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = update(grads, tx.init(params), params)
    _, state = update(grads, state, params)
    assert not bool(nonfinite(state))
    masks_before = masks_of(state)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    _, state = update(bad, state, params)  # step 2: the target changes, but NaN is met
    assert bool(nonfinite(state))
    for _ in range(4):
        _, state = update(grads, state, params)
    assert bool(nonfinite(state))  # sticky
    for path in KERNELS:  # the masks were not recomputed from garbage
        np.testing.assert_array_equal(leaf(masks_of(state), path), leaf(masks_before, path))


@pytest.mark.parametrize("value", [-jnp.inf, jnp.inf, jnp.nan])
def test_nonfinite_flag_from_one_bad_gradient(value):
    tx, update = nonfinite_update()
    params = init_params()
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["Dense_1"]["bias"] = grads["Dense_1"]["bias"].at[3].set(value)
    _, state = update(grads, tx.init(params), params)
    assert bool(nonfinite(state))
    _, state = update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert not bool(nonfinite(state))


def test_nonfinite_flag_from_params():
    # Parameters are checked where masks are computed from them (step 2: the target changes).
    tx, update = nonfinite_update()
    params = init_params()
    state = tx.init(params)._replace(count=jnp.int32(2))
    bad = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.inf), params)
    _, state = update(jax.tree.map(jnp.ones_like, params), state, bad)
    assert bool(nonfinite(state))
    assert all(bool(jnp.all(m)) for m in jax.tree.leaves(masks_of(state)))
    assert float(state.target) == 0.0  # the masks were not made for the new target


def test_lean_options_keep_exact_zeros_and_same_masks():
    """check_finite=False, mask_gradients=False: the same masks and exact zeros with adam."""
    lean = prune(optax.adam(1e-2), schedule=SCHEDULE, check_finite=False, mask_gradients=False)
    history, _ = run_tx(lean, 14)
    check_history(history)
    reference, _ = adam_run()
    for (_, masks), (_, ref_masks) in zip(history[:3], reference[:3]):
        for path in KERNELS:  # masks come from the params, identical until the params diverge
            np.testing.assert_array_equal(leaf(masks, path), leaf(ref_masks, path))


def test_unmasked_gradients_reach_clipping():
    inner = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    tx = prune(inner, schedule=constant_schedule(0.5), mask_gradients=False)
    params = init_params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    masks = masks_of(state)
    norm = surviving_norm(updates, masks)
    assert norm < 1e-3 * (1 - 1e-3)  # clipping counted the pruned gradients too


def test_check_finite_off_checks_only_at_recomputes():
    schedule = polynomial_schedule(0.6, begin_step=0, end_step=6, update_every=2)
    tx = prune(optax.sgd(0.1), schedule=schedule, check_finite=False)
    update = jax.jit(tx.update)
    params = init_params()
    ones = jax.tree.map(jnp.ones_like, params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), ones)
    _, state = update(ones, tx.init(params), params)  # step 0: masks computed
    _, state = update(bad, state, params)  # step 1: no recompute, not checked
    assert not bool(nonfinite(state))
    _, state = update(bad, state, params)  # step 2: the target changes, the check runs
    assert bool(nonfinite(state))


# The per-step check must see one bad value anywhere in a leaf large enough for XLA:CPU's
# vectorized reductions (some of which drop NaN), in float32 and bfloat16, and must not overflow
# on huge finite values.
CHECK_SHAPES = {"big": (384, 520), "odd": (5, 7)}
SPECIAL = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


@functools.cache
def check_update(dtype):
    params = {name: {"kernel": jnp.ones(shape, dtype)} for name, shape in CHECK_SHAPES.items()}
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)
    tx = prune(optax.sgd(0.1), masks=masks)
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.key(p.size), p.shape).astype(dtype), params
    )
    return params, grads, tx.init(params), jax.jit(tx.update)


@settings()
@given(
    dtype=st.sampled_from(["float32", "bfloat16"]),
    name=st.sampled_from(sorted(CHECK_SHAPES)),
    index=st.integers(0, 2**31 - 1) | st.sampled_from([0, -1]),
    value=st.sampled_from([*SPECIAL, "max", "-max", "tiny", "all-max"]),
)
def test_nonfinite_check_finds_one_bad_value_anywhere(dtype, name, index, value):
    params, grads, state, update = check_update(jnp.dtype(dtype))
    finfo = jnp.finfo(dtype)
    g = grads[name]["kernel"]
    if value == "all-max":  # a sum of these would overflow; the check must not
        g = jnp.full(g.shape, finfo.max, g.dtype) * jnp.sign(g)
    else:
        number = {"max": finfo.max, "-max": -finfo.max, "tiny": finfo.smallest_subnormal}
        flat = g.ravel().at[index % g.size].set(SPECIAL.get(value, number.get(value)))
        g = flat.reshape(g.shape)
    _, state = update({**grads, name: {"kernel": g}}, state, params)
    assert bool(nonfinite(state)) == (value in SPECIAL)


def test_switching_to_fixed_masks_after_the_schedule_is_exact():
    """The documented fast path: ``masks=masks_of(state)`` with the inner state carried over
    takes the same steps as the scheduled transform past its end (to float rounding: XLA fuses
    the two programs differently), with the same exact zeros."""
    history, state = adam_run()
    params = history[-1][0]
    _, step, _ = stepper("adam")
    fixed = prune(INNER["adam"](), masks=masks_of(state))
    fixed_state = fixed.init(params)._replace(inner_state=state.inner_state)
    fixed_step = jax.jit(make_step(fixed))
    p1, s1, p2, s2 = params, state, params, fixed_state
    for _ in range(3):
        p1, s1 = step(p1, s1, X, Y)
        p2, s2 = fixed_step(p2, s2, X, Y)
    for a, b in zip(jax.tree.leaves((p1, s1.inner_state)), jax.tree.leaves((p2, s2.inner_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for path in KERNELS:
        mask = leaf(masks_of(state), path)
        np.testing.assert_array_equal(leaf(masks_of(s2), path), mask)
        assert np.all(leaf(p2, path)[~mask] == 0) and np.all(leaf(p1, path)[~mask] == 0)


def test_donated_step_with_fixed_masks_keeps_user_masks():
    """``jax.jit(step, donate_argnums=(0, 1))`` gives the plain step's results bit for bit, and
    donating the state never deletes the user's ``masks=`` arrays (the state owns copies)."""
    params = init_params()
    user_masks = magnitude_masks(params, 0.5)
    tx = prune(optax.sgd(0.1, momentum=0.9), masks=user_masks)
    plain = jax.jit(make_step(tx))
    donated = jax.jit(make_step(tx), donate_argnums=(0, 1))
    p1, s1 = params, tx.init(params)
    p2, s2 = jax.tree.map(jnp.copy, params), tx.init(params)
    for _ in range(3):
        p1, s1 = plain(p1, s1, X, Y)
        p2, s2 = donated(p2, s2, X, Y)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert n_pruned(leaf(user_masks, "Dense_1/kernel")) == 16 * 8 // 2  # not deleted
    assert n_pruned(leaf(masks_of(tx.init(params)), "Dense_1/kernel")) == 16 * 8 // 2


def test_masks_of_finds_wrapped_state_and_errors():
    tx = prune(optax.sgd(0.1), schedule=constant_schedule(0.5))
    params = init_params()
    state = tx.init(params)
    assert isinstance(state, PruneState)
    wrapped = {"opt": (optax.EmptyState(), [state])}
    assert jax.tree.structure(masks_of(wrapped)) == jax.tree.structure(masks_of(state))
    assert nonfinite(wrapped).dtype == jnp.bool_
    with pytest.raises(ValueError, match="no prune state found"):
        masks_of(optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="found 2 prune states"):
        nonfinite((state, state))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

SCHED = constant_schedule(0.5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(), ValueError, "exactly one of schedule= .* or masks="),
        (dict(schedule=SCHED, masks={}), ValueError, "exactly one of"),
        (dict(schedule=SCHED, criterion="taylor"), ValueError, "criterion must be one of"),
        (dict(schedule=SCHED, criterion="random"), ValueError, "needs key="),
        (dict(schedule=SCHED, key=jax.random.key(0)), ValueError, "only used by criterion"),
        (dict(schedule=SCHED, criterion="random", key=3), TypeError, "PRNG key"),
        (dict(schedule=SCHED, scope="model"), ValueError, "scope must be"),
        (dict(schedule=lambda t: jnp.ones(3)), TypeError, "float scalar"),
        (dict(schedule=lambda t: jnp.float32(1.5)), ValueError, r"schedule\(0\) = 1.5"),
        (dict(schedule=0.5), TypeError, "schedule must be a function"),
        (dict(masks={"a": True}, structure=NM(2, 4)), ValueError, r"'structure'\] would be"),
    ],
)
def test_prune_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        prune(optax.sgd(0.1), **kwargs)


def test_inner_must_be_a_transform():
    with pytest.raises(TypeError, match="inner must be an optax GradientTransformation"):
        prune(optax.sgd, schedule=SCHED)


def test_update_needs_params():
    tx = prune(optax.sgd(0.1), schedule=SCHED)
    params = init_params()
    with pytest.raises(ValueError, match=r"update needs the current parameters"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(structure=NM(2, 5)), r"Dense_0/kernel: 2:5 sparsity needs the contracting axis"),
        (dict(where=r".*/nothing"), "selects no leaf"),
        (dict(where=r".*bias", roles={}), "missing from roles"),
    ],
)
def test_init_validates_eagerly(kwargs, match):
    tx = prune(optax.sgd(0.1), schedule=SCHED, **kwargs)
    with pytest.raises(ValueError, match=match):
        tx.init(init_params())


def test_init_rejects_nonfinite_params():
    params = init_params()
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="Dense_1/kernel: prune found 1 NaN/Inf"):
        prune(optax.sgd(0.1), schedule=SCHED).init(params)


@pytest.mark.parametrize(
    "make, error, match",
    [
        # an extra path that keeps everything is ignored (optax.masked hides leaves from
        # prune); one that prunes something is an error naming it
        (lambda m: {**m, "extra": jnp.zeros(3, bool)}, ValueError, "extra: masks prune"),
        (lambda m: jax.tree.map(lambda x: jnp.asarray(x, float), m), TypeError, "bool arrays"),
        (
            lambda m: {**m, "Dense_0": {**m["Dense_0"], "kernel": jnp.ones((3, 3), bool)}},
            ValueError,
            r"Dense_0/kernel: mask of shape \(3, 3\) does not broadcast",
        ),
    ],
)
def test_fixed_masks_errors(make, error, match):
    params = init_params()
    tx = prune(optax.sgd(0.1), masks=make(magnitude_masks(params, 0.5)))
    with pytest.raises(error, match=match):
        tx.init(params)


def test_strict_promotion(strict):
    params = init_params(dtype=jnp.bfloat16)
    grads = jax.tree.map(jnp.ones_like, params)
    with strict():
        tx = prune(optax.sgd(0.1), schedule=SCHED, criterion="saliency")
        updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert n_pruned(leaf(masks_of(state), "Dense_0/kernel")) == 12 * 16 // 2


# ----------------------------------------------------------------------------------------------
# Property: shapes, dtypes, sparsities, criteria, special values (one compilation per criterion)
# ----------------------------------------------------------------------------------------------

RESOLUTION = 2**20
PROPERTY_KERNELS = ("a/kernel", "b/kernel", "c/kernel", "d/kernel")


def fraction_schedule(step):
    """Sparsity ``step / 2**20``: the test sets the step count, so one compiled update serves
    every sparsity."""
    return jnp.asarray(step).astype(jnp.float32) / RESOLUTION


def property_tree(seed, special):
    """Params and gradients of fixed shapes and dtypes (odd sizes, a conv-like kernel, bf16)."""
    shapes = {
        "a": ((4, 6), jnp.float32),
        "b": ((7, 5), jnp.bfloat16),
        "c": ((3, 2, 8), jnp.float32),
        "d": ((1, 3), jnp.float32),
    }
    keys = jax.random.split(jax.random.key(seed), 2 * len(shapes))
    params, grads = {}, {}
    for i, (name, (shape, dtype)) in enumerate(shapes.items()):
        w = jax.random.normal(keys[2 * i], shape, jnp.float32)
        if special is not None and name in ("b", "c"):
            value = {"zeros": 0.0, "tiny": 1e-30, "huge": 1e30, "ties": 1.0}[special]
            w = jnp.full(shape, value) * jnp.sign(w)
        params[name] = {"kernel": w.astype(dtype), "bias": jnp.ones(shape[-1:], dtype)}
        gkeys = jax.random.split(keys[2 * i + 1])
        grads[name] = {
            k: jax.random.normal(gk, x.shape).astype(dtype)
            for gk, (k, x) in zip(gkeys, params[name].items())
        }
    return params, grads


@functools.cache
def property_update(criterion):
    key = jax.random.key(0) if criterion == "random" else None
    tx = prune(optax.sgd(0.1), schedule=fraction_schedule, criterion=criterion, key=key)
    return tx, jax.jit(tx.update)


def reference_mask(score, sparsity):
    """NumPy: prune the ``round(s * S)`` lowest ``|score|`` (float32), ties by position."""
    score = np.abs(np.asarray(score, np.float32)).ravel()
    expected = np.ones(score.size, bool)
    k = round(float(np.float32(sparsity)) * score.size)
    expected[np.argsort(score, kind="stable")[:k]] = False
    return expected


@settings()
@given(
    count=st.integers(0, RESOLUTION - 1) | st.sampled_from([0, 1, RESOLUTION // 2, RESOLUTION - 1]),
    seed=st.integers(0, 3),
    criterion=st.sampled_from(["magnitude", "saliency", "random"]),
    special=st.sampled_from([None, "zeros", "tiny", "huge", "ties"]),
)
def test_prune_property(count, seed, criterion, special):
    params, grads = property_tree(seed, special)
    tx, update = property_update(criterion)
    state = tx.init(params)._replace(count=jnp.int32(count))
    updates, state = update(grads, state, params)
    out = optax.apply_updates(params, updates)
    masks = masks_of(state)
    sparsity = count / RESOLUTION
    assert float(state.target) == np.float32(sparsity)
    for path in PROPERTY_KERNELS:
        mask = leaf(masks, path)
        assert n_pruned(mask) == round(float(np.float32(sparsity)) * mask.size), path
        assert np.all(np.asarray(leaf(out, path), np.float32)[~mask] == 0), path
        p, g = leaf(params, path), leaf(grads, path)
        if criterion == "magnitude":
            np.testing.assert_array_equal(mask.ravel(), reference_mask(p, sparsity))
        elif criterion == "saliency":
            np.testing.assert_array_equal(mask.ravel(), reference_mask(p * g, sparsity))
        expected = leaf(params, path) - np.asarray(0.1, p.dtype) * g
        kept = np.asarray(leaf(out, path))[mask]
        np.testing.assert_array_equal(kept, np.asarray(jnp.asarray(expected))[mask])
    for name in "abcd":  # biases are not pruned: plain sgd
        bias = params[name]["bias"]
        np.testing.assert_array_equal(
            np.asarray(out[name]["bias"]),
            np.asarray(optax.apply_updates(bias, -0.1 * grads[name]["bias"])),
        )
    assert not bool(nonfinite(state))
