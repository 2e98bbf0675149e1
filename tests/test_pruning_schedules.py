"""Sparsity schedules: NumPy reference, piecewise constancy, monotonicity, exact end values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress.pruning import constant_schedule, polynomial_schedule


def reference_polynomial(t, *, s_f, t0, t_end, s_i, power, dt):
    """Zhu & Gupta 2017, written out in float64: updates at t0 + k*dt only."""
    if t < t0:
        return 0.0
    if t >= t_end:
        return s_f
    k = (t - t0) // dt
    n_fraction = (k * dt) / (t_end - t0)
    return s_f + (s_i - s_f) * (1.0 - n_fraction) ** power


def values(schedule, steps):
    """Schedule values at every step, through one jitted vmap (one compile per length)."""
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)))


# Bucket the evaluation range so hypothesis examples reuse compiled functions.
STEPS = np.arange(0, 160)


def test_constant_schedule_values():
    s = constant_schedule(0.75, begin_step=7)
    v = values(s, STEPS)
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, np.where(STEPS >= 7, np.float32(0.75), 0.0))
    assert float(s(0)) == 0.0 and float(s(7)) == np.float32(0.75)


def test_constant_schedule_default_begins_at_zero():
    assert float(constant_schedule(0.5)(0)) == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(final_sparsity=0.9, begin_step=10, end_step=110, power=3, update_every=10),
        dict(final_sparsity=0.5, begin_step=0, end_step=37, power=1, update_every=5),
        dict(
            final_sparsity=0.8,
            begin_step=3,
            end_step=50,
            initial_sparsity=0.2,
            power=2.5,
            update_every=1,
        ),
        dict(final_sparsity=0.95, begin_step=20, end_step=30, power=3, update_every=100),
    ],
)
def test_polynomial_matches_numpy_reference(kwargs):
    s = polynomial_schedule(**kwargs)
    got = values(s, STEPS)
    ref = np.array(
        [
            reference_polynomial(
                int(t),
                s_f=kwargs["final_sparsity"],
                t0=kwargs["begin_step"],
                t_end=kwargs["end_step"],
                s_i=kwargs.get("initial_sparsity", 0.0),
                power=kwargs["power"],
                dt=kwargs["update_every"],
            )
            for t in STEPS
        ]
    )
    # The targets are the float64 formula rounded once to float32: equal bit for bit.
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    # The final value is exact and the start is exactly the initial sparsity.
    assert got[kwargs["end_step"]] == np.float32(kwargs["final_sparsity"])
    assert got[kwargs["begin_step"]] == np.float32(kwargs.get("initial_sparsity", 0.0))
    assert np.all(got[: kwargs["begin_step"]] == 0.0)


def test_polynomial_scalar_eager_equals_jit():
    s = polynomial_schedule(0.9, begin_step=5, end_step=95, update_every=10)
    jitted = jax.jit(s)
    for t in (0, 4, 5, 14, 15, 50, 94, 95, 10_000):
        a, b = s(t), jitted(jnp.int32(t))
        assert a.dtype == jnp.float32 and a.shape == ()
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@settings()
@given(
    begin=st.integers(0, 40),
    length=st.integers(1, 100),
    update_every=st.sampled_from([1, 2, 3, 7, 10, 25, 200]),
    power=st.sampled_from([1, 2, 3, 0.5, 4.7]),
    initial=st.floats(0.0, 1.0, exclude_max=True),
    final=st.floats(0.0, 1.0, exclude_max=True),
)
def test_polynomial_properties(begin, length, update_every, power, initial, final):
    initial, final = min(initial, final), max(initial, final)
    end = begin + length
    s = polynomial_schedule(
        final,
        begin_step=begin,
        end_step=end,
        initial_sparsity=initial,
        power=power,
        update_every=update_every,
    )
    v = values(s, STEPS)
    # In range, zero before the start, exact from the end on, monotone non-decreasing.
    assert np.all((v >= 0) & (v <= 1))
    assert np.all(v[:begin] == 0.0)
    assert np.all(v[end:] == np.float32(final))
    assert np.all(np.diff(v) >= 0)
    # Piecewise constant: changes happen only at begin + k * update_every or at the end.
    changes = np.flatnonzero(np.diff(v)) + 1
    for t in changes:
        assert t == end or (t >= begin and (t - begin) % update_every == 0), t
    # Against the float64 reference.
    ref = [
        reference_polynomial(
            int(t), s_f=final, t0=begin, t_end=end, s_i=initial, power=power, dt=update_every
        )
        for t in STEPS
    ]
    np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-7)


@settings()
@given(sparsity=st.floats(0.0, 1.0, exclude_max=True), begin=st.integers(0, 200))
def test_constant_properties(sparsity, begin):
    v = values(constant_schedule(sparsity, begin_step=begin), STEPS)
    np.testing.assert_array_equal(v, np.where(STEPS >= begin, np.float32(sparsity), 0.0))


def test_schedule_rejects_non_integer_step():
    with pytest.raises(TypeError, match="scalar integer step"):
        constant_schedule(0.5)(1.5)
    with pytest.raises(TypeError, match="scalar integer step"):
        polynomial_schedule(0.5, begin_step=0, end_step=2)(jnp.arange(3))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: constant_schedule(1.5), r"sparsity must be in \[0, 1\)"),
        (lambda: constant_schedule(1.0), r"sparsity must be in \[0, 1\)"),
        (lambda: constant_schedule(-0.1), r"sparsity must be in \[0, 1\)"),
        (lambda: constant_schedule(float("nan")), r"sparsity must be in \[0, 1\)"),
        (lambda: constant_schedule(0.5, begin_step=-1), "begin_step must be >= 0"),
        (lambda: polynomial_schedule(90, begin_step=0, end_step=10), "pass 0.9"),
        (lambda: polynomial_schedule(0.5, begin_step=10, end_step=10), "end_step .* > begin_step"),
        (
            lambda: polynomial_schedule(0.5, begin_step=0, end_step=10, update_every=0),
            "update_every must be >= 1",
        ),
        (lambda: polynomial_schedule(0.5, begin_step=0, end_step=10, power=0), "power"),
        (lambda: polynomial_schedule(0.5, begin_step=0, end_step=10, power=float("inf")), "power"),
        (
            lambda: polynomial_schedule(0.5, begin_step=0, end_step=10, initial_sparsity=0.6),
            "initial_sparsity .* must be <= final_sparsity",
        ),
        (lambda: polynomial_schedule(0.5, begin_step=0, end_step=2**31), "int32"),
        (
            lambda: polynomial_schedule(0.5, begin_step=0, end_step=2**21, update_every=1),
            "raise update_every",
        ),
    ],
)
def test_schedule_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: constant_schedule("0.5"),
        lambda: constant_schedule(True),
        lambda: constant_schedule(0.5, begin_step=1.0),
        lambda: polynomial_schedule(0.5, begin_step=0, end_step=10, update_every=2.5),
        lambda: polynomial_schedule(0.5, begin_step=0, end_step=10, power="3"),
    ],
)
def test_schedule_type_errors(make):
    with pytest.raises(TypeError):
        make()
