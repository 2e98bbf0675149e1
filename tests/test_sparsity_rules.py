"""Per-layer sparsity rules ``[(regex, sparsity | NM | None), ...]`` in every mask criterion.

The first ``re.fullmatch`` on a leaf's path wins; ``None`` leaves it dense; ``NM(n, m)`` prunes it
N:M. Each leaf's mask must equal the criterion called on that leaf alone with its rule's value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jcompress as jc
from jcompress import pruning as P
from jcompress.pruning import (
    NM,
    magnitude_masks,
    random_masks,
    saliency_masks,
    score_masks,
    structured_masks,
    wanda_masks,
)
from jcompress.runtime import InputStats


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a": {"kernel": jnp.asarray(rng.standard_normal((16, 8), np.float32)), "bias": jnp.ones(8)},
        "b": {"kernel": jnp.asarray(rng.standard_normal((8, 12), np.float32))},
        "c": {"kernel": jnp.asarray(rng.standard_normal((12, 4), np.float32))},
    }


RULES = [("a/kernel", 0.25), ("b/kernel", None), (".*", 0.75)]


def _pruned(mask):
    return int(np.sum(~np.asarray(mask)))


def test_magnitude_rules_equal_one_call_per_leaf():
    params = _params()
    masks = magnitude_masks(params, RULES)
    alone_a = magnitude_masks(params, 0.25, where="a/kernel")["a"]["kernel"]
    alone_c = magnitude_masks(params, 0.75, where="c/kernel")["c"]["kernel"]
    np.testing.assert_array_equal(masks["a"]["kernel"], alone_a)
    np.testing.assert_array_equal(masks["c"]["kernel"], alone_c)
    assert masks["b"]["kernel"] is True and masks["a"]["bias"] is True  # dense / not selected
    assert _pruned(masks["a"]["kernel"]) == round(0.25 * 128)
    assert _pruned(masks["c"]["kernel"]) == round(0.75 * 48)
    # the kept weights are the largest of their own leaf
    kept = np.abs(np.asarray(params["c"]["kernel"]))[np.asarray(masks["c"]["kernel"])]
    dropped = np.abs(np.asarray(params["c"]["kernel"]))[~np.asarray(masks["c"]["kernel"])]
    assert kept.min() >= dropped.max()


def test_first_match_wins_and_nm_rules():
    params = _params()
    masks = magnitude_masks(params, [("a/kernel", NM(2, 4)), ("[ab]/kernel", 0.9), (".*", 0.5)])
    groups = np.asarray(masks["a"]["kernel"]).reshape(4, 4, 8)  # groups of 4 along `in`
    assert (groups.sum(axis=1) == 2).all()
    np.testing.assert_array_equal(
        masks["a"]["kernel"], jc.pruning.nm_masks(params, n=2, m=4, where="a/kernel")["a"]["kernel"]
    )
    assert _pruned(masks["b"]["kernel"]) == round(0.9 * 96)  # the second rule, not the third
    assert _pruned(masks["c"]["kernel"]) == 24


def test_jit_equals_eager():
    params = _params()
    eager = magnitude_masks(params, RULES)
    jitted = jax.jit(lambda p: magnitude_masks(p, RULES))(params)
    for path in ("a", "c"):
        np.testing.assert_array_equal(eager[path]["kernel"], jitted[path]["kernel"])


def test_every_criterion_takes_rules():
    params = _params()
    key = jax.random.key(3)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), params)
    scores = {p: jnp.abs(params[p]["kernel"]) + 1.0 for p in ("a", "b", "c")}
    flat_scores = {f"{p}/kernel": s for p, s in scores.items()}
    stats = {
        f"{p}/kernel": InputStats(
            jnp.ones(params[p]["kernel"].shape[0]),
            jnp.asarray(rng.random(params[p]["kernel"].shape[0], np.float32) + 0.5),
            jnp.array(4),
        )
        for p in ("a", "b", "c")
    }
    cases = {
        "random": (
            random_masks(key, params, RULES),
            lambda s, w: random_masks(key, params, s, where=w),
        ),
        "saliency": (
            saliency_masks(params, grads, RULES),
            lambda s, w: saliency_masks(params, grads, s, where=w),
        ),
        "score (flat)": (
            score_masks(params, flat_scores, RULES),
            lambda s, w: score_masks(params, {w: flat_scores[w]}, s, where=w),
        ),
        "wanda": (
            wanda_masks(params, stats, RULES),
            lambda s, w: wanda_masks(params, stats, s, where=w),
        ),
    }
    for name, (masks, alone) in cases.items():
        for leaf, s in (("a", 0.25), ("c", 0.75)):
            np.testing.assert_array_equal(
                masks[leaf]["kernel"], alone(s, f"{leaf}/kernel")[leaf]["kernel"], err_msg=name
            )
        assert masks["b"]["kernel"] is True, name


def test_structured_rules_prune_channels_per_leaf():
    params = _params()
    masks = structured_masks(params, [("a/kernel", 0.5), ("c/kernel", 0.25)])
    assert masks["a"]["kernel"].shape == (1, 8) and _pruned(masks["a"]["kernel"]) == 4
    assert masks["c"]["kernel"].shape == (1, 4) and _pruned(masks["c"]["kernel"]) == 1
    assert masks["b"]["kernel"] is True


@pytest.mark.parametrize(
    "rules, scope, error, match",
    [
        ([(".*", 0.5), ("a/kernel", 0.9)], "layer", ValueError, "'a/kernel' selects no leaf"),
        ([("nothing", 0.5)], "layer", ValueError, "matches no path"),
        ([(".*", None)], "layer", ValueError, "left dense"),
        ([(".*", 1.5)], "layer", ValueError, r"rule 0 \('\.\*'\): the sparsity must be in"),
        ([(".*", "half")], "layer", TypeError, "a number in \\[0, 1\\), NM"),
        ([(".*", 0.5)], "global", ValueError, "scope='layer'"),
        ([("(", 0.5)], "layer", ValueError, "not a valid regular expression"),
    ],
)
def test_bad_rules_name_the_rule_and_fix(rules, scope, error, match):
    with pytest.raises(error, match=match):
        magnitude_masks(_params(), rules, scope=scope)


def test_nm_with_a_structure_or_groups_is_refused():
    params = _params()
    with pytest.raises(ValueError, match="put NM"):
        magnitude_masks(params, [(".*", 0.5)], structure=NM(2, 4))
    with pytest.raises(ValueError, match="N:M rules go with"):
        magnitude_masks(params, [(".*", NM(2, 4))], structure=jc.pruning.Channels())


SIZES = st.sampled_from([(8, 4), (16, 8), (24, 12)])
FRACTION = st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.77, 0.99])


@given(SIZES, SIZES, FRACTION, FRACTION, st.integers(0, 2**16))
def test_property_exact_counts_per_leaf(shape_a, shape_b, s_a, s_b, seed):
    rng = np.random.default_rng(seed)
    params = {
        "a": {"kernel": jnp.asarray(rng.standard_normal(shape_a, np.float32))},
        "b": {"kernel": jnp.asarray(rng.standard_normal(shape_b, np.float32))},
    }
    masks = magnitude_masks(params, [("a/.*", s_a), ("b/.*", s_b)])
    for leaf, s in (("a", s_a), ("b", s_b)):
        size = int(np.prod(params[leaf]["kernel"].shape))
        assert _pruned(masks[leaf]["kernel"]) == round(float(np.float32(s)) * size)


def test_sparsegpt_rules_equal_one_call_per_value():
    rng = np.random.default_rng(4)
    params = {
        "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((8, 16), np.float32))},
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((16, 8), np.float32))},
        "Dense_2": {"kernel": jnp.asarray(rng.standard_normal((8, 4), np.float32))},
    }

    def fn(p, x):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"])
        return jnp.tanh(h @ p["Dense_1"]["kernel"]) @ p["Dense_2"]["kernel"]

    xs = [(jnp.asarray(rng.standard_normal((32, 8), np.float32)),) for _ in range(2)]
    rules = [("Dense_0/.*", 0.5), ("Dense_1/.*", NM(2, 4)), ("Dense_2/.*", None)]
    pruned, masks = jc.pruning.sparsegpt(fn, params, xs, rules, quiet=True)
    one, m0 = jc.pruning.sparsegpt(fn, params, xs, 0.5, where="Dense_0/kernel", quiet=True)
    two, m1 = jc.pruning.sparsegpt(
        fn, params, xs, None, structure=NM(2, 4), where="Dense_1/kernel", quiet=True
    )
    for name, alone, mask in (("Dense_0", one, m0), ("Dense_1", two, m1)):
        np.testing.assert_allclose(pruned[name]["kernel"], alone[name]["kernel"], rtol=1e-6)
        np.testing.assert_array_equal(masks[name]["kernel"], mask[name]["kernel"])
    np.testing.assert_array_equal(pruned["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
    assert masks["Dense_2"]["kernel"] is True
    assert _pruned(masks["Dense_0"]["kernel"]) == 64
    groups = np.asarray(masks["Dense_1"]["kernel"]).reshape(4, 4, 8)
    assert (groups.sum(axis=1) == 2).all()
    with pytest.raises(ValueError, match="structure=NM fixes each leaf"):
        jc.pruning.sparsegpt(fn, params, xs, rules, structure=NM(2, 4), quiet=True)


def _sgd_steps(tx, params, steps):
    state = tx.init(params)
    step = jax.jit(lambda p, s: _apply(tx, p, s))
    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append(jc.pruning.masks_of(state))
    return params, state, history


def _apply(tx, params, state):
    grads = jax.tree.map(lambda x: 0.01 * jnp.sign(x), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_prune_schedule_rules_match_one_shot_rules():
    params = _params()
    rules = [
        ("a/kernel", P.constant_schedule(0.25)),
        ("b/kernel", None),
        (".*", P.constant_schedule(0.75)),
    ]
    tx = P.prune(optax.sgd(0.1), schedule=rules)
    pruned, state, [masks] = _sgd_steps(tx, params, 1)
    expected = magnitude_masks(params, RULES)  # the same targets, one shot, from step 0's weights
    for leaf in ("a", "c"):
        np.testing.assert_array_equal(masks[leaf]["kernel"], expected[leaf]["kernel"])
        assert (np.asarray(pruned[leaf]["kernel"])[~np.asarray(masks[leaf]["kernel"])] == 0).all()
    assert np.asarray(masks["b"]["kernel"]).ndim == 0 and bool(masks["b"]["kernel"])
    assert int(np.sum(np.asarray(pruned["b"]["kernel"]) == 0)) == 0  # dense, only trained
    np.testing.assert_array_equal(state.target, [0.25, 0.75])


def test_prune_schedule_rules_follow_each_schedule_without_regrowth():
    params = _params()
    early = P.polynomial_schedule(0.5, begin_step=0, end_step=4, update_every=2)
    late = P.polynomial_schedule(0.8, begin_step=2, end_step=6, update_every=2)
    tx = P.prune(optax.sgd(0.1), schedule=[("a/.*", early), ("[bc]/kernel", late)])
    traces = []
    tx_update = tx.update

    def counted(*args, **kwargs):
        traces.append(1)
        return tx_update(*args, **kwargs)

    tx = optax.GradientTransformationExtraArgs(tx.init, counted)
    _, _, history = _sgd_steps(tx, params, 8)
    assert len(traces) == 1  # one compile for every step, targets changing or not
    for step, masks in enumerate(history):
        for leaf, schedule in (("a", early), ("b", late), ("c", late)):
            size = params[leaf]["kernel"].size
            target = float(schedule(step))
            assert _pruned(masks[leaf]["kernel"]) == round(float(np.float32(target)) * size)
            if step:
                before = np.asarray(history[step - 1][leaf]["kernel"])
                assert not (np.asarray(masks[leaf]["kernel"]) & ~before).any()  # no regrowth


def test_prune_schedule_rules_errors():
    sched = P.constant_schedule(0.5)
    with pytest.raises(ValueError, match="scope='layer'"):
        P.prune(optax.sgd(0.1), schedule=[(".*", sched)], scope="global")
    with pytest.raises(TypeError, match="must give a schedule"):
        P.prune(optax.sgd(0.1), schedule=[(".*", 0.5)])
    with pytest.raises(ValueError, match="nothing to prune"):
        P.prune(optax.sgd(0.1), schedule=[(".*", None)])
    tx = P.prune(optax.sgd(0.1), schedule=[("nothing", sched), (".*", sched)])
    with pytest.raises(ValueError, match="'nothing' selects no leaf"):
        tx.init(_params())
