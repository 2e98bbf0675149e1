"""Tests for jc.pruning masks: exact counts, structures, scopes, real layouts, errors."""

from __future__ import annotations

from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jcompress.pruning as P
from jcompress.demo import CNN, MLP
from jcompress.pruning._masks import masks_from_scores
from jcompress.pruning._plan import plan
from jcompress.pruning._threshold import exact_count, keys_of, prune_lowest
from jcompress.tree import Group, Member, Role, leaves_with_paths


def ref_count(s, size):
    """The reference count: round-half-to-even of the exact product float32(s) * size."""
    return round(Fraction(float(np.float32(s))) * size)


def pruned(mask, shape=None):
    m = np.asarray(mask)
    if shape is not None:
        m = np.broadcast_to(m, shape)
    return int(m.size - np.count_nonzero(m))


def mask_dict(masks):
    return dict(leaves_with_paths(masks))


@pytest.fixture(scope="module")
def mlp_params():
    variables = MLP((32, 16, 10)).init(jax.random.key(0), jnp.zeros((1, 64)))
    return variables["params"]


@pytest.fixture(scope="module")
def cnn_params():
    variables = CNN((8, 16), hidden=32).init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
    return variables["params"]


# ----------------------------------------------------------------------------------------------
# Exact counts
# ----------------------------------------------------------------------------------------------

SIZES = [0, 1, 2, 3, 7, 10, 4096, 2**24 - 1, 2**24 + 3, 123_456_789, 2**31 - 1]
SPARSITIES = [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.999, 1e-45, 1e-30, 1e-7, 0.99999994]


def test_exact_count_matches_fraction_reference():
    counted = jax.jit(exact_count, static_argnums=1)
    rng = np.random.default_rng(0)
    sparsities = np.array(SPARSITIES + list(rng.random(40)), np.float32)
    for size in SIZES:
        got = np.asarray(jax.vmap(counted, in_axes=(0, None))(sparsities, size))
        np.testing.assert_array_equal(got, [ref_count(s, size) for s in sparsities])
    for size in (2**24 + 3, 7):  # eager (op by op) too
        assert int(exact_count(0.3, size)) == ref_count(0.3, size)


def test_exact_count_half_to_even():
    for size in range(1, 40):
        for s in (0.5, 0.25, 0.75, 0.125, 0.375):
            assert int(exact_count(s, size)) == round(Fraction(s) * size)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_magnitude_exact_counts_and_top_kept(cnn_params, scope, dtype, strict):
    params = jax.tree.map(lambda x: x.astype(dtype), cnn_params)
    for s in (0.0, 0.3, 0.5, 0.77):
        with strict():
            masks = mask_dict(P.magnitude_masks(params, s, scope=scope))
        kernels = {p: np.abs(np.asarray(x, np.float32)) for p, x in leaves_with_paths(params)}
        kernels = {p: x for p, x in kernels.items() if p.endswith("kernel")}
        assert all(masks[p] is True for p in masks if p.endswith("bias"))
        if scope == "layer":
            for p, x in kernels.items():
                assert masks[p].shape == x.shape and masks[p].dtype == bool
                assert pruned(masks[p]) == ref_count(s, x.size)
                if 0 < pruned(masks[p]) < x.size:
                    assert x[masks[p]].min() >= x[~masks[p]].max()
        else:
            total = sum(x.size for x in kernels.values())
            assert sum(pruned(masks[p]) for p in kernels) == ref_count(s, total)
            kept = np.concatenate([x[masks[p]] for p, x in kernels.items()])
            gone = np.concatenate([x[~masks[p]] for p, x in kernels.items()])
            if gone.size and kept.size:
                assert kept.min() >= gone.max()


