"""Grouped convolutions, GroupNorm and GQA: groups, per-block ranking, shrunken == masked."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_structure import filled, fine_tune, n_params, shrink_in_dtype

import jcompress as jc
from jcompress.pruning import Channels, _groups, apply_masks, magnitude_masks, structured_masks
from jcompress.pruning._masks import masks_from_scores
from jcompress.pruning._plan import plan
from jcompress.structure import dependencies, shrink, shrink_nnx
from jcompress.tree import Member, Role


def members(group):
    return [
        (m.path, m.axis, m.offset, m.stride, m.width, m.blocks, m.block_axis) for m in group.members
    ]


def conv_groups(fn, params, x):
    """``feature_group_count`` of every convolution ``fn`` runs, in order."""
    jaxpr = jax.make_jaxpr(fn)(params, x)
    out = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "conv_general_dilated":
                out.append(e.params["feature_group_count"])
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return out


def removed_per_block(mask, axis, blocks):
    """How many channels along ``axis`` a channel mask removes in each of ``blocks`` blocks."""
    m = np.asarray(mask)
    alive = m.any(axis=tuple(a for a in range(m.ndim) if a != axis))
    return (~alive).reshape(blocks, -1).sum(1).tolist()


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class GroupedCNN(nn.Module):
    """conv -> grouped conv (4 groups) -> 1x1 conv -> spatial mean."""

    features: tuple[int, int] = (8, 12)

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.features[0], (3, 3))(x))
        x = nn.relu(nn.Conv(self.features[1], (3, 3), feature_group_count=4)(x))
        return nn.Conv(3, (1, 1))(x).mean((1, 2))


class GNCNN(nn.Module):
    """conv -> GroupNorm(4) -> conv -> GroupNorm(3) -> flatten -> Dense."""

    features: tuple[int, int] = (8, 6)
    groups: tuple[int, int] = (4, 3)

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=self.groups[0])(nn.Conv(self.features[0], (3, 3))(x)))
        x = nn.relu(nn.GroupNorm(num_groups=self.groups[1])(nn.Conv(self.features[1], (3, 3))(x)))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


HKV, REP, HEAD = 2, 3, 4


def gqa(p, x, *, repeat=False):
    """Grouped-query attention, 2 key/value heads shared by 3 query heads each, residual."""
    q = jnp.einsum("bte,ehd->bthd", x, p["q"]) + p["q_bias"]
    k = jnp.einsum("bte,ehd->bthd", x, p["k"])
    v = jnp.einsum("bte,ehd->bthd", x, p["v"])
    b, t = x.shape[:2]
    if repeat:  # k and v expanded to the query heads
        k, v = jnp.repeat(k, REP, axis=2), jnp.repeat(v, REP, axis=2)
        a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / 2.0, -1)
        o = jnp.einsum("bhts,bshd->bthd", a, v)
    else:  # q reshaped to (kv_heads, rep)
        q = q.reshape(b, t, HKV, REP, HEAD)
        a = jax.nn.softmax(jnp.einsum("btgrd,bsgd->bgrts", q, k) / 2.0, -1)
        o = jnp.einsum("bgrts,bsgd->btgrd", a, v).reshape(b, t, HKV * REP, HEAD)
    return x + jnp.einsum("bthd,hde->bte", o, p["o"])


def linen_case(model, x, seed=0):
    v = filled(jax.eval_shape(model.init, jax.random.key(0), x), seed)["params"]
    return (lambda p, x: model.apply({"params": p}, x)), v, x


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(3)
    e = 8
    gqa_params = {
        "q": rng.uniform(-1, 1, (e, HKV * REP, HEAD)),
        "q_bias": rng.uniform(-1, 1, (HKV * REP, HEAD)),
        "k": rng.uniform(-1, 1, (e, HKV, HEAD)),
        "v": rng.uniform(-1, 1, (e, HKV, HEAD)),
        "o": rng.uniform(-1, 1, (HKV * REP, HEAD, e)),
    }
    gqa_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), gqa_params)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 5, e)), jnp.float32)
    return {
        "grouped": linen_case(GroupedCNN(), jnp.asarray(rng.uniform(-1, 1, (2, 6, 6, 2)))),
        "groupnorm": linen_case(GNCNN(), jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 2)))),
        "gqa": (gqa, gqa_params, x),
        "gqa_repeat": (lambda p, x: gqa(p, x, repeat=True), gqa_params, x),
    }


GQA_WHERE = {"where": lambda path, leaf: path in ("q", "k", "v")}


@pytest.fixture(scope="module")
def shrunk(cases):
    out = {}
    for name, (fn, params, x) in cases.items():
        groups = dependencies(fn, params, x)
        # q/k/v are (features, heads, head_dim): jc.roles says heads and head_dim are output
        # axes, which is what lets them own (and so select) the head groups
        kw = dict(GQA_WHERE, roles=jc.roles(fn, params, x)) if name.startswith("gqa") else {}
        masks = structured_masks(params, 0.5, groups=groups, **kw)
        small_fn, small = shrink(fn, params, masks, x)
        out[name] = (fn, params, groups, masks, x, small_fn, small)
    return out


# ----------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------


def test_grouped_conv_groups(shrunk):
    g0, g1, g2 = shrunk["grouped"][2]
    assert members(g0) == [
        ("Conv_0/bias", 0, 0, 0, 1, 1, -1),
        ("Conv_0/kernel", 3, 0, 0, 1, 1, -1),
        ("Conv_1/kernel", 2, 0, 0, 1, 4, 3),  # input row c % 2, in output block c // 2 only
    ]
    assert members(g1) == [
        ("Conv_1/bias", 0, 0, 0, 1, 1, -1),
        ("Conv_1/kernel", 3, 0, 0, 1, 1, -1),
        ("Conv_2/kernel", 2, 0, 0, 1, 1, -1),
    ]
    assert [(g.size, g.blocks, g.blocked) for g in (g0, g1)] == [(8, 4, None), (12, 4, None)]
    assert "model output" in g2.blocked
    kernel_rows = g0.members[2]
    assert [(kernel_rows.indices(c, 2), kernel_rows.block(c, 2)) for c in (0, 3, 6)] == [
        ([0], 0),
        ([1], 1),
        ([0], 3),
    ]


def test_groupnorm_groups_are_whole_norm_groups(shrunk):
    g0, g1, out = shrunk["groupnorm"][2]
    assert members(g0) == [  # 4 norm groups of 2 channels: every member moves in runs of 2
        ("Conv_0/bias", 0, 0, 0, 2, 1, -1),
        ("Conv_0/kernel", 3, 0, 0, 2, 1, -1),
        ("Conv_1/kernel", 2, 0, 0, 2, 1, -1),
        ("GroupNorm_0/bias", 0, 0, 0, 2, 1, -1),
        ("GroupNorm_0/scale", 0, 0, 0, 2, 1, -1),
    ]
    assert members(g1) == [  # flatten: runs of 2 channels at every one of the 16 positions
        ("Conv_1/bias", 0, 0, 0, 2, 1, -1),
        ("Conv_1/kernel", 3, 0, 0, 2, 1, -1),
        ("Dense_0/kernel", 0, 0, 6, 2, 1, -1),
        ("GroupNorm_1/bias", 0, 0, 0, 2, 1, -1),
        ("GroupNorm_1/scale", 0, 0, 0, 2, 1, -1),
    ]
    assert [(g.size, g.blocks, g.blocked) for g in (g0, g1)] == [(4, 1, None), (3, 1, None)]
    assert Member("d", 0, 0, 6, width=2).indices(1, 24) == [2, 3, 8, 9, 14, 15, 20, 21]
    assert "model output" in out.blocked


@pytest.mark.parametrize("name", ["gqa", "gqa_repeat"])
def test_gqa_groups(shrunk, name):
    heads, qk, vo, stream = shrunk[name][2]
    assert members(heads) == [  # a key/value head with its 3 query heads and their o rows
        ("k", 1, 0, 0, 1, 1, -1),
        ("o", 0, 0, 0, 3, 1, -1),
        ("q", 1, 0, 0, 3, 1, -1),
        ("q_bias", 0, 0, 0, 3, 1, -1),
        ("v", 1, 0, 0, 1, 1, -1),
    ]
    assert [m[:2] for m in members(qk)] == [("k", 2), ("q", 2), ("q_bias", 1)]
    assert [m[:2] for m in members(vo)] == [("o", 1), ("v", 2)]
    assert [g.size for g in (heads, qk, vo)] == [HKV, HEAD, HEAD]
    assert [g.blocked for g in (heads, qk, vo)] == [None] * 3
    assert stream.blocked is not None


def test_groupnorm_straddling_conv_groups_is_blocked():
    def fn(p, x):
        y = jax.lax.conv_general_dilated(
            x, p["a"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
        )
        n, w, c = y.shape
        z = y.reshape(n, w, 2, c // 2)  # a GroupNorm-like split into 2 groups of 4
        z = (z - z.mean((1, 3), keepdims=True)).reshape(n, w, c)
        return jax.lax.conv_general_dilated(
            z, p["b"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=4
        ).sum()

    params = {"a": jnp.ones((1, 2, 8)), "b": jnp.ones((1, 2, 4))}
    g = dependencies(fn, params, jnp.ones((1, 3, 2)))[0]
    assert (g.size, g.blocks) == (2, 1)
    assert "cannot be split into the 4 equal blocks" in g.blocked

    def unaligned(p, x):
        y = jnp.concatenate([x @ p["a"], x], -1)  # 4 prunable channels, then 2 input channels
        y = jax.lax.conv_general_dilated(
            y, p["b"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=2
        )
        return y.sum()

    params = {"a": jnp.ones((2, 4)), "b": jnp.ones((1, 3, 4))}
    g = dependencies(unaligned, params, jnp.ones((1, 3, 2)))[0]
    assert "feature_group_count=2" in g.blocked and "unaligned" in g.blocked
    # whole conv groups of the concatenation, but the model-input group could not follow
    params = {"a": jnp.ones((2, 4)), "b": jnp.ones((1, 2, 6))}
    g = dependencies(_three, params, jnp.ones((1, 3, 2)))[0]
    assert "not one whole channel space" in g.blocked


def test_depthwise_multiplier_input_is_blocked_output_per_block():
    def fn(p, x):
        y = jax.lax.conv_general_dilated(
            x @ p["a"], p["k"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=4,
        )  # fmt: skip
        return y @ p["c"]

    params = {"a": jnp.ones((2, 4)), "k": jnp.ones((1, 1, 8)), "c": jnp.ones((8, 2))}
    g_in, g_out, _ = dependencies(fn, params, jnp.ones((1, 3, 2)))
    assert "each of its 4 grouped-convolution blocks holds one channel" in g_in.blocked
    assert (g_out.size, g_out.blocks, g_out.blocked) == (8, 4, None)


def _three(p, x):
    y = jnp.concatenate([x @ p["a"], x], -1)  # conv groups {0, 1}, {2, 3} prunable, {4, 5} not
    y = jax.lax.conv_general_dilated(
        y, p["b"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=3
    )
    return y.sum()


# ----------------------------------------------------------------------------------------------
# Ranking within blocks, one compiled program
# ----------------------------------------------------------------------------------------------


def test_grouped_ranking_is_per_block_and_lowest_norm(shrunk):
    _, params, _, masks, _, _, _ = shrunk["grouped"]
    # 8 channels in 4 blocks of 2: round(0.5 * 2) = 1 each; 12 in blocks of 3: round(1.5) = 2
    assert removed_per_block(masks["Conv_0"]["kernel"], 3, 4) == [1, 1, 1, 1]
    assert removed_per_block(masks["Conv_1"]["kernel"], 3, 4) == [2, 2, 2, 2]
    # NumPy reference: per channel, the sum over selected members (kernels) of its L2 norm
    k1 = np.asarray(params["Conv_1"]["kernel"])
    score = np.sqrt(np.sum(k1**2, (0, 1, 2)))
    score += np.sqrt(np.sum(np.asarray(params["Conv_2"]["kernel"]) ** 2, (0, 1, 3)))
    want = np.ones(12, bool)
    for b in range(4):
        block = np.arange(3 * b, 3 * b + 3)
        want[block[np.argsort(score[block])[:2]]] = False
    np.testing.assert_array_equal(np.asarray(masks["Conv_1"]["kernel"]).any((0, 1, 2)), want)
    # the grouped kernel's input rows follow the previous layer's channels block by block
    alive0 = np.asarray(masks["Conv_0"]["kernel"]).reshape(-1)
    rows = np.broadcast_to(masks["Conv_1"]["kernel"], k1.shape)[0, 0]  # (2, 12)
    for c in range(8):
        cols = slice(3 * (c // 2), 3 * (c // 2) + 3)
        np.testing.assert_array_equal(rows[c % 2, cols], want[cols] & alive0[c])


def test_group_masks_compile_once(cases):
    fn, params, x = cases["groupnorm"]
    groups = dependencies(fn, params, x)
    structured_masks(params, 0.5, groups=groups)
    before = _groups._group_program.cache_info()
    program_count = before.currsize
    a = structured_masks(params, 0.25, groups=groups)
    b = jax.jit(lambda s: structured_masks(params, s, groups=groups))(0.25)
    after = _groups._group_program.cache_info()
    assert after.currsize == program_count and after.hits >= before.hits + 2
    jax.tree.map(np.testing.assert_array_equal, a, b)  # jit == eager
    dead = np.flatnonzero(~np.asarray(a["Conv_0"]["kernel"]).reshape(-1))
    assert len(dead) == 2 and dead[0] % 2 == 0 and dead[1] == dead[0] + 1  # 1 of 4 norm groups


def test_previous_masks_stay_pruned_per_block(shrunk):
    """Gradual pruning (``previous=``): channels pruned before stay pruned, every block still
    loses the same number, the count is exact."""
    _, params, groups, _, _, _, _ = shrunk["grouped"]
    p = plan(params, structure=Channels(groups=groups))
    first = masks_from_scores(params, params, 0.25, p)
    second = masks_from_scores(params, params, 0.5, p, previous=first)
    for name, per, lost in (("Conv_0", 2, (0, 1)), ("Conv_1", 3, (1, 2))):
        a, b = (np.asarray(m[name]["kernel"]).any((0, 1, 2)) for m in (first, second))
        assert removed_per_block(first[name]["kernel"], 3, 4) == [lost[0]] * 4
        assert removed_per_block(second[name]["kernel"], 3, 4) == [lost[1]] * 4
        assert not np.any(b & ~a)  # nothing revived
        assert a.size == 4 * per


def test_global_scope_with_blocks_is_an_error(cases):
    fn, params, x = cases["grouped"]
    with pytest.raises(ValueError, match="use scope='layer'"):
        magnitude_masks(
            params, 0.5, scope="global", structure=Channels(groups=dependencies(fn, params, x))
        )


# ----------------------------------------------------------------------------------------------
# Shrinking: masked == shrunk, counts, groups kept
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grouped", "groupnorm", "gqa", "gqa_repeat"])
def test_shrunken_equals_masked(shrunk, name):
    fn, params, _, masks, x, small_fn, small = shrunk[name]
    want = jax.jit(fn)(apply_masks(params, masks), x)
    np.testing.assert_allclose(jax.jit(small_fn)(small, x), want, rtol=1e-5, atol=1e-5)
    assert n_params(small) < n_params(params)


def test_grouped_conv_counts_and_feature_group_count(shrunk):
    fn, params, _, _, x, small_fn, small = shrunk["grouped"]
    assert small["Conv_0"]["kernel"].shape == (3, 3, 2, 4)  # 8 - 4 * 1
    assert small["Conv_1"]["kernel"].shape == (3, 3, 1, 4)  # 4 inputs / 4 groups, 12 - 4 * 2
    assert small["Conv_2"]["kernel"].shape == (1, 1, 4, 3)
    assert n_params(small) == (9 * 2 * 4 + 4) + (9 * 1 * 4 + 4) + (4 * 3 + 3)
    assert conv_groups(small_fn, small, x) == conv_groups(fn, params, x) == [1, 4, 1]


def test_grouped_conv_rebuilt_module_runs_small_params(shrunk):
    """The per-block kernel gather matches flax's grouped-conv layout: the small parameters run
    in ``GroupedCNN(features=(4, 4))`` with the masked model's outputs."""
    _, params, _, masks, x, _, small = shrunk["grouped"]
    want = GroupedCNN().apply({"params": apply_masks(params, masks)}, x)
    got = GroupedCNN(features=(4, 4)).apply({"params": small}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_groupnorm_counts_and_rebuilt_module(shrunk):
    _, params, _, masks, x, _, small = shrunk["groupnorm"]
    # round(0.5 * 4) = 2 of 4 norm groups (4 channels), round(0.5 * 3) = 2 of 3 (2 channels)
    assert small["GroupNorm_0"]["scale"].shape == (4,) and small["Conv_1"]["kernel"].shape == (
        3,
        3,
        4,
        2,
    )
    assert small["Dense_0"]["kernel"].shape == (16 * 2, 3)
    assert n_params(small) == (9 * 2 * 4 + 4 + 8) + (9 * 4 * 2 + 2 + 4) + (32 * 3 + 3)
    want = GNCNN().apply({"params": apply_masks(params, masks)}, x)
    got = GNCNN(features=(4, 2), groups=(2, 1)).apply({"params": small}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "gqa_repeat"])
