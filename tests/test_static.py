"""Static activation ranges (W8A8 static): calibrate_activations against NumPy references.

The steps must equal ``range / 127`` computed directly from the layers' inputs in NumPy, and
``jc.compressed(fn, mode="int8")`` with them must equal a NumPy model of static int8 activation
quantization ``clip(round(x / a), -127, 127) · a`` in front of every quantized matmul.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jcompress.quantization import (
    MSE,
    AbsMax,
    AWQArray,
    Percentile,
    QArray,
    QuantSpec,
    calibrate_activations,
    quantize,
)
from jcompress.runtime import compressed
from jcompress.runtime import roles as jc_roles

TINY = np.finfo(np.float32).tiny


def mlp(p, x):
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def np_mlp_inputs(p, x):
    """The float inputs of both matmuls (float64), weights as the model sees them."""
    w0 = np.asarray(jnp.asarray(p["Dense_0"]["kernel"], jnp.float32), np.float64)
    b0 = np.asarray(jnp.asarray(p["Dense_0"]["bias"], jnp.float32), np.float64)
    x = np.asarray(x, np.float64)
    return x, np.maximum(x @ w0 + b0, 0)


def np_static(x, step):
    return np.clip(np.round(x / step), -127, 127) * step


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    params = {
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(16, 32)) / 4, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=32) / 10, jnp.float32),
        },
        "Dense_1": {
            "kernel": jnp.asarray(rng.normal(size=(32, 8)) / 6, jnp.float32),
            "bias": jnp.zeros(8, jnp.float32),
        },
    }
    batches = [(jnp.asarray(rng.normal(size=(24, 16)) * s, jnp.float32),) for s in (1.0, 2.0, 0.5)]
    return params, batches, quantize(params, QuantSpec(bits=8))


@pytest.mark.parametrize("calibration", [AbsMax(), Percentile(99.0)], ids=str)
def test_steps_equal_numpy_ranges(model, calibration, strict):
    params, batches, q = model
    with strict():
        out = calibrate_activations(mlp, q, batches, calibration=calibration)
    # the model runs on the dequantized weights: the reference does too
    deq = {k: {**v, "kernel": q[k]["kernel"].dequantize()} for k, v in params.items()}
    per_batch = [np_mlp_inputs(deq, x) for (x,) in batches]
    for i, name in enumerate(("Dense_0", "Dense_1")):
        xs = [b[i] for b in per_batch]
        if isinstance(calibration, AbsMax):
            expect = max(np.abs(x).max() for x in xs)
        else:  # the percentile of each batch, averaged weighted by rows (equal rows here)
            expect = np.mean([np.percentile(np.abs(x), calibration.q) for x in xs])
        got = out[name]["kernel"]
        assert type(got) is QArray and got.act_scale.dtype == jnp.float32
        assert got.act_scale.shape == (1, 1)
        np.testing.assert_allclose(float(got.act_scale[0, 0]), expect / 127, rtol=1e-5)
        assert got.values is q[name]["kernel"].values  # weights untouched
    assert out["Dense_0"]["bias"] is q["Dense_0"]["bias"]


def test_compressed_int8_static_equals_numpy_reference(model, strict):
    params, batches, q = model
    static = calibrate_activations(mlp, q, batches[:2])
    a0, a1 = (float(static[n]["kernel"].act_scale[0, 0]) for n in ("Dense_0", "Dense_1"))
    w0, w1 = (np.asarray(q[n]["kernel"].dequantize(), np.float64) for n in ("Dense_0", "Dense_1"))
    b0 = np.asarray(params["Dense_0"]["bias"], np.float64)
    b1 = np.asarray(params["Dense_1"]["bias"], np.float64)
    # the third batch is twice as wide as the first: inputs beyond the range saturate
    x = np.concatenate([np.asarray(batches[2][0]), 3 * np.asarray(batches[1][0])])
    h = np.maximum(np_static(x, a0) @ w0 + b0, 0)
    expect = np_static(h, a1) @ w1 + b1
    run = compressed(mlp, mode="int8")
    with strict():
        got = np.asarray(run(static, jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    assert np.any(np.abs(3 * np.asarray(batches[1][0])) > 127 * a0)  # saturation exercised
    dynamic = np.asarray(run(q, jnp.asarray(x)), np.float64)
    assert np.abs(dynamic - expect).max() > 1e-3  # static is not dynamic
    # jit == eager, determinism
    jitted = jax.jit(lambda p, x: run(p, x))
    np.testing.assert_array_equal(jitted(static, jnp.asarray(x)), got.astype(np.float32))
    again = calibrate_activations(mlp, q, batches[:2])
    for n in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(again[n]["kernel"].act_scale, static[n]["kernel"].act_scale)


def test_stacked_layers_tied_embedding_and_bfloat16(strict):
    """A scan over stacked kernels gets one step per layer; a tied embedding's step comes from
    its logits product (the gather is no matmul input); bfloat16 parameters."""

    class Stacked(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(12, 8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
            stack = self.param("stack", nn.initializers.normal(0.5), (3, 8, 8), jnp.bfloat16)
            h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), embed(tokens), stack)
            return embed.attend(h)

    m = Stacked()
    tokens = [(jnp.arange(16).reshape(2, 8) % 12,), (jnp.arange(16).reshape(2, 8) % 5,)]
    params = jax.jit(m.init)(jax.random.key(0), tokens[0][0])["params"]
    fn = lambda p, t: m.apply({"params": p}, t)
    roles = jc_roles(fn, params, *tokens[0])  # the stack's leading axis is per layer
    q = quantize(params, QuantSpec(bits=8), where=lambda path, leaf: True, roles=roles)
    with strict():
        out = calibrate_activations(fn, q, tokens)
    table = np.asarray(q["Embed_0"]["embedding"].dequantize(), np.float32)
    stack = np.asarray(q["stack"].dequantize(), np.float32)
    ranges, final = np.zeros(3), 0.0
    for (t,) in tokens:
        h = table[np.asarray(t)].reshape(-1, 8)
        for i in range(3):
            ranges[i] = max(ranges[i], np.abs(h).max())
            h = np.tanh(h @ stack[i])
        final = max(final, np.abs(h).max())
    assert out["stack"].act_scale.shape == (3, 1, 1)
    np.testing.assert_allclose(out["stack"].act_scale[:, 0, 0], ranges / 127, rtol=2e-2)
    assert out["Embed_0"]["embedding"].act_scale.shape == (1, 1)
    np.testing.assert_allclose(out["Embed_0"]["embedding"].act_scale[0, 0], final / 127, rtol=2e-2)


def test_errors_name_the_path(model):
    params, batches, q = model
    with pytest.raises(TypeError, match=r"Dense_1/kernel: .*QArray.*got ArrayImpl"):
        calibrate_activations(mlp, {**q, "Dense_1": params["Dense_1"]}, batches, where=".*kernel")
    awq = AWQArray(q["Dense_1"]["kernel"], jnp.ones((32, 1)))
    with_awq = {**q, "Dense_1": {**q["Dense_1"], "kernel": awq}}
    with pytest.raises(TypeError, match="Dense_1/kernel: a AWQArray divides its inputs by its own"):
        calibrate_activations(mlp, with_awq, batches, where=".*kernel")
    # the default skips the AWQArray and calibrates the plain QArray
    out = calibrate_activations(mlp, with_awq, batches)
    assert out["Dense_1"]["kernel"] is awq and out["Dense_0"]["kernel"].act_scale is not None
    unused = {**q, "Dense_2": {"kernel": q["Dense_1"]["kernel"]}}
    with pytest.raises(ValueError, match=r"\['Dense_2/kernel'\] is not multiplied"):
        calibrate_activations(mlp, unused, batches, where=".*kernel")
    nan = [(batches[0][0].at[3, 2].set(jnp.nan),)]
    with pytest.raises(ValueError, match=r"Dense_0/kernel: .*NaN/Inf"):
        calibrate_activations(mlp, q, nan)
    with pytest.raises(TypeError, match=r"AbsMax.*Percentile"):
        calibrate_activations(mlp, q, batches, calibration=MSE())
    with pytest.raises(ValueError, match="no batch"):
        calibrate_activations(mlp, q, [])
    with pytest.raises(ValueError, match="one-shot iterator"):
        calibrate_activations(mlp, q, iter(batches))
    with pytest.raises(ValueError, match="no plain QArray"):
        calibrate_activations(mlp, params, batches)


@given(
    shape=st.sampled_from([(4, 8, 3), (7, 5, 2)]),  # (rows, in, out)
    magnitude=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4]),
    q=st.sampled_from([None, 99.9]),  # each q is one more compiled program per shape
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_static_step_property(shape, magnitude, q, dtype, seed):
    """The step is range / 127 of the inputs (zeros: the smallest normal); on the calibration
    input itself int8 static matmuls err by at most step/2 per input entry."""
    rows, n_in, n_out = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, n_in)) * magnitude, dtype)
    params = {"w": jnp.asarray(rng.standard_normal((n_in, n_out)), dtype)}
    fn = lambda p, x: x @ p["w"]
    qp = quantize(params, QuantSpec(bits=8), where="w")
    cal = AbsMax() if q is None else Percentile(q)
    step = float(calibrate_activations(fn, qp, [(x,)], calibration=cal)["w"].act_scale[0, 0])
    ax = np.abs(np.asarray(x, np.float64))
    r = ax.max() if q is None else np.percentile(ax, q)
    expect = r / 127 if r > 0 else TINY
    np.testing.assert_allclose(step, expect, rtol=1e-5)
    if q is None and r > 0:
        static = calibrate_activations(fn, qp, [(x,)])
        got = np.asarray(compressed(fn, mode="int8")(static, x), np.float64)
        w = np.asarray(qp["w"].dequantize(), np.float64)
        exact = np.asarray(x, np.float64) @ w
        bound = step / 2 * np.abs(w).sum(0) + 1e-2 * np.abs(exact) + 1e-30
        assert np.all(np.abs(got - exact) <= bound)


def test_nnx_state_and_dense_general_layouts(strict):
    """nnx.State trees keep their type; an attention-style DenseGeneral kernel (features,
    heads, head_dim) gets a step of its rank; int8 static outputs follow the NumPy model."""
    from flax import nnx

    class Attn(nnx.Module):
        def __init__(self, rngs):
            self.qkv = nnx.LinearGeneral(8, (2, 4), rngs=rngs)  # kernel (8, 2, 4)
            self.out = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)  # (2, 4, 8)

        def __call__(self, x):
            return self.out(jnp.tanh(self.qkv(x)))

    graphdef, state = nnx.split(Attn(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    x = jax.random.normal(jax.random.key(1), (6, 8))
    roles = jc_roles(fn, state, x)
    q = quantize(state, QuantSpec(bits=8), roles=roles)
    with strict():
        out = calibrate_activations(fn, q, [(x,)])
    assert isinstance(out, nnx.State)
    qkv, o = out["qkv"]["kernel"].get_value(), out["out"]["kernel"].get_value()
    assert qkv.act_scale.shape == (1, 1, 1) and o.act_scale.shape == (1, 1, 1)
    a0, a1 = float(qkv.act_scale.reshape(())), float(o.act_scale.reshape(()))
    w0 = np.asarray(qkv.dequantize(), np.float64).reshape(8, 8)
    w1 = np.asarray(o.dequantize(), np.float64).reshape(8, 8)
    b0 = np.asarray(state["qkv"]["bias"].get_value(), np.float64).reshape(8)
    b1 = np.asarray(state["out"]["bias"].get_value(), np.float64)
    xn = np.asarray(x, np.float64)
    h = np.tanh(xn @ w0 + b0)
    np.testing.assert_allclose([a0, a1], [np.abs(xn).max() / 127, np.abs(h).max() / 127], rtol=1e-5)
    expect = np_static(np.tanh(np_static(xn, a0) @ w0 + b0), a1) @ w1 + b1
    got = np.asarray(compressed(fn, mode="int8")(out, x), np.float64)
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


@given(
    n=st.sampled_from([1, 6, 257]),
    q=st.sampled_from([0.5, 50.0, 99.0, 99.99, 100.0]),
    magnitude=st.sampled_from([1e-30, 1.0, 1e30]),  # XLA:CPU flushes subnormals to zero
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_percentile_by_bisection_equals_numpy(n, q, magnitude, ties, seed):
    """The sort-free percentile (bisection over float bit patterns) is NumPy's (linear)."""
    from jcompress.quantization._static import _percentile

    rng = np.random.default_rng(seed)
    a = np.abs(rng.standard_normal((2, n))).astype(np.float32)
    if ties:
        a = np.round(a)  # many equal values, zeros among them
    a = (a * np.float32(magnitude)).astype(np.float32)
    got = np.asarray(jax.jit(_percentile, static_argnums=1)(jnp.asarray(a), q))
    expect = np.percentile(a.astype(np.float64), q, axis=-1).astype(np.float32)
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    a[1, -1] = np.nan  # NaN anywhere in a slice: NaN (an error for calibrate_activations)
    got = np.asarray(jax.jit(_percentile, static_argnums=1)(jnp.asarray(a), q))
    assert np.isnan(got[1]) and np.isfinite(got[0])