def test_huge_leaf_exact_count_eager_and_jit():
    size, period = 2**24 + 3, 7
    # Few distinct values: every count ends inside a run of ties.
    values = (np.arange(size) % period).astype(np.float32)
    params = {"w": jnp.asarray(values)}
    p = plan(params, where="w")
    # params as an argument: a closed-over 2**24 constant would be constant-folded by XLA
    jitted = jax.jit(lambda params, s: masks_from_scores(params, params, s, p)["w"])
    for s in (0.3, 0.7, 0.123456):
        k = ref_count(s, size)
        mask = np.asarray(jitted(params, jnp.float32(s)))
        # Reference: the k smallest, ties by lowest index (value v sits at v, v + 7, ...).
        counts = np.bincount(values.astype(np.int64), minlength=period)
        v = int(np.searchsorted(np.cumsum(counts), k, side="right"))
        need = k - int(counts[:v].sum())
        expected = (values > v) | ((values == v) & (np.arange(size) // period >= need))
        np.testing.assert_array_equal(mask, expected)
        if s == 0.3:
            eager = P.magnitude_masks(params, s, where="w")["w"]
            np.testing.assert_array_equal(np.asarray(eager), expected)
    assert jitted._cache_size() == 1


def test_ties_lowest_index_pruned_first():
    params = {"a": {"kernel": jnp.zeros((4, 5))}, "b": {"kernel": jnp.zeros((3, 2))}}
    layer = mask_dict(P.magnitude_masks(params, 0.5))
    np.testing.assert_array_equal(layer["a/kernel"].ravel(), np.arange(20) >= 10)
    np.testing.assert_array_equal(layer["b/kernel"].ravel(), np.arange(6) >= 3)
    glob = mask_dict(P.magnitude_masks(params, 0.5, scope="global"))  # 13 of 26, tree order
    np.testing.assert_array_equal(glob["a/kernel"].ravel(), np.arange(20) >= 13)
    assert glob["b/kernel"].all()


def test_prune_lowest_matches_numpy_reference():
    rng = np.random.default_rng(1)
    run = jax.jit(prune_lowest)
    for trial in range(8):
        rows, sizes = 2, (257, 5000)
        high = (4, 4, 50, 2**31 - 1)[trial % 4]
        keys = [rng.integers(-1, high, (rows, n)).astype(np.int32) for n in sizes]
        flat = np.concatenate(keys, axis=1)
        k = rng.integers(0, flat.shape[1] + 1, rows).astype(np.int32)
        got = np.concatenate([np.asarray(m) for m in run([jnp.asarray(x) for x in keys], k)], 1)
        for r in range(rows):
            order = np.lexsort((np.arange(flat.shape[1]), flat[r]))
            expected = np.ones(flat.shape[1], bool)
            expected[order[: max(k[r], int((flat[r] < 0).sum()))]] = False
            np.testing.assert_array_equal(got[r], expected, err_msg=str(trial))
    assert run._cache_size() == 1


def test_keys_are_monotone_and_sign_blind():
    values = np.array([0.0, -0.0, 1e-45, 1e-30, 1.0, -1.5, 1e30, np.inf], np.float32)
    keys = np.asarray(keys_of(jnp.asarray(values)))
    mags = np.abs(values)
    assert keys[0] == keys[1] == 0
    for i in range(len(values)):
        for j in range(len(values)):
            assert (keys[i] < keys[j]) == (mags[i] < mags[j])


# ----------------------------------------------------------------------------------------------
# Criteria: random, saliency; jit == eager; determinism
# ----------------------------------------------------------------------------------------------


def test_random_masks_key_determinism_and_counts(mlp_params):
    a = mask_dict(P.random_masks(jax.random.key(0), mlp_params, 0.4))
    b = mask_dict(P.random_masks(jax.random.key(0), mlp_params, 0.4))
    c = mask_dict(P.random_masks(jax.random.key(1), mlp_params, 0.4))
    for p, x in leaves_with_paths(mlp_params):
        if p.endswith("kernel"):
            np.testing.assert_array_equal(a[p], b[p])
            assert pruned(a[p]) == ref_count(0.4, x.size)
    assert any(not np.array_equal(a[p], c[p]) for p in a if p.endswith("kernel"))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_saliency_keeps_top_products(mlp_params, scope, strict):
    grads = jax.tree.map(lambda x: jnp.cos(7.0 * x) + 0.1, mlp_params)
    with strict():
        masks = mask_dict(P.saliency_masks(mlp_params, grads, 0.6, scope=scope))
    gd = dict(leaves_with_paths(grads))
    scores = {
        p: np.abs(np.asarray(x) * np.asarray(gd[p]))
        for p, x in leaves_with_paths(mlp_params)
        if p.endswith("kernel")
    }
    kept = np.concatenate([x[masks[p]] for p, x in scores.items()])
    gone = np.concatenate([x[~masks[p]] for p, x in scores.items()])
    assert kept.min() >= gone.max() if scope == "global" else True
    total = sum(x.size for x in scores.values())
    if scope == "global":
        assert gone.size == ref_count(0.6, total)
    else:
        for p, x in scores.items():
            assert pruned(masks[p]) == ref_count(0.6, x.size)
            assert x[masks[p]].min() >= x[~masks[p]].max()


CONFIGS = [
    (None, "layer"),
    (None, "global"),
    (P.NM(2, 4), "layer"),
    (P.Channels(), "layer"),
    (P.Channels(norm="l1"), "global"),
]


@pytest.mark.parametrize(("structure", "scope"), CONFIGS)
def test_jit_equals_eager_and_deterministic(cnn_params, structure, scope):
    s = None if isinstance(structure, P.NM) else 0.45
    cnn_params = {k: cnn_params[k] for k in ("Conv_1", "Dense_1")}  # a conv and a dense

    def make(params, s):
        return P.magnitude_masks(params, s, scope=scope, structure=structure)

    eager = make(cnn_params, s)
    again = make(cnn_params, s)
    jitted = jax.jit(make)(cnn_params, s)
    for a, b, c in zip(jax.tree.leaves(eager), jax.tree.leaves(again), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


# ----------------------------------------------------------------------------------------------
# N:M and channels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (5, 32)])
def test_nm_pattern_and_top_n(cnn_params, n, m):
    params = {"Conv_1": cnn_params["Conv_1"], "Dense_0": cnn_params["Dense_0"]}
    if m == 32:
        params = {"Dense_0": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(64, 6)))}}
        params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].astype(jnp.float32)
    masks = mask_dict(P.nm_masks(params, n=n, m=m))
    for p, x in leaves_with_paths(params):
        if not p.endswith("kernel"):
            continue
        x = np.abs(np.asarray(x))
        axis = x.ndim - 2  # the last contracting axis of (..., in, out)
        mask = np.moveaxis(masks[p], axis, -1)
        xs = np.moveaxis(x, axis, -1)
        groups_m = mask.reshape(*mask.shape[:-1], -1, m)
        groups_x = xs.reshape(*xs.shape[:-1], -1, m)
        assert (groups_m.sum(-1) == n).all()
        kept = np.where(groups_m, groups_x, np.inf).min(-1)
        gone = np.where(groups_m, -np.inf, groups_x).max(-1)
        assert (kept >= gone).all()


