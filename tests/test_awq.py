"""AWQ against an independent NumPy reference of the scale search (Lin et al., 2023, Sec. 3.2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import calibration
from jcompress.quantization import (
    AWQArray,
    PerGroup,
    QArray,
    QuantSpec,
    awq,
    awq_layer,
    dequantize,
    quantize,
)
from jcompress.runtime import compressed, roles
from jcompress.tree import Role

# ----------------------------------------------------------------------------------------------
# Independent NumPy reference (float64): per-channel symmetric absmax RTN of s·W, error from XᵀX
# ----------------------------------------------------------------------------------------------


def np_rtn(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = np.max(np.abs(w), axis=0) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def np_awq_errors(w, x, bits, grid):
    m = np.sqrt(np.mean(x * x, axis=0))
    m = np.maximum(m, 1e-4 * m.max())
    errs = []
    for a in np.arange(grid + 1) / grid:
        s = m**a
        s = s / np.sqrt(s.max() * s.min())
        wq = np_rtn(w * s[:, None], bits) / s[:, None]
        errs.append(np.sum((x @ (w - wq)) ** 2) / len(x))
    return np.array(errs)


def outlier_layer(key, n_in=64, n_out=32, rows=256, outliers=(3, 17, 40), gain=30.0):
    """A kernel and inputs with a few high-magnitude input channels (the case AWQ targets)."""
    kw, kx = jax.random.split(jax.random.key(key))
    w = np.asarray(jax.random.normal(kw, (n_in, n_out)), np.float64) * 0.1
    x = np.asarray(jax.random.normal(kx, (rows, n_in)), np.float64)
    x[:, list(outliers)] *= gain
    return w, x


def hess(x):
    return jnp.asarray(2.0 * x.T @ x / len(x), jnp.float32)


def out_err(w, wq, x):
    return float(np.sum((x @ (w - np.asarray(wq, np.float64))) ** 2))


def dense_fn(p, x):
    return x @ p["Dense_0"]["kernel"]


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "spec"),
    [
        (jnp.float32, QuantSpec(bits=4)),
        (jnp.bfloat16, QuantSpec(bits=3, granularity=PerGroup(16))),
    ],
)
def test_alpha_zero_is_rtn_exactly(dtype, spec, strict):
    w, x = outlier_layer(0)
    wj = jnp.asarray(w, dtype)
    with strict():
        qa, stats = awq_layer(wj, hess(x), spec, alpha=0.0)
    ref = quantize({"kernel": wj}, spec)["kernel"]
    assert isinstance(qa, AWQArray) and qa.dtype == dtype and type(qa.inner) is QArray
    np.testing.assert_array_equal(
        np.asarray(qa.inner.values, np.int8), np.asarray(ref.values, np.int8)
    )
    np.testing.assert_array_equal(qa.inner.scale, ref.scale)
    np.testing.assert_array_equal(qa.input_scale, np.ones((64, 1), np.float32))
    np.testing.assert_array_equal(qa.dequantize(), ref.dequantize())
    assert float(stats.alpha) == 0.0
    assert float(stats.output_error) == float(stats.rtn_output_error)


def test_matches_numpy_reference_and_beats_rtn_on_outliers():
    w, x = outlier_layer(1)
    ref_errs = np_awq_errors(w, x, bits=3, grid=20)
    qa, stats = awq_layer(jnp.asarray(w, jnp.float32), hess(x), QuantSpec(bits=3), grid=20)
    alpha = float(stats.alpha)
    k = round(alpha * 20)
    # the chosen grid point is the reference's minimum (up to float32 vs float64 near-ties)
    assert ref_errs[k] <= ref_errs.min() * (1 + 1e-3)
    assert alpha > 0
    # the returned tree's float weights give the reference error at that alpha
    got = out_err(w, qa.dequantize(), x) / len(x)
    np.testing.assert_allclose(got, ref_errs[k], rtol=1e-3)
    rtn = quantize({"kernel": jnp.asarray(w, jnp.float32)}, QuantSpec(bits=3))["kernel"]
    rtn_err = out_err(w, rtn.dequantize(), x)
    assert got * len(x) < 0.8 * rtn_err  # a real improvement where activations have outliers
    np.testing.assert_allclose(ref_errs[0] * len(x), rtn_err, rtol=1e-4)


@pytest.fixture(scope="module")
def dense_case():
    w, x = outlier_layer(2)
    params = {"Dense_0": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.zeros(32)}}
    batches = [(jnp.asarray(x[i : i + 128], jnp.float32),) for i in (0, 128)]
    return params, batches, x


@pytest.mark.parametrize("bits", [3, 4])
def test_model_level_error_at_most_rtn(dense_case, bits, strict):
    params, batches, x = dense_case
    spec = QuantSpec(bits=bits, granularity=PerGroup(32))
    with strict():
        q = awq(dense_fn, params, batches, spec, quiet=True)
    rtn = quantize(params, spec)
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    e_awq = out_err(w, dequantize(q)["Dense_0"]["kernel"], x)
    e_rtn = out_err(w, rtn["Dense_0"]["kernel"].dequantize(), x)
    assert e_awq < e_rtn
    assert q["Dense_0"]["bias"] is params["Dense_0"]["bias"]


def test_float_function_preserved_and_runtime(dense_case):
    params, batches, _ = dense_case
    q = awq(dense_fn, params, batches, QuantSpec(bits=8), quiet=True)
    qa = q["Dense_0"]["kernel"]
    assert float(jnp.max(jnp.abs(qa.input_scale - 1))) > 0.1  # scaling is really applied
    w = params["Dense_0"]["kernel"]
    # bits=8: Q(sW)/s is W up to half an 8-bit step of s·W, per row divided by s
    step = qa.inner.scale / qa.input_scale  # (in, out) per-element step after folding
    assert bool(jnp.all(jnp.abs(dequantize(q)["Dense_0"]["kernel"] - w) <= step / 2 * 1.001))
    xb = batches[0][0]
    ref = dense_fn(dequantize(q), xb)
    y = dense_fn(params, xb)
    assert float(jnp.linalg.norm(ref - y) / jnp.linalg.norm(y)) < 0.01
    # the runtime divides activations by s and multiplies by Q(sW): same function
    np.testing.assert_allclose(compressed(dense_fn)(q, xb), ref, rtol=1e-4, atol=1e-3)
    w8a8 = compressed(dense_fn, mode="int8")(q, xb)
    np.testing.assert_allclose(w8a8, ref, rtol=0.05, atol=0.2)


def test_deterministic(dense_case):
    params, batches, _ = dense_case
    spec = QuantSpec(bits=4)
    a = awq(dense_fn, params, batches, spec, quiet=True)["Dense_0"]["kernel"]
    b = awq(dense_fn, params, batches, spec, quiet=True)["Dense_0"]["kernel"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):  # values, scale, s
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_round_trip_keeps_the_awq_leaf(dense_case, tmp_path):
    from jcompress import checkpoint

    params, batches, _ = dense_case
    q = awq(dense_fn, params, batches, QuantSpec(bits=4), quiet=True)
    checkpoint.save(tmp_path / "awq", q)
    back = checkpoint.load(tmp_path / "awq")
    assert type(back["Dense_0"]["kernel"]) is type(q["Dense_0"]["kernel"])
    np.testing.assert_array_equal(
        np.asarray(dequantize(back)["Dense_0"]["kernel"]),
        np.asarray(dequantize(q)["Dense_0"]["kernel"]),
    )


class _Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=64, name="attn")(x, x)
        return nn.Dense(8, name="out")(x)


def test_linen_attention_dense_general(strict):
    model = _Attn()
    x = jax.random.normal(jax.random.key(3), (4, 8, 32)) * jnp.linspace(0.1, 2.0, 32)
    params = model.init(jax.random.key(4), x)["params"]

    def fn(p, x):
        return model.apply({"params": p}, x)

    r = roles(fn, params, x)
    with strict():
        q = awq(fn, params, [(x,)], QuantSpec(bits=8), roles=r, quiet=True)
    k = q["attn"]["query"]["kernel"]  # (features, heads, head_dim)
    assert isinstance(k, AWQArray) and k.input_scale.shape == (32, 1, 1)
    o = q["attn"]["out"]["kernel"]  # (heads, head_dim, features)
    assert o.input_scale.shape == (2, 32, 1)
    ref, y = fn(dequantize(q), x), fn(params, x)
    assert float(jnp.linalg.norm(ref - y) / jnp.linalg.norm(y)) < 0.02


def test_stacked_slices_get_their_own_scales():
    w = jax.random.normal(jax.random.key(5), (2, 16, 8))
    x = jax.random.normal(jax.random.key(6), (2, 32, 16))
    x = x.at[0, :, 3].multiply(20.0).at[1, :, 9].multiply(20.0)
    roles = {"kernel": Role("matmul", contracting=(1,), output=(2,), stacked=(0,))}
    q = awq(
        lambda p, x: jnp.einsum("lbi,lio->lbo", x, p["kernel"]),
        {"kernel": w},
        [(x,)],
        QuantSpec(bits=3),
        roles=roles,
        quiet=True,
    )["kernel"]
    s = np.asarray(q.input_scale)[..., 0]
    assert s.shape == (2, 16)
    assert s[0].argmax() == 3 and s[1].argmax() == 9
    assert q[1].input_scale.shape == (16, 1) and isinstance(q[1], AWQArray)
    assert q[1].inner.shape == (16, 8) and q[1].inner.scale.shape == (1, 8)
    np.testing.assert_array_equal(q[1].dequantize(), q.dequantize()[1])


def test_bad_input():
    params = {"Dense_0": {"kernel": jnp.ones((64, 4))}}
    xs = [(jnp.ones((2, 64)),)]
    with pytest.raises(ValueError, match="grid"):
        awq(dense_fn, params, xs, QuantSpec(), grid=0, quiet=True)
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*PerGroup"):
        awq(dense_fn, params, xs, QuantSpec(granularity=PerGroup(48)), quiet=True)
    bad = {"Dense_0": {"kernel": jnp.ones((64, 4)).at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        awq(dense_fn, bad, xs, QuantSpec(), quiet=True)
    two = {"Dense_0": {"kernel": jnp.ones((64, 4))}, "Dense_1": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        awq(dense_fn, two, xs, QuantSpec(), quiet=True)  # never multiplied: no statistics
    with pytest.raises(ValueError, match="batches"):
        awq(dense_fn, params, [], QuantSpec(), quiet=True)
    with pytest.raises(TypeError, match="QuantSpec"):
        awq_layer(jnp.ones((4, 2)), jnp.eye(4), "int4")
    with pytest.raises(ValueError, match="alpha"):
        awq_layer(jnp.ones((4, 2)), jnp.eye(4), QuantSpec(), alpha=1.5)
    with pytest.raises(ValueError, match=r"\(in, in\)"):
        awq_layer(jnp.ones((4, 2)), jnp.eye(3), QuantSpec())


@settings()
@given(
    shape=st.sampled_from([(16, 4), (48, 24)]),
    bits=st.sampled_from([2, 4, 8]),
    gain=st.sampled_from([0.0, 1.0, 1e-3, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_property_never_worse_than_rtn(shape, bits, gain, seed):
    n_in, n_out = shape
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    x = rng.standard_normal((32, n_in))
    x[:, rng.integers(0, n_in, 2)] *= gain  # zeros (dead channels), tiny or huge channels
    qa, stats = awq_layer(jnp.asarray(w), hess(x), QuantSpec(bits=bits), grid=4)
    assert isinstance(qa.inner, QArray) and qa.shape == w.shape and qa.dtype == np.float32
    assert float(stats.output_error) <= float(stats.rtn_output_error)
    assert np.all(np.isfinite(np.asarray(qa.dequantize())))
    assert np.all(np.asarray(qa.input_scale) > 0)
    h = hess(x)
    got = float(calibration.output_error(jnp.asarray(w), qa.dequantize(), h))
    np.testing.assert_allclose(got, float(stats.output_error), rtol=1e-3, atol=1e-5)
