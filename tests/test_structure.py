"""jc.structure.dependencies and shrink: exact groups, shrunken == masked, counts, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress.demo import MLP
from jcompress.pruning import apply_masks, structured_masks
from jcompress.structure import dependencies, shrink, shrink_linen, shrink_nnx
from jcompress.tree import Member, leaves_with_paths


def members(group):
    return [(m.path, m.axis, m.offset, m.stride) for m in group.members]


def n_params(tree):
    return sum(int(np.size(x)) for _, x in leaves_with_paths(tree))


def group_masks(params, groups, fraction, seed=0):
    """NumPy reference masks: ``round(fraction * size)`` random channels of every prunable group
    removed from every member (a flat ``{path: mask}`` dict)."""
    rng = np.random.default_rng(seed)
    masks = {p: np.ones(np.shape(x), bool) for p, x in leaves_with_paths(params)}
    for g in groups:
        if g.blocked is not None:
            continue
        dead = rng.choice(g.size, round(fraction * g.size), replace=False)
        for m in g.members:
            index = [slice(None)] * masks[m.path].ndim
            n = masks[m.path].shape[m.axis]
            index[m.axis] = [i for c in dead for i in m.indices(int(c), n)]
            masks[m.path][tuple(index)] = False
    return masks


def kept(mask):
    """Output channels (last axis) a mask keeps anything of."""
    m = np.asarray(mask)
    return int(np.sum(m.any(axis=tuple(range(m.ndim - 1)))))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class BNCNN(nn.Module):
    """Conv -> BatchNorm -> relu -> Conv -> relu -> avg_pool -> flatten -> Dense -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(5)(x))
        return nn.Dense(3)(x)


class Residual(nn.Module):
    """A residual stream (Dense_0 + Dense_1), a bottleneck (Dense_2), a concat with Dense_3."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x)
        h = h + nn.Dense(6)(nn.relu(nn.Dense(5)(h)))
        h = jnp.concatenate([h, nn.Dense(3)(x)], -1)
        return nn.Dense(2)(nn.relu(h))


class Block(nn.Module):
    """A pre-norm transformer block: 4-head attention and an MLP, both residual."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)(h, h)
        h = nn.relu(nn.Dense(12)(nn.LayerNorm()(x)))
        return x + nn.Dense(8)(h)