def test_nm_ties_and_sparsity_argument():
    params = {"kernel": jnp.zeros((8, 3))}
    mask = P.magnitude_masks(params, 0.5, structure=P.NM(n=2, m=4))["kernel"]
    np.testing.assert_array_equal(mask[:, 0], [False, False, True, True] * 2)
    with pytest.raises(ValueError, match=r"NM\(n=2, m=4\) prunes 0.5 .* sparsity=0.7"):
        P.magnitude_masks(params, 0.7, structure=P.NM(n=2, m=4))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_channels_whole_channels_exact_count(cnn_params, scope, norm):
    s = 0.4
    masks = mask_dict(
        P.magnitude_masks(cnn_params, s, scope=scope, structure=P.Channels(norm=norm))
    )
    norms, total = {}, 0
    for p, x in leaves_with_paths(cnn_params):
        if not p.endswith("kernel"):
            continue
        x = np.abs(np.asarray(x, np.float64))
        assert masks[p].shape == (1,) * (x.ndim - 1) + (x.shape[-1],)
        flat = x.reshape(-1, x.shape[-1])
        norm_values = flat.sum(0) if norm == "l1" else np.sqrt((flat**2).sum(0))
        norms[p] = norm_values / norm_values.mean() if scope == "global" else norm_values
        total += x.shape[-1]
        if scope == "layer":
            c = masks[p].ravel()
            assert pruned(c) == ref_count(s, x.shape[-1])
            assert norms[p][c].min() >= norms[p][~c].max() * (1 - 1e-5)
    if scope == "global":
        c = np.concatenate([masks[p].ravel() for p in norms])
        v = np.concatenate([norms[p] for p in norms])
        assert pruned(c) == ref_count(s, total)
        assert v[c].min() >= v[~c].max() * (1 - 1e-5)


