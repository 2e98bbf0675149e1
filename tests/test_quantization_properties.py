"""Hypothesis properties of jcompress.quantization (``HYPOTHESIS_PROFILE=deep`` for >= 1000 each).

Shapes are bucketed (every new shape is a new XLA compile); bit widths, granularities,
symmetric/asymmetric, dtypes and edge values (zeros, tiny, huge, outliers, odd sizes) vary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from test_quantization import (
    as_int,
    error_bound,
    f32,
    ref_blocks,
    ref_quantize,
    unclipped,
)

import jcompress.quantization as jq
from jcompress.quantization import MSE, Percentile, PerChannel, PerGroup, PerTensor, QuantSpec
from jcompress.tree import Role

# (shape, role): odd sizes, conv, attention, stacked, Equinox (out, in), a vector.
CASES = [
    ((33, 7), Role("matmul", (0,), (1,))),
    ((8, 12), Role("matmul", (1,), (0,))),
    ((3, 3, 4, 6), Role("conv", (0, 1, 2), (3,))),
    ((6, 2, 4), Role("matmul", (0,), (1, 2))),
    ((2, 9, 5), Role("matmul", (1,), (2,), stacked=(0,))),
    ((11,), Role("other")),
]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
ABSMAX = (jq.AbsMax(),)
MODES = ["normal", "zeros", "tiny", "huge", "zero_channel", "outlier", "one_signed"]


def _values(shape, dtype, mode, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4.0, size=shape)
    if mode == "zeros":
        w = np.zeros(shape)
    elif mode == "tiny":
        w = w * (1e-6 if dtype == jnp.float16 else 1e-30)
    elif mode == "huge":
        w = w * (2e3 if dtype == jnp.float16 else 1e36)
    elif mode == "zero_channel":
        w[..., 0] = 0.0
    elif mode == "outlier":
        w.flat[rng.integers(w.size)] = 1e3
    elif mode == "one_signed":
        w = np.abs(w)
    return np.asarray(jnp.asarray(w, jnp.float32).astype(dtype))


@st.composite
def problems(draw, calibrations=ABSMAX):
    shape, role = draw(st.sampled_from(CASES))
    options = [PerTensor(), PerChannel()]
    if role.contracting:
        n = shape[role.group_axis]
        options += [PerGroup(d) for d in range(1, n + 1) if n % d == 0]
    spec = QuantSpec(
        bits=draw(st.integers(2, 8)),
        granularity=draw(st.sampled_from(options)),
        calibration=draw(st.sampled_from(calibrations)),
        symmetric=draw(st.booleans()),
    )
    dtype = draw(st.sampled_from(DTYPES))
    w = _values(shape, dtype, draw(st.sampled_from(MODES)), draw(st.integers(0, 2**16)))
    return jnp.asarray(w), spec, role


def _quantize(w, spec, role):
    with jax.numpy_dtype_promotion("strict"):
        return jq.quantize({"w": w}, spec, where="w", roles={"w": role})["w"]


def _nbytes(qa: jq.QArray, spec: QuantSpec) -> int:
    container = 2 if spec.bits == 2 else 4 if spec.bits <= 4 else 8
    size = int(np.prod(qa.shape, dtype=int))
    nscale = int(np.prod(qa.scale.shape, dtype=int))
    zp = 0 if spec.symmetric else -(-nscale * container // 8)
    return -(-size * container // 8) + 4 * nscale + zp


@given(problems())
def test_absmax_matches_reference_and_bounds(problem):
    w, spec, role = problem
    qa = _quantize(w, spec, role)
    deq = qa.dequantize()
    assert qa.shape == w.shape and qa.dtype == w.dtype and deq.dtype == w.dtype
    q, s, zp = ref_quantize(w, spec, role)
    assert qa.scale.shape == s.shape
    np.testing.assert_array_equal(as_int(qa.values), q)
    np.testing.assert_array_equal(np.asarray(qa.scale), s)
    if zp is not None:
        np.testing.assert_array_equal(as_int(qa.zero_point), zp)
    qmin, qmax = spec.levels
    assert q.min() >= qmin and q.max() <= qmax
    assert qa.nbytes == _nbytes(qa, spec)
    d = f32(deq)
    assert np.all(np.isfinite(d))
    err, bound = error_bound(w, qa, role, spec.granularity)
    ok = unclipped(w, qa, spec, role)
    assert np.all(err[ok] <= bound[ok])
    if spec.symmetric:
        assert ok.all()  # absmax never clips symmetric values
    if not spec.symmetric:
        assert np.all(d[f32(w) == 0] == 0)  # zero is exact


@given(problems(calibrations=(MSE(grid=6), Percentile(90.0), Percentile(99.5))))
def test_calibrated_clipping_bounds_and_mse_never_worse(problem):
    w, spec, role = problem
    qa = _quantize(w, spec, role)
    assert qa.dtype == w.dtype and qa.dequantize().dtype == w.dtype
    err, bound = error_bound(w, qa, role, spec.granularity)
    ok = unclipped(w, qa, spec, role)
    assert np.all(err[ok] <= bound[ok]) and np.all(np.isfinite(err))
    if isinstance(spec.calibration, MSE):
        absmax = _quantize(w, QuantSpec(**{**spec.__dict__, "calibration": jq.AbsMax()}), role)
        bid, sshape = ref_blocks(w.shape, role, spec.granularity)
        per_block = []
        for x in (qa, absmax):
            sq = ((f32(x.dequantize()) - f32(w)).astype(np.float64) ** 2).ravel()
            per_block.append(np.bincount(bid.ravel(), sq, minlength=int(np.prod(sshape))))
        scale = np.maximum(per_block[1], np.finfo(np.float32).tiny)
        assert np.all(per_block[0] <= per_block[1] + 1e-5 * scale)


@given(problems(calibrations=(jq.AbsMax(), MSE(grid=6))))
def test_fake_quantize_forward_and_gradient(problem):
    w, spec, role = problem
    scales = jq.calibrate({"w": w}, spec, where="w", roles={"w": role})
    x = jnp.asarray(np.random.default_rng(0).normal(size=w.shape), w.dtype)

    def loss(p):
        fq = jq.fake_quantize(p, spec, where="w", roles={"w": role}, scales=scales)["w"]
        return jnp.sum((fq * x).astype(jnp.float32))

    grad = jax.grad(loss)({"w": w})["w"]
    qa = jq.quantize({"w": w}, spec, where="w", roles={"w": role}, scales=scales)["w"]
    fq = jq.fake_quantize({"w": w}, spec, where="w", roles={"w": role}, scales=scales)["w"]
    np.testing.assert_array_equal(f32(fq), f32(qa.dequantize()))
    inside = unclipped(w, qa, spec, role)
    assert grad.dtype == w.dtype
    np.testing.assert_array_equal(f32(grad), np.where(inside, f32(x), 0.0))


@given(problems(), st.integers(0, 2**16), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_nonfinite_blocks_become_nan_under_jit(problem, seed, bad_value):
    w, spec, role = problem
    w = np.array(f32(w))
    pos = np.random.default_rng(seed).integers(w.size)
    w.flat[pos] = bad_value
    w = jnp.asarray(w)
    q = jax.jit(lambda p: jq.quantize(p, spec, where="w", roles={"w": role}))({"w": w})
    assert bool(jq.nonfinite(q))
    d = f32(q["w"].dequantize())
    bid, _ = ref_blocks(w.shape, role, spec.granularity)
    in_bad_block = bid == bid.flat[pos]
    assert np.all(np.isnan(d[in_bad_block])) and np.all(np.isfinite(d[~in_bad_block]))
