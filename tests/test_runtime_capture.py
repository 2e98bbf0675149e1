"""capture and tap: values equal direct NumPy computation; stacked layers; gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_runtime_roles import Stack

from jcompress.demo import CNN, MLP
from jcompress.runtime import InputStats, capture, tap


def _np_stats(x):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return np.abs(x).max(0), (x * x).sum(0), x.shape[0], x.T @ x


def _assert_stats(stats, x, gram=True):
    absmax, sumsq, count, g = _np_stats(x)
    np.testing.assert_allclose(stats.absmax, absmax, rtol=1e-6)
    np.testing.assert_allclose(stats.sumsq, sumsq, rtol=1e-5)
    assert int(stats.count) == count
    if gram:
        np.testing.assert_allclose(stats.gram, g, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mlp():
    model = MLP((6, 3))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params, x


def _np_mlp_hidden(params, x):
    w0 = np.asarray(params["Dense_0"]["kernel"], np.float64)
    b0 = np.asarray(params["Dense_0"]["bias"], np.float64)
    return np.maximum(np.asarray(x, np.float64) @ w0 + b0, 0)


def test_capture_mlp(mlp, strict):
    fn, params, x = mlp
    with strict():
        stats = capture(fn, params, x, gram=True)
    assert set(stats) == {"Dense_0/kernel", "Dense_1/kernel"}
    _assert_stats(stats["Dense_0/kernel"], x)
    _assert_stats(stats["Dense_1/kernel"], _np_mlp_hidden(params, x))


def test_merge_equals_concatenation(mlp):
    fn, params, x = mlp
    a, b = x[:2], x[2:]
    merged = capture(fn, params, a, gram=True)["Dense_1/kernel"].merge(
        capture(fn, params, b, gram=True)["Dense_1/kernel"]
    )
    whole = capture(fn, params, x, gram=True)["Dense_1/kernel"]
    for f in ("absmax", "sumsq", "gram"):
        np.testing.assert_allclose(getattr(merged, f), getattr(whole, f), rtol=1e-5, atol=1e-6)
    assert int(merged.count) == int(whole.count) == 5
    with pytest.raises(ValueError, match="gram"):
        merged.merge(capture(fn, params, x)["Dense_1/kernel"])
    assert jax.tree.leaves(whole) and isinstance(jax.jit(lambda s: s)(whole), InputStats)


def test_capture_conv_patches():
    """Conv statistics are over kh·kw·in patches (leaf order), as the conv sees them (SAME)."""
    model = CNN(channels=(3,), hidden=4, classes=2)
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 2))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    stats = capture(lambda p, x: model.apply({"params": p}, x), params, x)["Conv_0/kernel"]
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack(
        [xp[:, i : i + 3, j : j + 3, :].reshape(2, -1) for i in range(5) for j in range(5)], 1
    )
    assert stats.absmax.shape == (3 * 3 * 2,)
    _assert_stats(stats, patches, gram=False)


def test_capture_and_tap_scan_stack_per_layer():
    model = Stack()
    x = jax.random.normal(jax.random.key(3), (2, 4))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)
    stats = capture(fn, params, x)["layers/Dense_0/kernel"]
    k = np.asarray(params["layers"]["Dense_0"]["kernel"], np.float64)
    b = np.asarray(params["layers"]["Dense_0"]["bias"], np.float64)
    h, inputs = np.asarray(x, np.float64), []
    for i in range(3):
        inputs.append(h)
        h = np.tanh(h @ k[i] + b[i])
    assert stats.absmax.shape == (3, 4) and stats.count.shape == (3,)
    for i in range(3):
        layer = jax.tree.map(lambda a, i=i: a[i], stats)
        _assert_stats(layer, inputs[i], gram=False)
    _, acts = tap(fn, inputs_of=["layers/Dense_0/kernel"])(params, x)
    np.testing.assert_allclose(acts["layers/Dense_0/kernel"], np.stack(inputs), rtol=1e-5)


def test_reused_leaf_in_scan_is_merged():
    def fn(p, x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["w"]), None), x, length=3)[0]

    w = jax.random.normal(jax.random.key(4), (3, 3))
    x = jax.random.normal(jax.random.key(5), (2, 3))
    stats = capture(fn, {"w": w}, x)["w"]
    h, seen = np.asarray(x, np.float64), []
    for _ in range(3):
        seen.append(h)
        h = np.tanh(h @ np.asarray(w, np.float64))
    _assert_stats(stats, np.concatenate(seen), gram=False)


def test_tap_values_and_grad(mlp, strict):
    fn, params, x = mlp
    with strict():
        tapped = tap(fn, inputs_of=["Dense_1/kernel"], outputs_of=["Dense_0/kernel"])
        out, acts = tapped(params, x)
    assert set(acts) == {"Dense_0/kernel", "Dense_1/kernel"}
    np.testing.assert_allclose(out, fn(params, x), rtol=1e-6)
    w0 = np.asarray(params["Dense_0"]["kernel"], np.float64)
    np.testing.assert_allclose(acts["Dense_0/kernel"], np.asarray(x) @ w0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["Dense_1/kernel"], _np_mlp_hidden(params, x), rtol=1e-5)

    def loss(p):
        return jnp.sum(tapped(p, x)[1]["Dense_0/kernel"])

    grad = jax.jit(jax.grad(loss))(params)
    expect = np.broadcast_to(np.asarray(x).sum(0)[:, None], w0.shape)
    np.testing.assert_allclose(grad["Dense_0"]["kernel"], expect, rtol=1e-5)
    assert not np.any(grad["Dense_1"]["kernel"])


def test_tap_unknown_path_lists_available(mlp):
    fn, params, x = mlp
    with pytest.raises(ValueError, match=r"Dense_9/kernel.*available paths.*Dense_0/kernel"):
        tap(fn, outputs_of=["Dense_9/kernel"])(params, x)
    with pytest.raises(ValueError, match="both"):
        tap(fn, inputs_of=["Dense_0/kernel"], outputs_of=["Dense_0/kernel"])


@given(
    rows=st.sampled_from([1, 3, 8]),
    n_in=st.sampled_from([2, 5]),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
    transposed=st.booleans(),
)
def test_capture_property(rows, n_in, scale, transposed):
    x = np.random.default_rng(rows * n_in).standard_normal((rows, n_in)).astype(np.float32)
    with np.errstate(over="ignore"):
        x = x * np.float32(scale)
    w = jnp.ones((3, n_in) if transposed else (n_in, 3))
    fn = (lambda p, x: x @ p["w"].T) if transposed else (lambda p, x: x @ p["w"])
    stats = capture(fn, {"w": w}, jnp.asarray(x))["w"]
    np.testing.assert_array_equal(stats.absmax, np.abs(x).max(0))
    with np.errstate(over="ignore"):
        expect = (x * x).sum(0, dtype=np.float32)
    np.testing.assert_allclose(stats.sumsq, expect, rtol=1e-5)
    assert int(stats.count) == rows


@given(
    rows=st.sampled_from([1, 4]),
    width=st.sampled_from([2, 7]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_tap_property(rows, width, dtype):
    """The output of one layer is the input of the next, both equal to a NumPy product."""
    rng = np.random.default_rng(rows * width)
    params = {
        "a": jnp.asarray(rng.standard_normal((3, width)), dtype),
        "b": jnp.asarray(rng.standard_normal((width, 2)), dtype),
    }
    x = jnp.asarray(rng.standard_normal((rows, 3)), dtype)
    tapped = tap(lambda p, x: (x @ p["a"]) @ p["b"], inputs_of=["b"], outputs_of=["a"])
    with jax.numpy_dtype_promotion("strict"):
        out, acts = tapped(params, x)
    np.testing.assert_array_equal(acts["a"], acts["b"])
    assert acts["a"].dtype == dtype and out.shape == (rows, 2)
    expect = np.float32(x) @ np.float32(params["a"])
    np.testing.assert_allclose(np.float32(acts["a"]), expect, rtol=2e-2, atol=2e-2)


def test_capture_paths_selects_leaves_and_validates(mlp):
    fn, params, x = mlp
    whole = capture(fn, params, x, gram=True)
    only = capture(fn, params, x, gram=True, paths=["Dense_1/kernel"])
    assert list(only) == ["Dense_1/kernel"]
    for f in ("absmax", "sumsq", "count", "gram"):
        np.testing.assert_array_equal(
            getattr(only["Dense_1/kernel"], f), getattr(whole["Dense_1/kernel"], f)
        )
    assert capture(fn, params, x, paths=["Dense_0/bias"]) == {}  # a leaf no product consumes
    with pytest.raises(ValueError, match=r"Dense_2/kernel.*nearest.*Dense_[01]/kernel"):
        capture(fn, params, x, paths=["Dense_2/kernel"])
    with pytest.raises(TypeError, match="collection of path strings"):
        capture(fn, params, x, paths="Dense_0/kernel")


def test_capture_traces_once_per_shape():
    """New batches of the same shape reuse the traced and compiled program."""
    traces = []

    def fn(p, x):
        traces.append(1)  # runs only while tracing
        return jnp.tanh(x @ p["w"])

    w = jax.random.normal(jax.random.key(6), (4, 3))
    for i in range(3):
        x = jax.random.normal(jax.random.key(i), (5, 4))
        stats = capture(fn, {"w": w}, x)["w"]
        np.testing.assert_array_equal(stats.absmax, np.abs(np.asarray(x)).max(0))
    assert len(traces) == 1
    capture(fn, {"w": w}, jnp.ones((2, 4)))  # a new shape is a new trace
    assert len(traces) == 2


def test_leaf_consumed_by_several_products_gets_merged_stats(strict):
    """A tied embedding (gather + Embed.attend, here attended twice) and a reused kernel."""
    import flax.linen as nn

    class Tied(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(11, 6)
            h = jnp.tanh(nn.Dense(6)(embed(tokens)))
            return embed.attend(h) + embed.attend(2.0 * h)

    model = Tied()
    tokens = jnp.arange(8).reshape(2, 4) % 11
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    fn = lambda p, t: model.apply({"params": p}, t)
    with strict():
        stats = capture(fn, params, tokens, gram=True)
    table = np.asarray(params["Embed_0"]["embedding"], np.float64)
    dense = params["Dense_0"]
    e = table[np.asarray(tokens)].reshape(-1, 6)
    h = np.tanh(e @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"]))
    _assert_stats(stats["Embed_0/embedding"], np.concatenate([h, 2.0 * h]))
    _assert_stats(stats["Dense_0/kernel"], e)

    w = jnp.ones((3, 3))
    with pytest.raises(ValueError, match="w: consumed by several products with different"):
        capture(lambda p, x: x @ p["w"] + x @ p["w"].T, {"w": w}, jnp.ones((2, 3)))