def _mlp_groups(params):
    g0 = Group(
        members=(
            Member("Dense_0/kernel", 1),
            Member("Dense_0/bias", 0),
            Member("Dense_1/kernel", 0),
        ),
        size=params["Dense_0"]["bias"].shape[0],
    )
    g1 = Group(
        members=(
            Member("Dense_1/kernel", 1),
            Member("Dense_1/bias", 0),
            Member("Dense_2/kernel", 0),
        ),
        size=params["Dense_1"]["bias"].shape[0],
    )
    out = Group(members=(Member("Dense_2/kernel", 1),), size=10, blocked="model output")
    return [g0, g1, out]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_groups_cover_every_member(mlp_params, scope):
    groups = _mlp_groups(mlp_params)
    masks = mask_dict(
        P.magnitude_masks(mlp_params, 0.25, scope=scope, structure=P.Channels(groups=groups))
    )
    ch0 = masks["Dense_0/kernel"].ravel()
    np.testing.assert_array_equal(masks["Dense_0/bias"], ch0)
    np.testing.assert_array_equal(masks["Dense_1/kernel"][:, 0], ch0)
    assert masks["Dense_2/bias"] is True  # the blocked group is skipped
    assert masks["Dense_2/kernel"].shape == (16, 1)
    if scope == "layer":
        assert pruned(ch0) == ref_count(0.25, 32)
        assert pruned(masks["Dense_1/bias"]) == ref_count(0.25, 16)
        # group score: sum of the member channel l2 norms (selected members only)
        k0 = np.asarray(mlp_params["Dense_0"]["kernel"])
        k1 = np.asarray(mlp_params["Dense_1"]["kernel"])
        score = np.sqrt((k0**2).sum(0)) + np.sqrt((k1**2).sum(1))
        assert score[ch0].min() >= score[~ch0].max() * (1 - 1e-5)
    else:
        assert pruned(ch0) + pruned(masks["Dense_1/bias"]) == ref_count(0.25, 48)
    dense = P.apply_masks(mlp_params, P.structured_masks(mlp_params, 0.25, groups=groups))
    assert (np.asarray(dense["Dense_0"]["bias"])[~ch0] == 0).all() if scope == "layer" else True


def test_channel_groups_strided_member():
    # A conv's 4 channels flattened with 2 spatial positions into a Dense of 8 inputs.
    params = {
        "Conv_0": {"kernel": jnp.arange(1.0, 5.0).reshape(1, 1, 1, 4)},
        "Dense_0": {"kernel": jnp.ones((8, 3))},
    }
    group = Group(
        members=(Member("Conv_0/kernel", 3), Member("Dense_0/kernel", 0, offset=0, stride=4)),
        size=4,
    )
    masks = P.structured_masks(params, 0.5, groups=[group], norm="l1")
    np.testing.assert_array_equal(masks["Conv_0"]["kernel"].ravel(), [False, False, True, True])
    np.testing.assert_array_equal(masks["Dense_0"]["kernel"][:, 0], [0, 0, 1, 1, 0, 0, 1, 1])


# ----------------------------------------------------------------------------------------------
# masks_from_scores: traced sparsity, previous masks
# ----------------------------------------------------------------------------------------------


def test_masks_from_scores_traced_sparsity_no_recompile(mlp_params):
    p = plan(mlp_params)
    f = jax.jit(lambda s: masks_from_scores(mlp_params, mlp_params, s, p))
    for s in (0.3, 0.6):
        m = f(jnp.float32(s))
        assert pruned(m["Dense_0"]["kernel"]) == ref_count(s, 64 * 32)
    assert f._cache_size() == 1