class Depthwise(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.Conv(6, (3, 3), feature_group_count=6)(x)
        return nn.Conv(4, (1, 1))(x).mean((1, 2))


def filled(shapes, seed=0):
    """Random values for a tree of ShapeDtypeStructs, made with NumPy (no XLA compile).

    Vectors (biases, norm scales, statistics) in [0.5, 1.5], the rest in [-1, 1].
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(
            rng.uniform(0.5, 1.5, s.shape) if len(s.shape) == 1 else rng.uniform(-1, 1, s.shape),
            s.dtype,
        ),
        shapes,
    )


def linen_case(model, x, *, whole_variables=False):
    v = filled(jax.eval_shape(model.init, jax.random.key(0), x))
    if whole_variables:
        return (lambda p, x: model.apply(p, x)), v, x
    return (lambda p, x: model.apply({"params": p}, x)), v["params"], x


@pytest.fixture(scope="module")
def cases():
    return {
        "mlp": linen_case(MLP((8, 6, 3)), jnp.ones((2, 5))),
        "bncnn": linen_case(BNCNN(), jnp.ones((2, 6, 6, 1)), whole_variables=True),
        "residual": linen_case(Residual(), jnp.ones((2, 4))),
        "block": linen_case(Block(), jnp.ones((2, 5, 8))),
        "depthwise": linen_case(Depthwise(), jnp.ones((2, 5, 5, 2))),
    }


# ----------------------------------------------------------------------------------------------
# dependencies: exact groups
# ----------------------------------------------------------------------------------------------


def test_mlp_groups(cases):
    fn, params, x = cases["mlp"]
    g0, g1, g2 = dependencies(fn, params, x)
    assert members(g0) == [
        ("Dense_0/bias", 0, 0, 0),
        ("Dense_0/kernel", 1, 0, 0),
        ("Dense_1/kernel", 0, 0, 0),
    ]
    assert (g0.size, g0.blocked, g1.size, g1.blocked) == (8, None, 6, None)
    assert members(g1) == [
        ("Dense_1/bias", 0, 0, 0),
        ("Dense_1/kernel", 1, 0, 0),
        ("Dense_2/kernel", 0, 0, 0),
    ]
    assert members(g2) == [("Dense_2/bias", 0, 0, 0), ("Dense_2/kernel", 1, 0, 0)]
    assert g2.blocked == "reaches the model output (output 0, axis 1)"


def test_cnn_batchnorm_flatten_groups(cases):
    fn, variables, x = cases["bncnn"]
    g0, g1, g2, g3 = dependencies(fn, variables, x)
    assert members(g0) == [
        ("batch_stats/BatchNorm_0/mean", 0, 0, 0),
        ("batch_stats/BatchNorm_0/var", 0, 0, 0),
        ("params/BatchNorm_0/bias", 0, 0, 0),
        ("params/BatchNorm_0/scale", 0, 0, 0),
        ("params/Conv_0/bias", 0, 0, 0),
        ("params/Conv_0/kernel", 3, 0, 0),
        ("params/Conv_1/kernel", 2, 0, 0),
    ]
    # avg_pool to 3x3, flatten: channel c of Conv_1 is rows c, c + 6, ... of Dense_0
    assert members(g1) == [
        ("params/Conv_1/bias", 0, 0, 0),
        ("params/Conv_1/kernel", 3, 0, 0),
        ("params/Dense_0/kernel", 0, 0, 6),
    ]
    assert Member("params/Dense_0/kernel", 0, 0, 6).indices(1, 54)[:3] == [1, 7, 13]
    assert (g0.size, g1.size, g2.size, g3.size) == (4, 6, 5, 3)
    assert [g.blocked is None for g in (g0, g1, g2, g3)] == [True, True, True, False]


def test_residual_and_concat_groups(cases):
    fn, params, x = cases["residual"]
    stream, bottleneck, side, out = dependencies(fn, params, x)
    assert members(stream) == [  # both writers of the residual stream, both readers
        ("Dense_0/bias", 0, 0, 0),
        ("Dense_0/kernel", 1, 0, 0),
        ("Dense_1/bias", 0, 0, 0),
        ("Dense_1/kernel", 1, 0, 0),
        ("Dense_2/kernel", 0, 0, 0),
        ("Dense_4/kernel", 0, 0, 0),
    ]
    assert members(bottleneck) == [
        ("Dense_1/kernel", 0, 0, 0),
        ("Dense_2/bias", 0, 0, 0),
        ("Dense_2/kernel", 1, 0, 0),
    ]
    assert members(side) == [  # concatenated after the 6 stream channels
        ("Dense_3/bias", 0, 0, 0),
        ("Dense_3/kernel", 1, 0, 0),
        ("Dense_4/kernel", 0, 6, 0),
    ]
    assert [g.blocked is None for g in (stream, bottleneck, side)] == [True] * 3
    assert "model output" in out.blocked


def test_transformer_heads_and_layernorm(cases):
    fn, params, x = cases["block"]
    groups = dependencies(fn, params, x)
    att = "MultiHeadDotProductAttention_0"
    by_size = {}
    for g in groups:
        by_size.setdefault((g.size, g.blocked is None), []).append(members(g))
    heads, qk, vo = by_size[(4, True)]
    assert heads == sorted(
        [(f"{att}/{n}/bias", 0, 0, 0) for n in ("key", "query", "value")]
        + [(f"{att}/{n}/kernel", 1, 0, 0) for n in ("key", "query", "value")]
        + [(f"{att}/out/kernel", 0, 0, 0)]
    )
    assert qk == sorted(
        [(f"{att}/{n}/bias", 1, 0, 0) for n in ("key", "query")]
        + [(f"{att}/{n}/kernel", 2, 0, 0) for n in ("key", "query")]
    )
    assert vo == [
        (f"{att}/out/kernel", 1, 0, 0),
        (f"{att}/value/bias", 1, 0, 0),
        (f"{att}/value/kernel", 2, 0, 0),
    ]
    assert by_size[(12, True)] == [
        [("Dense_0/bias", 0, 0, 0), ("Dense_0/kernel", 1, 0, 0), ("Dense_1/kernel", 0, 0, 0)]
    ]
    [stream] = [g for g in groups if ("Dense_1/kernel", 1, 0, 0) in members(g)]
    assert "reduce_sum` in Block/LayerNorm_1" in stream.blocked
    assert "model output" in stream.blocked


def test_depthwise_groups(cases):
    fn, params, x = cases["depthwise"]
    g0, g1 = dependencies(fn, params, x)
    assert members(g0) == [
        ("Conv_0/bias", 0, 0, 0),
        ("Conv_0/kernel", 3, 0, 0),
        ("Conv_1/bias", 0, 0, 0),
        ("Conv_1/kernel", 3, 0, 0),
        ("Conv_2/kernel", 2, 0, 0),
    ]
    assert g0.blocked is None and "model output" in g1.blocked


def test_blocked_reasons_name_primitives():
    params = {"a": jnp.ones((4, 6)), "b": jnp.ones((6, 2)), "c": jnp.ones((4, 3))}
    x = jnp.ones((2, 4))

    def fn(p, x):
        h = jax.lax.sort(x @ p["a"], dimension=0)  # unknown to the analysis
        k = jnp.transpose((x @ p["c"]).reshape(2, 3, 1), (0, 2, 1)).reshape(2, 3)
        return h @ p["b"], jax.nn.softmax(k, axis=-1)

    groups = {m.path: g for g in dependencies(fn, params, x) for m in g.members if m.axis == 1}
    g_a, g_c = groups["a"], groups["c"]
    assert "`sort`" in g_a.blocked and "does not know" in g_a.blocked
    assert "reduce_max" in g_c.blocked and "model output (output 1" in g_c.blocked


def test_channel_first_flatten_is_runs_of_rows():
    """(N, C, H, W) -> (N, C * H * W): channel c is rows c * 25 ... c * 25 + 24 of the dense."""
    rng = np.random.default_rng(0)
    params = {
        "conv": jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32),
        "dense": jnp.asarray(rng.normal(size=(100, 2)), jnp.float32),
    }

    def fn(p, x):
        y = jax.lax.conv_general_dilated(
            x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.transpose(jnp.tanh(y), (0, 3, 1, 2)).reshape(2, -1) @ p["dense"]

    x = jnp.asarray(rng.uniform(size=(2, 5, 5, 1)), jnp.float32)
    g, _ = dependencies(fn, params, x)
    assert members(g) == [("conv", 3, 0, 0), ("dense", 0, 0, 0)] and g.blocked is None
    assert [m.width for m in g.members] == [1, 25] and g.size == 4
    masks = group_masks(params, [g], 0.5)
    small_fn, small = shrink(fn, params, masks, x)
    assert small["conv"].shape == (3, 3, 1, 2) and small["dense"].shape == (50, 2)
    np.testing.assert_allclose(
        small_fn(small, x), fn(apply_masks(params, masks), x), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# shrink: shrunken == masked, counts, jit, grad
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shrunk(cases):
    out = {}
    for name, (fn, params, x) in cases.items():
        groups = dependencies(fn, params, x)
        masks = group_masks(params, groups, 0.5)  # structured_masks: MLP tests, the example
        small_fn, small = shrink(fn, params, masks, x)
        out[name] = (fn, params, masks, x, small_fn, small)
    return out


@pytest.mark.parametrize("name", ["mlp", "bncnn", "residual", "block", "depthwise"])
def test_shrunken_equals_masked(shrunk, name):
    fn, params, masks, x, small_fn, small = shrunk[name]
    want = jax.jit(fn)(apply_masks(params, masks), x)
    np.testing.assert_allclose(jax.jit(small_fn)(small, x), want, rtol=1e-5, atol=1e-5)
    assert n_params(small) < n_params(params)


def test_parameter_counts(shrunk):
    _, _, masks, _, _, small = shrunk["mlp"]
    k0, k1 = kept(masks["Dense_0/kernel"]), kept(masks["Dense_1/kernel"])
    assert (k0, k1) == (4, 3)
    assert n_params(small) == 5 * k0 + k0 + k0 * k1 + k1 + k1 * 3 + 3
    _, _, masks, _, _, small = shrunk["bncnn"]
    k0, k1, k2 = (kept(masks[f"params/{n}/kernel"]) for n in ("Conv_0", "Conv_1", "Dense_0"))
    assert (k0, k1, k2) == (2, 3, 3)  # round(0.5 * 5) = 2 removed (half to even)
    conv = 9 * k0 + k0 + 4 * k0 + 9 * k0 * k1 + k1
    assert n_params(small) == conv + 9 * k1 * k2 + k2 + k2 * 3 + 3
    _, _, masks, _, _, small = shrunk["block"]
    att = small["MultiHeadDotProductAttention_0"]
    assert att["query"]["kernel"].shape == (8, 2, 2) and att["out"]["kernel"].shape == (2, 2, 8)
    assert small["Dense_0"]["kernel"].shape == (8, 6)


def test_small_fn_caches_per_shape_and_differentiates(shrunk):
    fn, params, masks, _, small_fn, small = shrunk["mlp"]
    x3 = jnp.linspace(-1, 1, 15).reshape(3, 5)
    np.testing.assert_allclose(
        small_fn(small, x3), fn(apply_masks(params, masks), x3), rtol=1e-5, atol=1e-6
    )
    assert len(small_fn.cache) == 2  # batch 2 and batch 3
    jitted = jax.jit(small_fn)
    jitted(small, x3)
    compiled = jitted._cache_size()
    jitted(small, x3 + 1)
    assert jitted._cache_size() == compiled  # no recompilation on the second call

    losses, p, _ = fine_tune(small_fn, small, x3, jnp.array([0, 1, 2]), 20)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, small)


def fine_tune(small_fn, small, x, y, steps):
    """Adam on the small parameters under one jitted step: ``(losses, params, step)``."""
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(small_fn(p, x), y).mean()

        value, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    p, s = small, opt.init(small)
    losses = []
    for _ in range(steps):
        p, s, value = step(p, s)
        losses.append(float(value))
    return losses, p, step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlp_dtypes_and_strict(cases, strict, dtype):
    fn, params, x = cases["mlp"]
    shrink_in_dtype(strict, fn, params, x, dtype, 2e-2)


def shrink_in_dtype(strict, fn, params, x, dtype, tol):
    """Masks, shrink and the small function in ``dtype`` under strict promotion; checks the
    dtypes and shrunken == masked (``tol`` for bfloat16). Returns the small params."""
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    x = x.astype(dtype)
    with strict():
        masks = structured_masks(params, 0.5, groups=dependencies(fn, params, x))
        small_fn, small = shrink(fn, params, masks, x)
        got = small_fn(small, x)
    assert all(a.dtype == dtype for a in jax.tree.leaves(small)) and got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else tol
    np.testing.assert_allclose(
        np.float32(got), np.float32(fn(apply_masks(params, masks), x)), rtol=tol, atol=tol
    )
    return small


def test_round_to(cases):
    fn, params, x = cases["mlp"]
    masks = group_masks(params, dependencies(fn, params, x), 0.75)
    assert kept(masks["Dense_0/kernel"]) == 2  # 8 - round(6.0)
    small_fn, small = shrink(fn, params, masks, x, round_to=4)
    assert small["Dense_0"]["kernel"].shape == (5, 4)  # 2 kept, 2 revived (zeros)
    assert small["Dense_1"]["kernel"].shape[1] == 4  # 6 - round(4.5) = 2 kept, rounded to 4
    # the revived channels are the removed ones of highest norm, kept at their masked zeros
    k = params["Dense_0"]["kernel"]
    alive = np.asarray(masks["Dense_0/kernel"]).any(0)
    dead = np.flatnonzero(~alive)
    norms = np.sum(np.float32(k) ** 2, 0) + np.float32(params["Dense_0"]["bias"]) ** 2
    norms += np.sum(np.float32(params["Dense_1"]["kernel"]) ** 2, 1)
    revived = sorted(dead[np.argsort(-norms[dead])[:2]])
    keep = np.sort([*np.flatnonzero(alive), *revived])
    masked = apply_masks(params, masks)
    np.testing.assert_array_equal(small["Dense_0"]["bias"], masked["Dense_0"]["bias"][keep])
    np.testing.assert_array_equal(small["Dense_0"]["kernel"], masked["Dense_0"]["kernel"][:, keep])
    np.testing.assert_allclose(
        small_fn(small, x), fn(apply_masks(params, masks), x), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="round_to must be a positive int"):
        shrink(fn, params, masks, x, round_to=0)


def test_inconsistent_masks_name_members(cases):
    fn, params, x = cases["mlp"]
    masks = structured_masks(params, 0.5)  # no groups: biases and next rows stay
    with pytest.raises(ValueError, match=r"removed in \['Dense_0/kernel \(axis 1\)'\]") as e:
        shrink(fn, params, masks, x)
    assert "'Dense_0/bias (axis 0)', 'Dense_1/kernel (axis 0)'" in str(e.value)
    assert "groups=jc.structure.dependencies" in str(e.value)


def test_removing_every_channel_is_an_error(cases):
    fn, params, x = cases["mlp"]
    masks = jax.tree.map(lambda a: True, params)
    masks["Dense_1"] = {"kernel": np.zeros((1, 6), bool), "bias": np.zeros(6, bool)}
    masks["Dense_2"] = {"kernel": np.zeros((6, 1), bool), "bias": True}
    with pytest.raises(ValueError, match="remove every one of the 6 channels"):
        shrink(fn, params, masks, x)


def test_bad_inputs(cases):
    fn, params, x = cases["mlp"]
    with pytest.raises(ValueError, match="masks does not match"):
        shrink(fn, params, {"Dense_0": True}, x)
    bad = jax.tree.map(lambda a: a, params)
    bad["Dense_1"]["bias"] = bad["Dense_1"]["bias"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match="Dense_1/bias: shrink found 1 NaN"):
        shrink(fn, bad, jax.tree.map(lambda a: True, params), x)


def test_no_masked_channels_is_identity(cases):
    fn, params, x = cases["residual"]
    small_fn, small = shrink(fn, params, jax.tree.map(lambda a: True, params), x)
    assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(small_fn(small, x), fn(params, x), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Flax conveniences
# ----------------------------------------------------------------------------------------------


def test_shrink_linen_widths_rebuild():
    model, x = MLP((8, 6, 3)), jnp.linspace(0, 1, 10).reshape(2, 5)
    v = filled(jax.eval_shape(model.init, jax.random.key(1), x), seed=1)
    groups = dependencies(lambda v, x: model.apply(v, x), v, x)
    masks = structured_masks(v, 0.5, groups=groups)
    small, widths = shrink_linen(model, v, masks, x)
    assert widths == {"Dense_0": 4, "Dense_1": 3}
    rebuilt = MLP((widths["Dense_0"], widths["Dense_1"], 3))
    np.testing.assert_allclose(
        rebuilt.apply(small, x), model.apply(apply_masks(v, masks), x), rtol=1e-5, atol=1e-6
    )


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 6, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.fc = nnx.Linear(6 * 16, 5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.out(nnx.relu(self.fc(x.reshape(x.shape[0], -1))))


def test_shrink_nnx():
    model = NnxNet(nnx.Rngs(0))
    model.eval()
    x = jnp.linspace(0, 1, 32).reshape(2, 4, 4, 1)
    graphdef, state = nnx.split(model)
    state = filled(jax.eval_shape(lambda: state), seed=2)
    nnx.update(model, state)

    def fn(s, x):
        return nnx.merge(graphdef, s)(x)

    groups = dependencies(fn, state, x)
    assert members(groups[0])[:3] == [
        ("bn/bias", 0, 0, 0),
        ("bn/mean", 0, 0, 0),
        ("bn/scale", 0, 0, 0),
    ]
    masks = group_masks(state, groups, 0.5)
    small = shrink_nnx(model, masks, x)
    assert small.conv.kernel.shape == (3, 3, 1, 3) and small.conv.out_features == 3
    assert small.fc.kernel.shape == (3 * 16, 3) and small.fc.in_features == 48
    assert small.bn.num_features == 3 and model.conv.kernel.shape == (3, 3, 1, 6)
    np.testing.assert_allclose(small(x), fn(apply_masks(state, masks), x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


def _mlp_fn(p, x):
    h = x
    for i in range(3):
        h = h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
        h = jnp.tanh(h) if i < 2 else h
    return h


def _mlp_numpy(p, x):
    h = np.float64(x)
    for i in range(3):
        h = h @ np.float64(p[f"l{i}"]["kernel"]) + np.float64(p[f"l{i}"]["bias"])
        h = np.tanh(h) if i < 2 else h
    return h


@settings()
@given(
    widths=st.sampled_from([(8, 8), (7, 3)]),
    sparsity=st.sampled_from([0.0, 0.5, 0.75]),
    scale=st.sampled_from([1e-30, 1.0, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_property_shrink_equals_masked(widths, sparsity, scale, seed):
    """Random widths (odd ones included), fractions, tiny and huge weights: shrunken == masked
    (NumPy reference), exact widths."""
    sizes = (5, *widths, 2)
    rng = np.random.default_rng(seed)
    params = {
        f"l{i}": {
            "kernel": jnp.asarray(rng.normal(size=sizes[i : i + 2]) * scale, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=sizes[i + 1 : i + 2]), jnp.float32),
        }
        for i in range(3)
    }
    x = jnp.asarray(rng.uniform(-1, 1, (3, 5)), jnp.float32)
    groups = dependencies(_mlp_fn, params, x)
    assert [g.size for g in groups] == [widths[0], widths[1], 2]
    masks = group_masks(params, groups, sparsity, seed)
    small_fn, small = shrink(_mlp_fn, params, masks, x)
    for i, w in enumerate(widths):
        removed = round(sparsity * w)
        assert small[f"l{i}"]["kernel"].shape[1] == w - removed
        assert small[f"l{i + 1}"]["kernel"].shape[0] == w - removed
    masked = {
        k: {n: np.where(masks[f"{k}/{n}"], v, 0) for n, v in d.items()} for k, d in params.items()
    }
    want = _mlp_numpy(masked, x)
    got = np.float64(small_fn(small, x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * (np.abs(want).max() + 1))


def test_scan_carry_and_closed_over_weights():
    """A scan body is analysed: the carry's channels in and out are one group (with the weights
    the body closes over), the stacked outputs ys are blocked; the rest shrinks alongside."""
    rng = np.random.default_rng(0)
    shapes = {"a": (4, 6), "w": (6, 6), "b": (4, 5), "c": (5, 2), "d": (6, 2)}
    params = {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()}

    def fn(p, x):
        def body(h, _):
            h = jnp.tanh(h @ p["w"])
            return h, h

        h, ys = jax.lax.scan(body, x @ p["a"], None, length=2)
        return h @ p["d"] + jnp.tanh(x @ p["b"]) @ p["c"], ys

    x = jnp.linspace(0, 1, 8).reshape(2, 4)
    groups = {g.members[0].path: g for g in dependencies(fn, params, x)}
    assert members(groups["a"]) == [("a", 1, 0, 0), ("d", 0, 0, 0), ("w", 0, 0, 0), ("w", 1, 0, 0)]
    assert "stacked into the outputs of `scan`" in groups["a"].blocked
    assert members(groups["b"]) == [("b", 1, 0, 0), ("c", 0, 0, 0)] and groups["b"].blocked is None
    masks = group_masks(params, list(groups.values()), 0.4)
    small_fn, small = shrink(fn, params, masks, x)
    assert small["b"].shape == (4, 3) and small["a"].shape == (4, 6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        small_fn(small, x),
        fn(apply_masks(params, masks), x),
    )
