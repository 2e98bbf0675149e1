"""Hypothesis properties of the distillation losses.

Shapes are bucketed (a few leading shapes and class counts) and every loss runs through one
jitted function per bucket, so the ``ci`` profile compiles a handful of programs; the ``deep``
profile (``HYPOTHESIS_PROFILE=deep``) runs >= 1000 examples per property.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from jcompress import distillation as jd

LEADING = [(1,), (2, 3)]
CLASSES = [2, 11]
TEMPERATURES = [0.25, 1.0, 2.0, 8.0, 30.0]
SCALES = [0.0, 1e-30, 1e-3, 1.0, 1e3, 1e6]

kd = jax.jit(lambda s, t, w, temp: jd.kd_loss(s, t, temperature=temp, where=w))
kd_grad = jax.jit(jax.grad(lambda s, t, temp: jnp.sum(jd.kd_loss(s, t, temperature=temp))))
soft_ce = jax.jit(lambda s, q, temp: jd.soft_cross_entropy(s, q, temperature=temp))
mse = jax.jit(lambda s, t: jd.feature_mse(s, t))
cosine = jax.jit(lambda s, t: jd.feature_cosine(s, t))
attention = jax.jit(lambda s, t: jd.attention_transfer(s, t))


@st.composite
def logits(draw, *, pair=True):
    leading = draw(st.sampled_from(LEADING))
    classes = draw(st.sampled_from(CLASSES))
    dtype = draw(st.sampled_from([np.float32, jnp.bfloat16]))
    scale = draw(st.sampled_from(SCALES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (*leading, classes)

    def one():
        x = rng.standard_normal(shape) * scale
        if draw(st.booleans()):  # ties and repeated values
            x = np.round(x)
        return jnp.asarray(x.astype(np.float32)).astype(dtype)

    return (one(), one()) if pair else one()


temperatures = st.sampled_from(TEMPERATURES)


@given(logits(), temperatures)
def test_kd_is_finite_and_nonnegative(pair, temperature):
    s, t = pair
    loss = np.asarray(kd(s, t, None, temperature))
    assert loss.shape == s.shape[:-1]
    assert np.isfinite(loss).all() and (loss >= 0).all()
    assert np.isfinite(np.asarray(kd_grad(s, t, temperature))).all()


@given(logits(), temperatures, st.sampled_from([-1e3, -1.0, 0.5, 7.0, 1e3]))
def test_kd_is_invariant_to_shifting_logits(pair, temperature, shift):
    s, t = (x.astype(jnp.float32) for x in pair)
    base = np.asarray(kd(s, t, None, temperature))
    moved = np.asarray(kd(s + shift, t - 2 * shift, None, temperature))
    # Rounding of the shifted logits (ulp(|x| + |shift|)) is all that may differ.
    mag = float(jnp.max(jnp.abs(s)) + jnp.max(jnp.abs(t))) + 3 * abs(shift)
    # log-probabilities carry absolute error ~eps·mag/T; the loss multiplies them by T^2.
    atol = 1e-5 + 32 * np.finfo(np.float32).eps * mag * (temperature + 1 / temperature)
    np.testing.assert_allclose(moved, base, rtol=1e-4, atol=atol)


@given(logits(pair=False), temperatures)
def test_kd_is_zero_against_itself(s, temperature):
    np.testing.assert_array_equal(np.asarray(kd(s, s, None, temperature)), 0.0)


@given(logits(), temperatures, st.integers(0, 2**31 - 1))
def test_kd_mask_zeroes_exactly_the_masked_positions(pair, temperature, seed):
    s, t = pair
    where = np.random.default_rng(seed).random(s.shape[:-1]) < 0.5
    full = np.asarray(kd(s, t, None, temperature))
    got = np.asarray(kd(s, t, jnp.asarray(where), temperature))
    np.testing.assert_array_equal(got, np.where(where, full, 0.0))


@given(logits(), temperatures)
def test_soft_cross_entropy_is_at_least_kd(pair, temperature):
    s, t = pair
    q = jax.nn.softmax(t.astype(jnp.float32) / temperature)
    ce = np.asarray(soft_ce(s, q, temperature))
    k = np.asarray(kd(s, t, None, temperature))
    assert np.isfinite(ce).all()
    # CE = KD + T^2 H(q) >= KD (up to float32 rounding of the two computations).
    assert (ce >= k - 1e-4 * (1 + np.abs(k))).all()


@given(logits(), st.sampled_from([0.5, 3.0, 1e3]))
def test_feature_losses_bounds_and_scale_invariance(pair, factor):
    s, t = pair
    m = np.asarray(mse(s, t))
    c = np.asarray(cosine(s, t))
    assert np.isfinite(m).all() and (m >= 0).all()
    assert np.isfinite(c).all() and (c >= -1e-6).all() and (c <= 2 + 1e-6).all()
    # Cosine distance ignores positive scaling (float32 rounding aside).
    s32 = s.astype(jnp.float32)
    np.testing.assert_allclose(
        np.asarray(cosine(s32 * factor, t)), np.asarray(cosine(s32, t)), atol=2e-6
    )
    a = np.asarray(attention(s, t))
    assert np.isfinite(a).all() and (a >= 0).all() and (a <= 4 + 1e-5).all()