@pytest.mark.parametrize("structure", [P.Unstructured(), P.NM(n=1, m=4), P.Channels()])
def test_previous_masks_only_grow(mlp_params, structure):
    p = plan(mlp_params, structure=structure)
    f = jax.jit(lambda s, prev: masks_from_scores(mlp_params, mlp_params, s, p, previous=prev))
    # The previous masks prune by a different score: pruned weights must stay pruned.
    other = jax.tree.map(lambda x: jnp.cos(11.0 * x), mlp_params)
    prev = masks_from_scores(mlp_params, other, 0.3, plan(mlp_params, structure=P.Unstructured()))
    now = f(jnp.float32(0.5), prev)
    for path, m in leaves_with_paths(now):
        if not path.endswith("kernel"):
            continue
        shape = mlp_params[path.split("/")[0]]["kernel"].shape
        before = np.broadcast_to(mask_dict(prev)[path], shape)
        after = np.broadcast_to(m, shape)
        assert not (after & ~before).any()  # no regrowth
        if isinstance(structure, P.Unstructured):
            assert pruned(after) == ref_count(0.5, after.size)
    # k below the number already pruned: everything pruned stays pruned, nothing else.
    less = f(jnp.float32(0.1), prev)
    if isinstance(structure, P.Unstructured):
        for path, m in leaves_with_paths(less):
            if path.endswith("kernel"):
                np.testing.assert_array_equal(m, mask_dict(prev)[path])


# ----------------------------------------------------------------------------------------------
# apply_masks and sparsity
# ----------------------------------------------------------------------------------------------


def test_apply_masks_where_bf16_strict(mlp_params, strict):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), mlp_params)
    with strict():
        masks = P.magnitude_masks(params, 0.5)
        out = P.apply_masks(params, masks)
        value = P.sparsity(out)
    for (_, x), (_, y), (_, m) in zip(
        leaves_with_paths(params), leaves_with_paths(out), leaves_with_paths(masks)
    ):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(y), np.where(m, np.asarray(x), 0))
    sizes = [x.size for p, x in leaves_with_paths(params) if p.endswith("kernel")]
    assert value == sum(ref_count(0.5, n) for n in sizes) / sum(sizes)


def test_sparsity_value_counts_negative_zero():
    params = {"Dense_0": {"kernel": jnp.array([[0.0, -0.0], [1.0, 2.0]]), "bias": jnp.zeros(2)}}
    assert P.sparsity(params) == 0.5
    assert P.sparsity(params, where=".*bias") == 1.0
    assert float(jax.jit(P.sparsity)(params)) == 0.5


def test_nnx_state_with_variables():
    model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    _, state = nnx.split(model)
    masks = P.magnitude_masks(state, 0.5)
    assert not any(
        isinstance(x, nnx.Variable)
        for x in jax.tree.leaves(masks, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    out = P.apply_masks(state, masks)
    variables = jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert all(isinstance(v, nnx.Param) for v in variables)
    assert P.sparsity(out) == 0.5
    nnx.update(model, out)  # the masked state fits the model
    assert pruned(model.layers[0].kernel.get_value()) == 64


# ----------------------------------------------------------------------------------------------
# Layouts with hand-written roles
# ----------------------------------------------------------------------------------------------


def test_equinox_out_in_weight():
    rng = np.random.default_rng(2)
    params = {"linear": {"weight": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)}}
    roles = {"linear/weight": Role("matmul", contracting=(1,), output=(0,))}
    nm = P.nm_masks(params, n=2, m=4, roles=roles)["linear"]["weight"]
    assert (np.asarray(nm).reshape(6, 2, 4).sum(-1) == 2).all()
    ch = P.structured_masks(params, 0.5, roles=roles)["linear"]["weight"]
    assert ch.shape == (6, 1) and pruned(ch) == 3
    with pytest.raises(ValueError, match="selects no leaf"):
        P.magnitude_masks(params, 0.5)  # 'weight' is not a Flax name: roles= needed


def test_dense_general_heads():
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(16, 4, 8)), jnp.float32)  # (features, heads, head_dim)
    params = {"attn": {"query": {"kernel": kernel}}}
    roles = {"attn/query/kernel": Role("matmul", contracting=(0,), output=(1, 2))}
    ch = P.structured_masks(params, 0.25, roles=roles)["attn"]["query"]["kernel"]
    assert ch.shape == (1, 4, 8) and pruned(ch) == 8
    nm = P.nm_masks(params, n=2, m=4, roles=roles)["attn"]["query"]["kernel"]
    assert (np.moveaxis(np.asarray(nm), 0, -1).reshape(4, 8, 4, 4).sum(-1) == 2).all()


