"""The "where to add" recipes of ARCHITECTURE.md, proven by plug-ins built only by following
them (tests/plugins/): a pruning criterion, a calibrated method, a compressed-leaf type."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from plugins.distance_criterion import distance_masks, distance_scores
from plugins.energy_pruning import energy_prune

import jcompress as jc
from jcompress.pruning import constant_schedule, masks_of, prune


def mlp(p, x):
    return jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) @ p["Dense_1"]["kernel"]


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    params = {
        "Dense_0": {"kernel": rng.normal(size=(16, 32)), "bias": np.zeros(32)},
        "Dense_1": {"kernel": rng.normal(size=(32, 8))},
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    scale = np.geomspace(0.01, 10.0, 16)  # input channels of very different energy
    batches = [(jnp.asarray(rng.normal(size=(64, 16)) * scale, jnp.float32),) for _ in range(2)]
    return params, batches


def lowest_k(score, k):
    """NumPy reference: True = kept, the k lowest (ties by position) pruned."""
    order = np.argsort(score.reshape(-1), kind="stable")
    keep = np.ones(score.size, bool)
    keep[order[:k]] = False
    return keep.reshape(score.shape)


# ---- a pruning criterion ---------------------------------------------------------------------


def test_toy_criterion_one_shot_equals_numpy(model):
    params, _ = model
    masks = distance_masks(params, 0.75)
    for layer in ("Dense_0", "Dense_1"):
        w = np.asarray(params[layer]["kernel"])
        want = lowest_k(np.abs(w - w.mean()), round(0.75 * w.size))
        np.testing.assert_array_equal(masks[layer]["kernel"], want)
    assert masks["Dense_0"]["bias"] is True
    # every structure comes with it: 2:4 along the contracting axis
    nm = distance_masks(params, None, structure=jc.pruning.NM(n=2, m=4))
    kept = np.asarray(nm["Dense_0"]["kernel"]).reshape(4, 4, 32).sum(1)
    assert (kept == 2).all()


def test_toy_criterion_trains_inside_prune(model):
    params, batches = model
    tx = prune(optax.sgd(0.01), schedule=constant_schedule(0.5), criterion=distance_scores)

    @jax.jit
    def step(p, state, x):
        grads = jax.grad(lambda p: jnp.mean(mlp(p, x) ** 2))(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    p, state = step(params, state, *batches[0])
    first = masks_of(state)
    np.testing.assert_array_equal(
        first["Dense_1"]["kernel"], distance_masks(params, 0.5)["Dense_1"]["kernel"]
    )
    for _ in range(3):
        p, state = step(p, state, *batches[1])
    for layer in ("Dense_0", "Dense_1"):
        w = np.asarray(p[layer]["kernel"])
        assert np.count_nonzero(w == 0) == w.size // 2  # exact, and no regrowth


# ---- a calibrated method ---------------------------------------------------------------------


def test_toy_calibrated_method_equals_hand_computed_statistics(model):
    params, batches = model
    pruned, masks = energy_prune(mlp, params, batches, 0.5)
    stats = {k: v for k, v in jc.capture(mlp, params, *batches[0]).items()}
    stats = {k: v.merge(jc.capture(mlp, params, *batches[1])[k]) for k, v in stats.items()}
    for layer in ("Dense_0", "Dense_1"):
        path = f"{layer}/kernel"
        w = np.asarray(params[layer]["kernel"])
        energy = np.sqrt(np.asarray(stats[path].sumsq))
        want = lowest_k(np.abs(w) * energy[:, None], w.size // 2)
        np.testing.assert_array_equal(masks[path], want)
        np.testing.assert_array_equal(pruned[layer]["kernel"], np.where(want, w, 0))
    assert pruned["Dense_0"]["bias"] is params["Dense_0"]["bias"]
    # the low-energy inputs lose more weights than magnitude alone would take from them
    mag = lowest_k(np.abs(np.asarray(params["Dense_0"]["kernel"])), 16 * 32 // 2)
    assert (~masks["Dense_0/kernel"][:4]).sum() > (~mag[:4]).sum()
