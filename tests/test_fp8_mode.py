"""jc.compressed(fn, mode="fp8"): FP8 weights times activations rounded per row to fp8,
against a NumPy (ml_dtypes) reference; what jc.explain reports; what other leaves do."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jcompress as jc
from jcompress.quantization import (
    E4M3,
    E5M2,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    dequantize,
    quantize,
)

FP8_DOT, FLOAT_FALLBACK = "fp8 dot", "float fallback"  # what jc.explain reports
RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.standard_normal((256, 64), np.float32))
X = jnp.asarray(
    RNG.standard_normal((5, 256), np.float32) * np.array([[1], [1e-3], [1e3], [0], [1]])
)
DTYPES = {"E4M3": ml_dtypes.float8_e4m3fn, "E5M2": ml_dtypes.float8_e5m2}


def fn(p, x):
    return x @ p["Dense_0"]["kernel"]


def _rows_to_fp8(x: np.ndarray, dt) -> np.ndarray:
    """NumPy reference: per-row abs-max scale, saturating cast, back to float32 * scale."""
    fmax = float(ml_dtypes.finfo(dt).max)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    s = np.where(amax > 0, amax.astype(np.float32) * np.float32(1 / fmax), np.float32(1))
    return np.clip(x / s, -fmax, fmax).astype(dt).astype(np.float32) * s


@pytest.mark.parametrize("fmt", ["E4M3", "E5M2"])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(), PerGroup(64)], ids=str)
def test_fp8_mode_equals_the_numpy_reference(fmt, granularity):
    spec = QuantSpec(format=E4M3() if fmt == "E4M3" else E5M2(), granularity=granularity)
    q = quantize({"Dense_0": {"kernel": W}}, spec)
    run = jc.compressed(fn, mode="fp8")
    got = jax.jit(run)(q, X)
    eager = run(q, X)
    w = np.asarray(dequantize(q)["Dense_0"]["kernel"], np.float32)
    want = _rows_to_fp8(np.asarray(X), DTYPES[fmt]) @ w
    scale = np.abs(want).max(axis=1, keepdims=True) + 1e-30
    np.testing.assert_array_less(np.abs(np.asarray(got) - want) / scale, 2e-6)
    np.testing.assert_allclose(eager, got, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got)[3] == 0)  # an all-zero row stays zero (no 0/0)
    # a different model from weight-only: the activations were rounded
    weight_only = np.asarray(jc.compressed(fn)(q, X))
    assert not np.allclose(got, weight_only, rtol=1e-4)
    (record,) = jc.explain(run, q, X)
    if isinstance(granularity, PerGroup):  # no post-dot scale for groups: dequantized
        assert (record.intended, record.formulation) == (
            FLOAT_FALLBACK,
            f"{fmt.lower()}_activations",
        )
    else:
        assert (record.intended, record.formulation) == (FP8_DOT, f"{fmt.lower()}_dot")
        if jax.default_backend() == "cpu":  # XLA:CPU has no fp8 matmul: named, with why
            assert record.compiled == FLOAT_FALLBACK and "no fp8 matmul" in record.note


def test_fp8_mode_with_stacked_layers_and_the_weight_on_the_left():
    layers = jnp.stack([W[:64, :64], -2 * W[64:128, :64]])  # (2, 64, 64)
    roles = {"kernel": jc.Role("matmul", contracting=(1,), output=(2,), stacked=(0,))}
    q = quantize({"kernel": layers}, QuantSpec(format=E4M3()), roles=roles)
    x = jnp.asarray(RNG.standard_normal((2, 3, 64), np.float32))

    def stacked(p, x):  # batch dim 0 on both; the weight as the left operand: (b, out, rows)
        return jnp.einsum("bio,bri->bor", p["kernel"], x)

    got = jc.compressed(stacked, mode="fp8")(q, x)
    w = np.asarray(dequantize(q)["kernel"], np.float32)
    xr = _rows_to_fp8(np.asarray(x), ml_dtypes.float8_e4m3fn)
    want = np.einsum("bio,bri->bor", w, xr)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_nan_rows_give_nan_and_integer_weights_refuse_fp8():
    q = quantize({"Dense_0": {"kernel": W}}, QuantSpec(format=E4M3()))
    x = X.at[1, 3].set(jnp.nan)
    got = np.asarray(jc.compressed(fn, mode="fp8")(q, x))
    assert np.all(np.isnan(got[1])) and np.all(np.isfinite(np.delete(got, 1, axis=0)))
    qi = quantize({"Dense_0": {"kernel": W}}, QuantSpec(bits=8))
    with pytest.raises(ValueError, match=r"Dense_0/kernel: mode='fp8' multiplies 8-bit float"):
        jc.compressed(fn, mode="fp8")(qi, X)


@st.composite
def fp8_problems(draw):
    k, n = draw(st.sampled_from([(32, 8), (64, 16), (48, 24)]))
    rows = draw(st.sampled_from([1, 3, 8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    w = rng.standard_normal((k, n)).astype(np.float32) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    w[rng.random((k, n)) < draw(st.sampled_from([0.0, 0.5]))] = 0.0
    row_scale = rng.choice([0.0, 1e-4, 1.0, 1e4], size=(rows, 1)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32) * row_scale
    fmt = draw(st.sampled_from(["E4M3", "E5M2"]))
    granularity = draw(st.sampled_from([PerTensor(), PerChannel()]))
    return w, x, fmt, granularity


@given(fp8_problems())
def test_property_fp8_mode_matches_the_reference(problem):
    w, x, fmt, granularity = problem
    spec = QuantSpec(format=E4M3() if fmt == "E4M3" else E5M2(), granularity=granularity)
    q = quantize({"Dense_0": {"kernel": jnp.asarray(w)}}, spec)
    got = np.asarray(jc.compressed(fn, mode="fp8")(q, jnp.asarray(x)))
    w_q = np.asarray(dequantize(q)["Dense_0"]["kernel"], np.float64)
    want = _rows_to_fp8(x, DTYPES[fmt]).astype(np.float64) @ w_q
    assert np.all(np.isfinite(got))
    bound = 4e-6 * (np.abs(_rows_to_fp8(x, DTYPES[fmt])) @ np.abs(w_q)) + 1e-30
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