def test_scan_stack_each_slice_its_own_layer():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(12)(x)), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
    params = stack.init(jax.random.key(0), jnp.ones((1, 12)), None)["params"]
    kernel_path = "ScanBlock_0/Dense_0/kernel" if "ScanBlock_0" in params else None
    path = kernel_path or next(p for p, _ in leaves_with_paths(params) if p.endswith("kernel"))
    roles = {path: Role("matmul", contracting=(1,), output=(2,), stacked=(0,))}
    # scale the slices differently: a global-per-stack threshold would prune slice 0 only
    scaled = jax.tree.map(
        lambda x: x * jnp.array([1.0, 10.0, 100.0]).reshape(3, 1, 1) if x.ndim == 3 else x, params
    )
    masks = mask_dict(P.magnitude_masks(scaled, 0.5, where=path, roles=roles))
    for i in range(3):
        assert pruned(masks[path][i]) == ref_count(0.5, 144)
    ch = mask_dict(P.structured_masks(scaled, 0.5, where=path, roles=roles))[path]
    assert ch.shape == (3, 1, 12)
    assert [pruned(ch[i]) for i in range(3)] == [6, 6, 6]
    nm = mask_dict(P.nm_masks(scaled, n=1, m=4, where=path, roles=roles))[path]
    assert (np.asarray(nm).reshape(3, 3, 4, 12).sum(2) == 1).all()
    glob = mask_dict(P.magnitude_masks(scaled, 0.5, scope="global", where=path, roles=roles))
    assert pruned(glob[path]) == ref_count(0.5, 432)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_nonfinite_weights_and_grads_raise(mlp_params):
    bad = jax.tree.map(lambda x: x, mlp_params)
    bad["Dense_1"]["kernel"] = bad["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"Dense_1/kernel: magnitude pruning found 1 NaN/Inf"):
        P.magnitude_masks(bad, 0.5)
    grads = jax.tree.map(jnp.ones_like, mlp_params)
    grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[1, 1].set(jnp.inf)
    with pytest.raises(ValueError, match=r"Dense_0/kernel: .*NaN/Inf value\(s\) in the gradients"):
        P.saliency_masks(mlp_params, grads, 0.5)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(mlp_params, s):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        P.magnitude_masks(mlp_params, s)


def test_bad_inputs_name_path_and_fix(mlp_params):
    params = {"Dense_1": {"kernel": jnp.ones((10, 4))}}
    with pytest.raises(
        ValueError,
        match=r"^Dense_1/kernel: 2:4 sparsity needs the contracting axis \(size 10\) divisible by "
        r"4; exclude it with where= or pad the layer$",
    ):
        P.nm_masks(params, n=2, m=4)
    with pytest.raises(ValueError, match="n must be smaller than m"):
        P.NM(n=4, m=4)
    with pytest.raises(ValueError, match="must be positive"):
        P.NM(n=0, m=4)
    with pytest.raises(TypeError, match="must be an int"):
        P.NM(n=2.0, m=4)
    with pytest.raises(TypeError, match=r"pass it as structure=NM\(n=2, m=4\)"):
        P.magnitude_masks({"d": {"kernel": jnp.ones((4, 4))}}, P.NM(2, 4))  # pattern as sparsity
    with pytest.raises(ValueError, match="norm must be 'l1' or 'l2'"):
        P.Channels(norm="linf")
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global'"):
        P.magnitude_masks(mlp_params, 0.5, scope="model")
    with pytest.raises(ValueError, match="scope='global' has no meaning"):
        P.magnitude_masks(mlp_params, None, scope="global", structure=P.NM(2, 4))
    with pytest.raises(ValueError, match="needs a sparsity"):
        P.magnitude_masks(mlp_params, None)
    with pytest.raises(TypeError, match="structure must be"):
        P.magnitude_masks(mlp_params, 0.5, structure="2:4")
    ints = {"Dense_0": {"kernel": jnp.ones((4, 4), jnp.int8)}}
    with pytest.raises(ValueError, match=r"Dense_0/kernel: magnitude pruning needs floating"):
        P.magnitude_masks(ints, 0.5, where=".*kernel")
    with pytest.raises(ValueError, match=r"Dense_0/bias: selected by where=.* missing from roles"):
        P.magnitude_masks(mlp_params, 0.5, where="Dense_0/bias", roles={})
    with pytest.raises(ValueError, match="selects no leaf"):
        P.magnitude_masks(mlp_params, 0.5, where="nothing")


def test_masks_paths_must_match(mlp_params):
    masks = P.magnitude_masks(mlp_params, 0.5)
    wrong = {"params": masks}
    with pytest.raises(ValueError, match=r"(?s)masks does not match .* common prefix 'params/'"):
        P.apply_masks(mlp_params, wrong)
    shape_bad = jax.tree.map(lambda m: m, masks)
    shape_bad["Dense_0"]["kernel"] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match=r"Dense_0/kernel: a mask of shape \(3, 3\)"):
        P.apply_masks(mlp_params, shape_bad)
    float_mask = jax.tree.map(lambda m: m, masks)
    float_mask["Dense_0"]["kernel"] = jnp.ones((64, 32))
    with pytest.raises(TypeError, match=r"Dense_0/kernel: masks must be bool"):
        P.apply_masks(mlp_params, float_mask)