def test_gqa_counts(shrunk, name):
    _, _, _, _, _, _, small = shrunk[name]
    # one kv head of 2 and its 3 query heads go; 2 of 4 head dims of q/k and of v/o
    assert {k: v.shape for k, v in small.items()} == {
        "q": (8, 3, 2),
        "q_bias": (3, 2),
        "k": (8, 1, 2),
        "v": (8, 1, 2),
        "o": (3, 2, 8),
    }


def test_violating_per_block_counts_is_an_error(cases):
    fn, params, x = cases["grouped"]
    masks = jax.tree.map(lambda a: np.ones(np.shape(a), bool), params)
    masks["Conv_1"]["kernel"] = np.ones((1, 1, 1, 12), bool)
    masks["Conv_1"]["kernel"][..., [0, 1]] = False  # 2 from block 0, none from the others
    masks["Conv_1"]["bias"][[0, 1]] = False
    masks["Conv_2"]["kernel"][:, :, [0, 1]] = False
    with pytest.raises(ValueError, match=r"remove \[2, 0, 0, 0\] channels from the 4 blocks") as e:
        shrink(fn, params, masks, x)
    assert "'Conv_1/bias', 'Conv_1/kernel', 'Conv_2/kernel'" in str(e.value)


def test_fine_tune_small_params_under_jit(shrunk):
    _, _, _, _, x, small_fn, small = shrunk["grouped"]
    losses, p, step = fine_tune(small_fn, small, x, jnp.array([0, 2]), 15)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, small)
    assert step._cache_size() == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_dtypes_and_strict(cases, strict, dtype):
    small = shrink_in_dtype(strict, *cases["grouped"], dtype, 5e-2)
    assert small["Conv_1"]["kernel"].shape == (3, 3, 1, 4)