def test_group_errors(mlp_params):
    missing = Group(members=(Member("Dense_9/kernel", 1), Member("Dense_0/kernel", 1)), size=32)
    with pytest.raises(ValueError, match=r"Dense_9/kernel: a member of a channel group"):
        P.structured_masks(mlp_params, 0.5, groups=[missing])
    blocked = Group(members=(Member("Dense_0/kernel", 1),), size=32, blocked="reduced by a norm")
    with pytest.raises(ValueError, match=r"no prunable channel group .* 'reduced by a norm'"):
        P.structured_masks(mlp_params, 0.5, groups=[blocked])
    too_big = Group(members=(Member("Dense_0/kernel", 1),), size=40)
    with pytest.raises(ValueError, match=r"Dense_0/kernel: a group of 40 channels"):
        P.structured_masks(mlp_params, 0.5, groups=[too_big])
    with pytest.raises(TypeError, match=r"sequence of jcompress\.tree\.Group"):
        P.Channels(groups=missing)


@pytest.mark.parametrize("symmetric", [True, False])
def test_sparsity_of_quantized_leaves(mlp_params, symmetric):
    from jcompress import quantization as Q

    masked = P.apply_masks(mlp_params, P.magnitude_masks(mlp_params, 0.5))
    quantized = Q.quantize(masked, Q.QuantSpec(bits=4, symmetric=symmetric))
    kernels = [
        np.asarray(x.dequantize()) for p, x in leaves_with_paths(quantized) if p.endswith("kernel")
    ]
    assert P.sparsity(quantized) == sum((k == 0).sum() for k in kernels) / sum(
        k.size for k in kernels
    )
    assert P.sparsity(quantized) >= P.sparsity(masked) == 0.5  # pruned zeros stay zero


def test_score_masks_any_scores_exact_and_checked():
    from jcompress.pruning import score_masks

    params = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}}
    scores = np.arange(32, dtype=np.float32)[::-1].reshape(8, 4)
    masks = score_masks(params, {"Dense_0/kernel": scores}, 0.25)  # flat dict of the selection
    np.testing.assert_array_equal(masks["Dense_0"]["kernel"], scores >= 8)
    assert masks["Dense_0"]["bias"] is True
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"Dense_0/kernel: score_masks found 1 NaN/Inf .* scores"):
        score_masks(params, {"Dense_0/kernel": bad}, 0.25)
    with pytest.raises(ValueError, match="scores"):
        score_masks(params, {"other": scores}, 0.25)