class NnxGrouped(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Conv(2, 8, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
        self.b = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.gn(self.a(x)))
        return self.out(nnx.relu(self.b(x)).mean((1, 2)))


def test_shrink_nnx_grouped_and_groupnorm():
    model = NnxGrouped(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = filled(jax.eval_shape(lambda: state), seed=4)
    nnx.update(model, state)
    x = jnp.linspace(-1, 1, 72).reshape(2, 6, 6, 1).repeat(2, -1)

    def fn(s, x):
        return nnx.merge(graphdef, s)(x)

    groups = dependencies(fn, state, x)
    # GroupNorm groups of 2 inside the grouped conv's 2 blocks of 4: 4 units, 2 blocks
    assert [(g.size, g.blocks, g.blocked) for g in groups[:2]] == [(4, 2, None), (8, 2, None)]
    masks = structured_masks(state, 0.5, groups=groups)
    small = shrink_nnx(model, masks, x)
    assert small.a.out_features == 4 and small.gn.num_groups == 2
    assert small.b.kernel.shape == (3, 3, 2, 4) and small.b.in_features == 4
    assert small.b.feature_group_count == 2 and small.out.in_features == 4
    np.testing.assert_allclose(small(x), fn(apply_masks(state, masks), x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Property: random grouped convolutions against a NumPy reference
# ----------------------------------------------------------------------------------------------


def _conv1d(x, w, groups):
    """NumPy VALID 1-D grouped convolution: x (N, W, C_in), w (K, C_in / G, C_out)."""
    k, cin_g, cout = w.shape
    cout_g = cout // groups
    out = np.zeros((x.shape[0], x.shape[1] - k + 1, cout))
    for o in range(cout):
        g = o // cout_g
        for t in range(k):
            out[:, :, o] += x[:, t : t + out.shape[1], g * cin_g : (g + 1) * cin_g] @ w[t, :, o]
    return out


def _grouped_fn(groups):
    def fn(p, x):
        dn = ("NWC", "WIO", "NWC")
        h = jnp.tanh(jax.lax.conv_general_dilated(x, p["a"], (1,), "VALID", dimension_numbers=dn))
        h = jax.lax.conv_general_dilated(
            h, p["b"], (1,), "VALID", dimension_numbers=dn, feature_group_count=groups
        )
        return jnp.tanh(h + p["b_bias"]).mean(1) @ p["c"]

    return fn


def _grouped_numpy(p, x, groups):
    p = {k: np.float64(v) for k, v in p.items()}
    h = np.tanh(_conv1d(np.float64(x), p["a"], 1))
    h = np.tanh(_conv1d(h, p["b"], groups) + p["b_bias"])
    return h.mean(1) @ p["c"]


@settings()
@given(
    groups=st.sampled_from([2, 4]),
    widths=st.sampled_from([(2, 3), (3, 2)]),
    sparsity=st.sampled_from([0.0, 0.34, 0.5]),
    scale=st.sampled_from([1e-30, 1.0, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_property_grouped_shrink_equals_numpy(groups, widths, sparsity, scale, seed):
    """Random grouped convolutions (bucketed shapes), fractions, tiny and huge weights: each
    block loses exactly round(sparsity * block) channels, the groups stay, and the shrunken
    function equals a NumPy grouped convolution of the masked weights."""
    cin_g, cout_g = widths
    c1, c2 = groups * cin_g, groups * cout_g
    rng = np.random.default_rng(seed)
    params = {
        "a": rng.normal(size=(2, 3, c1)) * scale,
        "b": rng.normal(size=(2, cin_g, c2)) * scale,
        "b_bias": rng.normal(size=(c2,)),
        "c": rng.normal(size=(c2, 2)),
    }
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    x = jnp.asarray(rng.uniform(-1, 1, (2, 5, 3)), jnp.float32)
    fn = _grouped_fn(groups)
    deps = dependencies(fn, params, x)
    assert [(g.size, g.blocks) for g in deps[:2]] == [(c1, groups), (c2, groups)]
    masks = structured_masks(params, sparsity, groups=deps, where=lambda p, _: p in ("a", "b"))
    small_fn, small = shrink(fn, params, masks, x)
    lost1, lost2 = round(sparsity * cin_g), round(sparsity * cout_g)
    assert removed_per_block(masks["a"], 2, groups) == [lost1] * groups
    assert removed_per_block(masks["b"], 2, groups) == [lost2] * groups
    assert small["b"].shape == (2, cin_g - lost1, c2 - groups * lost2)
    assert conv_groups(small_fn, small, x) == [1, groups]
    masked = {k: np.where(np.asarray(masks[k]), v, 0) for k, v in params.items()}
    want = _grouped_numpy(masked, x, groups)
    np.testing.assert_allclose(np.float64(small_fn(small, x)), want, rtol=1e-4, atol=1e-5)


def test_round_to_revives_equally_per_block(shrunk):
    fn, params, _, masks, x, _, _ = shrunk["grouped"]
    small_fn, small = shrink(fn, params, masks, x, round_to=8)
    # Conv_1: 1 of 3 kept per block (4 in all), 1 revived per block (the highest norm) -> 8;
    # Conv_0: 1 of 2 kept per block, 1 revived per block -> all 8 (as masked zeros)
    assert small["Conv_1"]["kernel"].shape == (3, 3, 2, 8)
    assert small["Conv_0"]["kernel"].shape == (3, 3, 2, 8)
    score = np.sum(np.float32(params["Conv_1"]["kernel"]) ** 2, (0, 1, 2))
    score += np.float32(params["Conv_1"]["bias"]) ** 2
    score += np.sum(np.float32(params["Conv_2"]["kernel"]) ** 2, (0, 1, 3))
    alive = np.asarray(masks["Conv_1"]["kernel"]).any((0, 1, 2))
    for b in range(4):
        block = np.arange(3 * b, 3 * b + 3)
        dead = block[~alive[block]]
        revived = dead[np.argmax(score[dead])]
        kept = np.sort([*block[alive[block]], revived])
        np.testing.assert_array_equal(
            small["Conv_1"]["bias"][2 * b : 2 * b + 2],
            apply_masks(params, masks)["Conv_1"]["bias"][kept],
        )
    np.testing.assert_allclose(
        small_fn(small, x), fn(apply_masks(params, masks), x), rtol=1e-5, atol=1e-5
    )


def _group_norm_fn(groups):
    def fn(p, x):
        h = jax.lax.conv_general_dilated(
            x, p["a"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
        )
        n, w, c = h.shape
        g = h.reshape(n, w, groups, c // groups)
        g = g - g.mean((1, 3), keepdims=True)  # (jnp.var's NaN guard would block the axis)
        g = g * jax.lax.rsqrt(jnp.square(g).mean((1, 3), keepdims=True) + 1e-5)
        h = jnp.tanh(g.reshape(n, w, c) * p["scale"] + p["bias"])
        return h.mean(1) @ p["c"]

    return fn


def _group_norm_numpy(p, x, groups):
    p = {k: np.float64(v) for k, v in p.items()}
    h = _conv1d(np.float64(x), p["a"], 1)
    n, w, c = h.shape
    g = h.reshape(n, w, groups, c // groups)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-5)
    return np.tanh(g.reshape(n, w, c) * p["scale"] + p["bias"]).mean(1) @ p["c"]


@settings()
@given(
    groups=st.sampled_from([2, 4]),
    group_size=st.sampled_from([1, 3]),
    sparsity=st.sampled_from([0.0, 0.25, 0.5]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_property_group_norm_shrink_equals_numpy(groups, group_size, sparsity, scale, seed):
    """A GroupNorm (written out: reshape to groups, normalise per group): whole norm groups are
    the unit, exactly round(sparsity * groups) go, and the shrunken function (fewer groups, same
    group size) equals NumPy's GroupNorm of the masked weights."""
    c = groups * group_size
    rng = np.random.default_rng(seed)
    params = {
        "a": rng.normal(size=(2, 3, c)) * scale,
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.normal(size=c),
        "c": rng.normal(size=(c, 2)),
    }
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    x = jnp.asarray(rng.uniform(-1, 1, (2, 5, 3)), jnp.float32)
    fn = _group_norm_fn(groups)
    [g, _] = dependencies(fn, params, x)
    assert (g.size, g.blocked) == (groups, None)
    assert {m.path: m.width for m in g.members} == {
        "a": group_size,
        "bias": group_size,
        "c": group_size,
        "scale": group_size,
    }
    masks = structured_masks(params, sparsity, groups=[g], where=lambda p, _: p == "a")
    small_fn, small = shrink(_group_norm_fn(groups), params, masks, x)
    kept = groups - round(sparsity * groups)
    assert small["a"].shape == (2, 3, kept * group_size)
    masked = {k: np.where(np.asarray(masks[k]), v, 0) for k, v in params.items()}
    # the masked model normalises zero groups to zero, then adds the (masked) bias: as NumPy
    want = _group_norm_numpy(masked, x, groups)
    np.testing.assert_allclose(np.float64(small_fn(small, x)), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# nn.scan layer stacks
# ----------------------------------------------------------------------------------------------


class ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(8)(nn.relu(nn.Dense(16)(h))), None


class ScanStack(nn.Module):
    """Dense in, 3 residual MLP layers stacked by ``nn.scan``, Dense out."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        layers = nn.scan(
            ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        h, _ = layers()(h, None)
        return nn.Dense(2)(nn.relu(h))


def test_nn_scan_stack_groups_and_shrink(strict):
    """Channels through an ``nn.scan`` stack: the residual stream threaded through the layers is
    one group with every layer's output Dense (the same channels in every layer); the hidden
    units are one group over the stacked kernels in which every layer loses its own units, as
    many in each layer (blocks along the stacked axis), so the stack stays rectangular."""
    fn, params, x = linen_case(ScanStack(), jnp.linspace(-1, 1, 10).reshape(2, 5))
    stream, hidden, out = dependencies(fn, params, x)
    s = "ScanScanLayer_0"
    assert [m[:2] for m in members(stream)] == [
        ("Dense_0/bias", 0),
        ("Dense_0/kernel", 1),
        ("Dense_1/kernel", 0),
        (f"{s}/Dense_0/bias", 1),
        (f"{s}/Dense_0/kernel", 2),
        (f"{s}/Dense_1/kernel", 1),
    ]
    assert members(hidden) == [  # per layer: 3 blocks (layers) of 16 along the stacked axis 0
        (f"{s}/Dense_0/kernel", 1, 0, 0, 1, 3, 0),
        (f"{s}/Dense_1/bias", 1, 0, 0, 1, 3, 0),
        (f"{s}/Dense_1/kernel", 2, 0, 0, 1, 3, 0),
    ]
    assert (stream.blocked, hidden.blocked, stream.size, hidden.size) == (None, None, 8, 48)
    assert (stream.blocks, hidden.blocks) == (1, 3)
    assert "model output" in out.blocked
    roles = {
        f"{s}/{d}/kernel": Role("matmul", contracting=(1,), output=(2,), stacked=(0,))
        for d in ("Dense_0", "Dense_1")
    }
    with strict():
        masks = structured_masks(params, 0.5, groups=[stream, hidden, out], roles=roles)
        small_fn, small = shrink(fn, params, masks, x)
    alive = np.asarray(masks[s]["Dense_1"]["kernel"]).any(1)  # (layers, 16)
    assert alive.sum(1).tolist() == [8, 8, 8] and len({tuple(a) for a in alive}) == 3
    assert small[s]["Dense_1"]["kernel"].shape == (3, 4, 8)  # 3 layers, 8 - 4 in, 16 - 8 out
    assert small[s]["Dense_0"]["kernel"].shape == (3, 8, 4)
    assert small["Dense_1"]["kernel"].shape == (4, 2)
    want = jax.jit(fn)(apply_masks(params, masks), x)
    np.testing.assert_allclose(jax.jit(small_fn)(small, x), want, rtol=1e-5, atol=1e-5)
    losses, _, _ = fine_tune(small_fn, small, x, jnp.array([0, 1]), 10)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------
# Which members select a group: owners (output axis), not readers
# ----------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """``h = stem(x); y = down(relu(up(h))); head(relu(h + y))``: a residual stream of 32."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(32, name="stem")(x)
        y = nn.Dense(32, name="down")(jax.nn.relu(nn.Dense(96, name="up")(h)))
        return nn.Dense(10, name="head")(jax.nn.relu(h + y))


@pytest.mark.parametrize(
    ("where", "shapes"),
    [
        # up owns its 96 outputs; it only reads the residual stream, which stays whole
        (
            "params/up/kernel",
            {"stem": (16, 32), "up": (32, 48), "down": (48, 32), "head": (32, 10)},
        ),
        # down owns (writes into) the residual stream: that group is pruned, up's outputs not
        (
            "params/down/kernel",
            {"stem": (16, 16), "up": (16, 96), "down": (96, 16), "head": (16, 10)},
        ),
        # head's outputs are the model's outputs (blocked): nothing of head's own is pruned
        (
            "params/(up|head)/kernel",
            {"stem": (16, 32), "up": (32, 48), "down": (48, 32), "head": (32, 10)},
        ),
    ],
)
def test_a_group_is_selected_only_through_its_owner(where, shapes):
    model, x = ResidualBlock(), jax.random.normal(jax.random.key(1), (4, 16))
    v = model.init(jax.random.key(0), x)
    fn = lambda v, x: model.apply(v, x)
    masks = structured_masks(v, 0.5, groups=dependencies(fn, v, x), where=where)
    small_fn, small = shrink(fn, v, masks, x)
    got = {k: tuple(small["params"][k]["kernel"].shape) for k in shapes}
    assert got == shapes
    np.testing.assert_allclose(
        small_fn(small, x), fn(apply_masks(v, masks), x), rtol=1e-5, atol=1e-5
    )


def test_a_reader_alone_selects_no_group():
    model, x = ResidualBlock(), jnp.ones((2, 16))
    v = model.init(jax.random.key(0), x)
    groups = dependencies(lambda v, x: model.apply(v, x), v, x)
    with pytest.raises(ValueError, match="owned by a selected leaf"):
        structured_masks(v, 0.5, groups=groups, where="params/head/kernel")


# ----------------------------------------------------------------------------------------------
# Broadcast masks and constants: free along channels (third-party attention code)
# ----------------------------------------------------------------------------------------------


class MaskedAttention(nn.Module):
    """Flax attention with a causal mask ``(batch, 1, q, k)``, broadcast over the heads."""

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(x[..., 0])
        h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)(x, mask=mask)
        return nn.Dense(3)(nn.LayerNorm()(x + h))


def test_masked_attention_heads_shrink():
    """``jnp.where(mask, weights, -big)`` broadcasts the mask over the heads: the heads (and
    head dimensions) stay prunable, and shrink broadcasts the mask to the kept heads. (The mask
    used to block the heads as "a model input or constant" meeting them.)"""
    model, x = MaskedAttention(), jax.random.normal(jax.random.key(1), (2, 5, 8))
    params = model.init(jax.random.key(0), x)["params"]

    def fn(p, x):
        return model.apply({"params": p}, x)

    heads, qk_dim, v_dim, stream, out = dependencies(fn, params, x)
    att = "MultiHeadDotProductAttention_0/"
    assert [(m.path, m.axis) for m in heads.members] == [
        (att + "key/bias", 0), (att + "key/kernel", 1), (att + "out/kernel", 0),
        (att + "query/bias", 0), (att + "query/kernel", 1),
        (att + "value/bias", 0), (att + "value/kernel", 1),
    ]  # fmt: skip
    assert (heads.size, heads.blocked, qk_dim.blocked, v_dim.blocked) == (4, None, None, None)
    assert "LayerNorm_0" in stream.blocked and "model output" in out.blocked
    masks = structured_masks(params, 0.5, groups=[heads], roles=jc.roles(fn, params, x))
    small_fn, small = shrink(fn, params, masks, x)
    assert small["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (8, 2, 4)
    assert small["MultiHeadDotProductAttention_0"]["out"]["kernel"].shape == (2, 4, 8)
    masked = fn(apply_masks(params, masks), x)
    np.testing.assert_allclose(jax.jit(small_fn)(small, x), masked, rtol=1e-5, atol=1e-6)


def test_broadcast_constant_meets_channels_but_cannot_be_contracted():
    params = {"a": jax.random.normal(jax.random.key(0), (4, 8)), "b": jnp.ones((8, 3))}
    x = jax.random.normal(jax.random.key(1), (2, 4))

    def scaled(p, x):  # elementwise with a broadcast constant: the hidden units still shrink
        return ((x @ p["a"]) * jnp.full((8,), 2.0)) @ p["b"]

    hidden, _ = dependencies(scaled, params, x)
    assert hidden.blocked is None and [(m.path, m.axis) for m in hidden.members] == [
        ("a", 1),
        ("b", 0),
    ]
    roles = jc.roles(scaled, params, x)
    masks = structured_masks(params, 0.5, groups=[hidden], roles=roles)
    small_fn, small = shrink(scaled, params, masks, x)
    assert small["a"].shape == (4, 4)
    np.testing.assert_allclose(small_fn(small, x), scaled(apply_masks(params, masks), x), rtol=1e-6)

    def summed(p, x):  # a sum over the hidden units through a broadcast depends on the width
        return ((x @ p["a"]) @ jnp.ones((8, 3))) * p["b"][0]

    assert "is contracted against a broadcast" in dependencies(summed, params, x)[0].blocked
