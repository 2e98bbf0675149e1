"""Tests of jcompress.quantization against an independent NumPy reference.

The reference (``ref_quantize``) computes every block of elements that share a scale from an
explicit per-element block id (no reshapes), in NumPy ``float32`` with the documented formulas,
so equality with it checks the layout (which axes share a scale) and the arithmetic at once.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jcompress.quantization as jq
from jcompress.quantization import (
    MSE,
    AbsMax,
    Percentile,
    PerChannel,
    PerGroup,
    PerTensor,
    QArray,
    QuantSpec,
    _quantize,
    _scales,
)
from jcompress.tree import Role

TINY = np.float32(np.finfo(np.float32).tiny)
DENSE = Role("matmul", contracting=(0,), output=(1,))

# ----------------------------------------------------------------------------------------------
# The independent NumPy reference
# ----------------------------------------------------------------------------------------------


def ref_blocks(shape, role: Role, granularity):
    """``(block id per element, scale shape)`` from explicit per-axis block coordinates."""
    idx = np.indices(shape) if shape else np.zeros((0,), int)
    kept = set(role.stacked)
    if not isinstance(granularity, PerTensor):
        kept |= set(role.output)
    gaxis = role.contracting[-1] if isinstance(granularity, PerGroup) else None
    if gaxis is not None:  # a group is `size` consecutive elements along the group axis
        kept = set(range(len(shape))) - {gaxis}
    coords, sshape = [], []
    for a, n in enumerate(shape):
        if a in kept:
            coords.append(idx[a])
            sshape.append(n)
        elif a == gaxis:
            coords.append(idx[a] // granularity.size)
            sshape.append(n // granularity.size)
        else:
            coords.append(np.zeros(shape, int))
            sshape.append(1)
    if not shape:
        return np.zeros((), int), ()
    return np.ravel_multi_index(coords, sshape), tuple(sshape)


def ref_quantize(w, spec: QuantSpec, role: Role):
    """NumPy float32 absmax quantization: ``(q int64, scale float32, zero_point or None)``."""
    assert isinstance(spec.calibration, AbsMax)
    w = np.asarray(jnp.asarray(w, jnp.float32))
    bid, sshape = ref_blocks(w.shape, role, spec.granularity)
    nblocks = int(np.prod(sshape, dtype=int))
    half = 2 ** (spec.bits - 1)
    if spec.symmetric:
        qmin, qmax = -(half - 1), half - 1
        hi = np.zeros(nblocks, np.float32)
        np.maximum.at(hi, bid.ravel(), np.abs(w).ravel())
        s = hi * np.float32(1 / qmax)
    else:
        qmin, qmax = -half, half - 1
        hi = np.zeros(nblocks, np.float32)
        lo = np.zeros(nblocks, np.float32)
        np.maximum.at(hi, bid.ravel(), w.ravel())
        np.minimum.at(lo, bid.ravel(), w.ravel())
        s = (hi - lo) * np.float32(1 / (qmax - qmin))
    s = np.where(s > 0, np.maximum(s, TINY), np.float32(1)).astype(np.float32)
    inv = np.float32(1) / s
    q = np.round(w * inv[bid])
    zp = None
    if not spec.symmetric:
        zp = np.clip(np.float32(qmin) + np.round(-lo * inv), qmin, qmax).astype(np.float32)
        q = q + zp[bid]
    q = np.clip(q, qmin, qmax).astype(np.int64)
    return q, s.reshape(sshape), None if zp is None else zp.astype(np.int64).reshape(sshape)


def ref_dequantize(q, s, zp, shape, role, granularity):
    bid, _ = ref_blocks(shape, role, granularity)
    z = 0 if zp is None else zp.ravel()[bid]
    return ((q - z).astype(np.float32) * s.ravel()[bid]).astype(np.float32)


def as_int(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.int8)).astype(np.int64)


def f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def check_against_reference(qa: QArray, w, spec, role):
    q, s, zp = ref_quantize(w, spec, role)
    np.testing.assert_array_equal(as_int(qa.values), q)
    np.testing.assert_array_equal(np.asarray(qa.scale), s)
    if zp is None:
        assert qa.zero_point is None
    else:
        np.testing.assert_array_equal(as_int(qa.zero_point), zp)
    deq = ref_dequantize(q, s, zp, w.shape, role, spec.granularity)
    np.testing.assert_array_equal(f32(qa.dequantize()), f32(jnp.asarray(deq).astype(w.dtype)))
    return q, s, zp


def error_bound(w, qa: QArray, role, granularity):
    """``|w - deq| <= scale/2`` for unclipped elements, plus float32 rounding of ``w / scale``
    and of the product (3 ulp of ``|w|``) and the output dtype's rounding (1 ulp, or the
    smallest subnormal where the output is subnormal: float16 below 6e-5)."""
    bid, _ = ref_blocks(w.shape, role, granularity)
    s = np.asarray(qa.scale).ravel()[bid]
    eps = float(jnp.finfo(w.dtype).eps)
    subnormal = float(jnp.finfo(w.dtype).smallest_subnormal)
    w32 = f32(w)
    err = np.abs(w32 - f32(qa.dequantize()))
    f32_eps = float(np.finfo(np.float32).eps)
    return err, s / 2 * (1 + 1e-6) + np.abs(w32) * (eps + 3 * f32_eps) + subnormal


def unclipped(w, qa: QArray, spec, role) -> np.ndarray:
    """Elements whose unclipped integer level lies in the spec's range."""
    bid, _ = ref_blocks(w.shape, role, spec.granularity)
    s = np.asarray(qa.scale).ravel()[bid]
    raw = np.round(f32(w) * (np.float32(1) / s))
    if qa.zero_point is not None:
        raw = raw + as_int(qa.zero_point).ravel()[bid]
    qmin, qmax = spec.levels
    return (raw >= qmin) & (raw <= qmax)


def student_t(shape, seed, df=3.0):
    return np.random.default_rng(seed).standard_t(df, size=shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 9, 16, True, 4.0, "8"])
def test_bits_outside_range_is_an_error(bits):
    with pytest.raises(ValueError, match=r"QuantSpec\.bits must be an int in 2\.\.8"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PerGroup(0), r"PerGroup\.size"),
        (lambda: PerGroup(2.0), r"PerGroup\.size"),
        (lambda: Percentile(0), r"Percentile\.q"),
        (lambda: Percentile(100.5), r"Percentile\.q"),
        (lambda: MSE(grid=1), r"MSE\.grid"),
        (lambda: MSE(min_ratio=1.0), r"MSE\.min_ratio"),
        (lambda: QuantSpec(granularity="channel"), r"QuantSpec\.granularity"),
        (lambda: QuantSpec(calibration="absmax,0.8"), r"QuantSpec\.calibration"),
        (lambda: QuantSpec(symmetric=1), r"QuantSpec\.symmetric"),
    ],
)
def test_configs_are_validated(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_configs_are_frozen_keyword_only_and_hashable():
    spec = QuantSpec(bits=4, granularity=PerGroup(32), calibration=MSE(grid=10))
    with pytest.raises(AttributeError):
        spec.bits = 8
    with pytest.raises(TypeError):
        QuantSpec(4)
    assert hash(spec) == hash(QuantSpec(bits=4, granularity=PerGroup(32), calibration=MSE(grid=10)))
    assert QuantSpec(bits=2).levels == (-1, 1)
    assert QuantSpec(bits=2, symmetric=False).levels == (-2, 1)
    assert QuantSpec(bits=8).levels == (-127, 127)


# ----------------------------------------------------------------------------------------------
# QArray
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_round_trip_every_width(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    qmin, qmax = spec.levels
    rng = np.random.default_rng(bits)
    ints = rng.integers(qmin, qmax + 1, size=(33, 7))
    ints[0, :2] = (qmin, qmax)
    store = {2: jnp.int2, 3: jnp.int4, 4: jnp.int4}.get(bits, jnp.int8)
    values = jnp.asarray(ints, jnp.int8).astype(store)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, (1, 7)), jnp.float32)
    zp = None if symmetric else jnp.asarray(rng.integers(qmin, qmax + 1, (1, 7)), jnp.int8)
    qa = QArray(values, scale, None if zp is None else zp.astype(store), bits=bits, dtype="float32")
    assert qa.values.dtype == store
    np.testing.assert_array_equal(as_int(qa.values), ints)
    # Through the host (ml_dtypes int2/int4) and back, and through jit.
    back = jax.device_put(np.asarray(jax.device_get(qa.values)))
    np.testing.assert_array_equal(as_int(back), ints)
    np.testing.assert_array_equal(as_int(jax.jit(lambda x: x)(qa).values), ints)
    z = 0 if zp is None else np.asarray(zp, np.int64)
    expected = (ints - z).astype(np.float32) * np.asarray(scale)
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), expected)
    container = {2: 2, 3: 4, 4: 4}.get(bits, 8)
    expected_bytes = (
        -(-33 * 7 * container // 8) + 7 * 4 + (0 if symmetric else -(-7 * container // 8))
    )
    assert qa.nbytes == expected_bytes


def test_qarray_validates_its_children():
    v = jnp.zeros((4, 6), jnp.int8)
    with pytest.raises(TypeError, match="stored as int4"):
        QArray(v, jnp.ones((1, 6)), bits=4, dtype=jnp.float32)
    with pytest.raises(ValueError, match="divide"):
        QArray(v, jnp.ones((1, 4)), bits=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="rank"):
        QArray(v, jnp.ones((6,)), bits=8, dtype=jnp.float32)
    with pytest.raises(TypeError, match="float dtype"):
        QArray(v, jnp.ones((1, 6)), bits=8, dtype=jnp.int32)
    with pytest.raises(ValueError, match="zero_point"):
        QArray(v, jnp.ones((1, 6)), jnp.zeros((1, 6), jnp.int32), bits=8, dtype=jnp.float32)
    qa = QArray(v, jnp.ones((1, 6)), bits=8, dtype=jnp.bfloat16)
    with pytest.raises(AttributeError):
        qa.bits = 4
    leaves, treedef = jax.tree.flatten(qa)
    assert len(leaves) == 2 and treedef.num_leaves == 2
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(qa)]
    assert paths == [".values", ".scale"]
    assert qa.dequantize().dtype == jnp.bfloat16 and qa.dtype == jnp.bfloat16


def test_nbytes_counts_packed_bits_not_numpy_bytes():
    w = jnp.asarray(student_t((64, 10), 0))
    q4 = jq.quantize({"kernel": w}, QuantSpec(bits=4, granularity=PerGroup(16)))["kernel"]
    # 640 int4 = 320 B, scales (4, 10) float32 = 160 B; numpy would say 640 B for the values.
    assert q4.values.nbytes == 640
    assert q4.nbytes == 320 + 160
    q2 = jq.quantize({"kernel": w}, QuantSpec(bits=2, symmetric=False))["kernel"]
    assert q2.nbytes == 160 + 40 + 3  # values, scales, 10 int2 zero points = 2.5 -> 3 B
    q3 = jq.quantize({"kernel": w}, QuantSpec(bits=3))["kernel"]
    assert q3.values.dtype == jnp.int4 and q3.nbytes == 320 + 40


# ----------------------------------------------------------------------------------------------
# Numerics against the reference
# ----------------------------------------------------------------------------------------------

LAYOUTS = {
    # name: (shape, role)
    "dense": ((33, 8), DENSE),
    "conv": ((3, 3, 4, 8), Role("conv", contracting=(0, 1, 2), output=(3,))),
    "attn_in": ((16, 4, 8), Role("matmul", contracting=(0,), output=(1, 2))),
    "attn_out": ((4, 8, 16), Role("matmul", contracting=(0, 1), output=(2,))),
    "embed": ((10, 16), Role("gather", contracting=(1,), output=(0,))),
    "stacked": ((3, 16, 8), Role("matmul", contracting=(1,), output=(2,), stacked=(0,))),
    "eqx": ((8, 16), Role("matmul", contracting=(1,), output=(0,))),
}
GRANULARITIES = [PerTensor(), PerChannel(), PerGroup(4)]


LAYOUT_CASES = [  # every layout with every granularity its group axis allows
    pytest.param(name, g, id=f"{name}-{gid}")
    for name, (shape, role) in LAYOUTS.items()
    for g, gid in zip(GRANULARITIES, ["tensor", "channel", "group4"])
    if not (isinstance(g, PerGroup) and shape[role.group_axis] % g.size)
]


@pytest.mark.parametrize("name, granularity", LAYOUT_CASES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_equals_reference_on_layouts(name, granularity, symmetric, strict):
    shape, role = LAYOUTS[name]
    w = jnp.asarray(student_t(shape, hash(name) % 1000))
    spec = QuantSpec(bits=4, granularity=granularity, symmetric=symmetric)
    with strict():
        qa = jq.quantize({"w": w}, spec, where="w", roles={"w": role})["w"]
    _, s, _ = check_against_reference(qa, w, spec, role)
    assert qa.shape == shape and qa.scale.shape == s.shape
    err, bound = error_bound(w, qa, role, granularity)
    ok = unclipped(w, qa, spec, role)
    assert ok.mean() > 0.9
    assert np.all(err[ok] <= bound[ok])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_bound_and_dtype_kept(dtype, bits, strict):
    w = jnp.asarray(np.random.default_rng(bits).normal(size=(33, 7)), dtype)
    spec = QuantSpec(bits=bits)
    with strict():
        qa = jq.quantize({"kernel": w}, spec)["kernel"]
        deq = qa.dequantize()
    assert deq.dtype == dtype and qa.dtype == dtype and deq.shape == w.shape
    check_against_reference(qa, w, spec, DENSE)
    err, bound = error_bound(w, qa, DENSE, spec.granularity)
    assert np.all(err <= bound)  # symmetric absmax never clips


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(8)], ids=["channel", "group"])
def test_values_on_the_grid_round_trip_exactly(bits, granularity):
    qmax = 2 ** (bits - 1) - 1
    rng = np.random.default_rng(bits)
    ints = rng.integers(-qmax, qmax + 1, size=(32, 6))
    ints[::8] = qmax  # every block reaches the top level, so absmax / qmax is the grid step
    step = 2.0 ** rng.integers(-6, 3, size=(1, 6))
    w = jnp.asarray(ints * step, jnp.float32)
    qa = jq.quantize({"kernel": w}, QuantSpec(bits=bits, granularity=granularity))["kernel"]
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), np.asarray(w))
    np.testing.assert_array_equal(as_int(qa.values), ints)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("calibration", [AbsMax(), MSE(grid=8), Percentile(90.0)])
def test_zero_channels_and_groups_give_zeros(symmetric, calibration):
    w = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    w[:, 2] = 0.0  # a zero channel
    w[8:, 4] = 0.0  # a zero group
    for granularity in (PerChannel(), PerGroup(8)):
        spec = QuantSpec(
            bits=4, granularity=granularity, calibration=calibration, symmetric=symmetric
        )
        qa = jq.quantize({"kernel": jnp.asarray(w)}, spec)["kernel"]
        deq = np.asarray(qa.dequantize())
        assert np.all(np.isfinite(np.asarray(qa.scale))) and np.all(np.isfinite(deq))
        assert np.all(deq[:, 2] == 0)
        if isinstance(granularity, PerGroup):
            assert np.all(deq[8:, 4] == 0)


def test_asymmetric_zero_is_exact():
    rng = np.random.default_rng(1)
    w = rng.uniform(-0.3, 1.7, size=(24, 5)).astype(np.float32)
    w[rng.random(w.shape) < 0.3] = 0.0
    for bits in (2, 3, 4, 8):
        qa = jq.quantize({"kernel": jnp.asarray(w)}, QuantSpec(bits=bits, symmetric=False))
        deq = np.asarray(qa["kernel"].dequantize())
        assert np.all(deq[w == 0] == 0.0)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(32)], ids=["channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_never_worse_than_absmax_on_heavy_tails(bits, granularity, symmetric):
    w = jnp.asarray(student_t((128, 24), bits, df=2.5))
    errs = {}
    for cal in (AbsMax(), MSE(grid=40)):
        spec = QuantSpec(bits=bits, granularity=granularity, calibration=cal, symmetric=symmetric)
        qa = jq.quantize({"kernel": w}, spec)["kernel"]
        errs[type(cal).__name__] = np.sum((f32(qa.dequantize()) - f32(w)).astype(np.float64) ** 2)
    assert errs["MSE"] <= errs["AbsMax"] * (1 + 1e-6)
    assert errs["MSE"] < 0.99 * errs["AbsMax"]  # heavy tails: clipping pays


def test_mse_is_never_worse_per_block():
    w = jnp.asarray(student_t((64, 40), 7, df=2.0))
    spec = QuantSpec(bits=3, granularity=PerGroup(16))
    blocks = _scales.scale_blocks("w", w.shape, spec, DENSE)
    err = {}
    for cal in (AbsMax(), MSE(grid=25)):
        qa = jq.quantize(
            {"kernel": w}, QuantSpec(bits=3, granularity=PerGroup(16), calibration=cal)
        )
        d = (f32(qa["kernel"].dequantize()) - f32(w)).astype(np.float64) ** 2
        err[type(cal).__name__] = d.reshape(blocks.split_shape).sum(axis=blocks.reduce_axes)
    assert np.all(err["MSE"] <= err["AbsMax"] * (1 + 1e-5))


@pytest.mark.parametrize("bits", [2, 4])
def test_asymmetric_beats_symmetric_on_one_signed_weights(bits):
    w = jnp.asarray(np.abs(student_t((64, 16), 3, df=5.0)))
    err = {}
    for sym in (True, False):
        qa = jq.quantize({"kernel": w}, QuantSpec(bits=bits, symmetric=sym))["kernel"]
        err[sym] = np.sum((f32(qa.dequantize()) - f32(w)) ** 2)
    assert err[False] < 0.5 * err[True]


def test_percentile_clips_outliers_and_100_is_absmax():
    w = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    w[0, 1] = 50.0
    p = {"kernel": jnp.asarray(w)}
    absmax = jq.quantize(p, QuantSpec(bits=4))["kernel"]
    full = jq.quantize(p, QuantSpec(bits=4, calibration=Percentile(100)))["kernel"]
    np.testing.assert_array_equal(np.asarray(absmax.scale), np.asarray(full.scale))
    clipped = jq.quantize(p, QuantSpec(bits=4, calibration=Percentile(99.0)))["kernel"]
    expected = np.percentile(np.abs(w), 99.0, axis=0) / 7
    np.testing.assert_allclose(np.asarray(clipped.scale)[0], expected, rtol=1e-5)
    assert float(clipped.scale[0, 1]) < 0.2 * float(absmax.scale[0, 1])


def test_tiny_and_huge_values():
    rng = np.random.default_rng(0)
    for magnitude in (1e-30, 1e-39, 3e38):
        w = (rng.uniform(-1, 1, size=(16, 4)) * magnitude).astype(np.float32)
        for sym in (True, False):
            spec = QuantSpec(bits=4, symmetric=sym)
            qa = jq.quantize({"kernel": jnp.asarray(w)}, spec)["kernel"]
            assert np.all(np.isfinite(np.asarray(qa.scale))) and np.all(np.asarray(qa.scale) > 0)
            err, bound = error_bound(jnp.asarray(w), qa, DENSE, spec.granularity)
            ok = unclipped(jnp.asarray(w), qa, spec, DENSE)
            assert np.all(err[ok] <= bound[ok]) and np.all(np.isfinite(err))


# ----------------------------------------------------------------------------------------------
# Determinism, jit, sharding, transformations
# ----------------------------------------------------------------------------------------------

SPECS = [
    QuantSpec(),
    QuantSpec(bits=4, granularity=PerGroup(16), calibration=MSE(grid=12)),
    QuantSpec(bits=3, symmetric=False, calibration=Percentile(99.0)),
]


@pytest.mark.parametrize("spec", SPECS, ids=["int8", "int4mse", "int3pct"])
def test_jit_equals_eager_and_is_deterministic(spec):
    params = {"Dense_0": {"kernel": jnp.asarray(student_t((64, 12), 0)), "bias": jnp.ones(12)}}
    eager = jq.quantize(params, spec)
    again = jq.quantize(params, spec)
    jitted = jax.jit(lambda p: jq.quantize(p, spec))(params)
    for other in (again, jitted):
        a, b = eager["Dense_0"]["kernel"], other["Dense_0"]["kernel"]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(
                as_int(x) if x.dtype != jnp.float32 else x,
                as_int(y) if y.dtype != jnp.float32 else y,
            )
        assert other["Dense_0"]["bias"] is params["Dense_0"]["bias"] or other is jitted


def test_no_recompilation_on_second_call():
    params = {"Dense_0": {"kernel": jnp.asarray(student_t((32, 8), 1))}}
    spec = QuantSpec(bits=4, granularity=PerGroup(8))
    jq.quantize(params, spec)
    size = _quantize._quantize_leaf._cache_size()
    other = {"Dense_0": {"kernel": jnp.asarray(student_t((32, 8), 2))}}
    jq.quantize(other, spec)
    jq.quantize(other, spec, scales=jq.calibrate(params, spec))
    jq.quantize(other, spec, scales=jq.calibrate(other, spec))
    assert _quantize._quantize_leaf._cache_size() == size + 1  # one entry for scales= given


@pytest.mark.parametrize("spec", SPECS, ids=["int8", "int4mse", "int3pct"])
def test_sharded_quantize_inside_jit_keeps_output_sharding(devices, spec):
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    sharding = NamedSharding(mesh, P(None, "x"))
    w = jax.device_put(jnp.asarray(student_t((64, 64), 3)), sharding)
    fn = jax.jit(lambda p: jq.quantize(p, spec))
    qa = fn({"kernel": w})["kernel"]
    for child in (qa.values, qa.scale, qa.zero_point):
        if child is not None:
            assert child.sharding.is_equivalent_to(sharding, child.ndim), child.sharding
    hlo = fn.lower({"kernel": w}).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    single = jq.quantize({"kernel": jnp.asarray(np.asarray(w))}, spec)["kernel"]
    np.testing.assert_array_equal(as_int(qa.values), as_int(single.values))
    np.testing.assert_array_equal(np.asarray(qa.scale), np.asarray(single.scale))


STACK_ROLE = Role("matmul", contracting=(1,), output=(2,), stacked=(0,))


@pytest.fixture(scope="module")
def stacked():
    w = jnp.asarray(student_t((3, 16, 8), 4))
    spec = QuantSpec(bits=4, granularity=PerGroup(8), symmetric=False)
    qa = jq.quantize({"w": w}, spec, where="w", roles={"w": STACK_ROLE})["w"]
    return w, spec, qa


def test_stacked_layers_get_their_own_scales(stacked):
    w, spec, qa = stacked
    assert qa.scale.shape == (3, 2, 8) and qa.zero_point.shape == (3, 2, 8)
    for i in range(3):
        alone = jq.quantize({"kernel": w[i]}, spec)["kernel"]
        np.testing.assert_array_equal(np.asarray(alone.scale), np.asarray(qa.scale[i]))
        np.testing.assert_array_equal(as_int(alone.values), as_int(qa.values[i]))


def test_vmap_scan_and_slicing_over_stacked_axis(stacked):
    _, _, qa = stacked
    full = np.asarray(qa.dequantize())
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda q: q.dequantize())(qa)), full)
    x = jnp.ones((2, 16))
    _, ys = jax.lax.scan(lambda c, q: (c, x @ q.dequantize()), 0.0, qa)
    np.testing.assert_allclose(np.asarray(ys), np.einsum("bi,lio->lbo", x, full), rtol=1e-5)
    for index in (1, -1, slice(0, 2), slice(None, None, 2), (2,)):
        sliced = qa[index]
        assert isinstance(sliced, QArray)
        np.testing.assert_array_equal(np.asarray(sliced.dequantize()), full[index])
        assert sliced.shape == full[index].shape
    np.testing.assert_array_equal(np.asarray(qa[1, :, 2:5].dequantize()), full[1, :, 2:5])
    with pytest.raises(ValueError, match="blocked scales"):
        qa[0, 3]  # axis 1 of the slice is the group axis
    with pytest.raises(TypeError, match="ints and slices"):
        qa[jnp.array([0, 1])]


def test_per_tensor_scale_is_shared_when_slicing():
    w = jnp.asarray(student_t((4, 6), 5))
    qa = jq.quantize({"kernel": w}, QuantSpec(granularity=PerTensor()))["kernel"]
    assert qa.scale.shape == (1, 1)
    np.testing.assert_array_equal(
        np.asarray(qa[1:3].dequantize()), np.asarray(qa.dequantize())[1:3]
    )
    np.testing.assert_array_equal(np.asarray(qa[2].dequantize()), np.asarray(qa.dequantize())[2])


@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(4)], ids=["row", "group"])
def test_take_dequantizes_only_gathered_rows(granularity):
    table = jnp.asarray(student_t((10, 16), 6))
    spec = QuantSpec(bits=4, granularity=granularity, symmetric=False)
    qa = jq.quantize({"embedding": table}, spec)["embedding"]
    assert qa.scale.shape == ((10, 1) if isinstance(granularity, PerChannel) else (10, 4))
    full = np.asarray(qa.dequantize())
    ids = jnp.array([[1, 3, 3], [9, -1, 0]])
    np.testing.assert_array_equal(np.asarray(qa.take(ids)), full[np.asarray(ids)])
    cols = jnp.array([0, 5, 15, -2])
    np.testing.assert_array_equal(np.asarray(qa.take(cols, axis=1)), full[:, np.asarray(cols)])
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda q, i: q.take(i))(qa, ids)), full[np.asarray(ids)]
    )


# ----------------------------------------------------------------------------------------------
# Trees, rules, selection and errors
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_params():
    from jcompress.demo import MLP

    return jax.jit(MLP((32, 16, 10)).init)(jax.random.key(0), jnp.ones((1, 64)))


def test_only_selected_leaves_change(mlp_params, strict):
    with strict():
        q = jq.quantize(mlp_params, QuantSpec(bits=4, granularity=PerGroup(16)))
    assert jax.tree.structure(q, is_leaf=jq.QArray.__instancecheck__) == jax.tree.structure(
        mlp_params
    )
    for layer in ("Dense_0", "Dense_1", "Dense_2"):
        assert isinstance(q["params"][layer]["kernel"], QArray)
        assert q["params"][layer]["bias"] is mlp_params["params"][layer]["bias"]
    back = jq.dequantize(q)
    assert back["params"]["Dense_0"]["bias"] is mlp_params["params"]["Dense_0"]["bias"]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), back) == jax.tree.map(
        lambda x: (x.shape, x.dtype), mlp_params
    )


def test_rules_first_match_wins_and_none_keeps_float(mlp_params):
    rules = [
        (r"params/Dense_2/kernel", None),
        (r"params/Dense_0/.*", QuantSpec(bits=4, granularity=PerGroup(32))),
        (r".*", QuantSpec(bits=8)),
    ]
    q = jq.quantize(mlp_params, rules)["params"]
    assert not isinstance(q["Dense_2"]["kernel"], QArray)
    assert q["Dense_0"]["kernel"].bits == 4 and q["Dense_0"]["kernel"].scale.shape == (2, 32)
    assert q["Dense_1"]["kernel"].bits == 8 and q["Dense_1"]["kernel"].scale.shape == (1, 16)
    # rules and where intersect
    q = jq.quantize(mlp_params, rules[1:], where=r".*Dense_(0|1)/kernel")["params"]
    assert q["Dense_0"]["kernel"].bits == 4 and q["Dense_1"]["kernel"].bits == 8
    assert not isinstance(q["Dense_2"]["kernel"], QArray)
    with pytest.raises(ValueError, match=r"rule 'params/Dense_2/kernel' selects no leaf"):
        jq.quantize(mlp_params, rules, where=r".*Dense_(0|1)/kernel")  # where leaves it out


@pytest.mark.parametrize(
    "rules, where, match",
    [
        ([(r"params/Dense_9/.*", QuantSpec())], None, r"'params/Dense_9/\.\*' selects no leaf"),
        (
            [(r".*", QuantSpec()), (r".*Dense_1/kernel", None)],
            None,
            r"which earlier rules take or where= leaves out",
        ),
        ([(r".*bias", QuantSpec()), (r".*", QuantSpec())], None, r"'\.\*bias' selects no leaf"),
        ([(r".*", None)], None, "nothing to quantize"),
        (QuantSpec(), r"nothing/here", "selects no leaf"),
        (QuantSpec(), r".*", r"needs floating leaves"),
        ("int8", None, "QuantSpec or an ordered list"),
        ([(r"(", QuantSpec())], None, "not a valid regular expression"),
        ([], None, "empty list"),
    ],
)
def test_bad_selections_are_errors(mlp_params, rules, where, match):
    params = {**mlp_params, "step": jnp.array(3, jnp.int32)}
    with pytest.raises((ValueError, TypeError), match=match):
        jq.quantize(params, rules, where=where)


def test_group_size_not_dividing_is_a_clear_error(mlp_params):
    with pytest.raises(
        ValueError, match=r"params/Dense_2/kernel: PerGroup\(32\).*size 16.*divisible"
    ):
        jq.quantize(mlp_params, QuantSpec(granularity=PerGroup(32)))
    # the fix the message names: a rule for that leaf
    fixed = [
        ("params/Dense_2/kernel", QuantSpec(granularity=PerChannel())),
        (".*", QuantSpec(granularity=PerGroup(32))),
    ]
    q = jq.quantize(mlp_params, fixed)["params"]
    assert q["Dense_2"]["kernel"].scale.shape == (1, 10)


def test_non_finite_weights_eager_error_and_flag_under_jit():
    w = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    w[3, 1] = np.nan
    w[9, 4] = np.inf
    params = {"Dense_0": {"kernel": jnp.asarray(w)}}
    for fn in (jq.quantize, jq.calibrate, jq.fake_quantize):
        with pytest.raises(ValueError, match=r"Dense_0/kernel: .* found 2 NaN/Inf"):
            fn(params, QuantSpec())
    q = jax.jit(lambda p: jq.quantize(p, QuantSpec(granularity=PerGroup(8))))(params)
    qa = q["Dense_0"]["kernel"]
    assert bool(jq.nonfinite(q))
    deq = np.asarray(qa.dequantize())
    bad = np.zeros_like(w, bool)
    bad[0:8, 1] = True
    bad[8:16, 4] = True
    assert np.all(np.isnan(deq[bad])) and np.all(np.isfinite(deq[~bad]))
    np.testing.assert_array_equal(
        np.isnan(np.asarray(qa.scale)), [[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]]
    )
    clean = jax.jit(lambda p: jq.quantize(p, QuantSpec()))({"kernel": jnp.ones((4, 4))})
    assert not bool(jq.nonfinite(clean))
    assert bool(jax.jit(jq.nonfinite)(q))
    fq = jax.jit(lambda p: jq.fake_quantize(p, QuantSpec()))(params)["Dense_0"]["kernel"]
    assert (
        np.isnan(np.asarray(fq)[:, [1, 4]]).all() and np.isfinite(np.asarray(fq)[:, [0, 2]]).all()
    )


def test_already_quantized_leaf_is_an_error(mlp_params):
    q = jq.quantize(mlp_params, QuantSpec())
    with pytest.raises(ValueError, match="already compressed"):
        jq.quantize(q, QuantSpec())


def test_selected_leaf_missing_from_roles_is_an_error(mlp_params):
    roles = {"params/Dense_0/kernel": DENSE}
    with pytest.raises(ValueError, match=r"params/Dense_1/kernel.*missing from roles"):
        jq.quantize(mlp_params, QuantSpec(), where=r".*kernel", roles=roles)


# ----------------------------------------------------------------------------------------------
# Real layouts: Flax linen attention, nn.scan, Embed, nnx, Equinox
# ----------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(12, 16)(ids)
        x = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(x)

        class Block(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return nn.relu(nn.Dense(16)(x)), None

        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(
            x, None
        )
        return nn.Dense(12)(x)


@pytest.fixture(scope="module")
def tiny():
    model = _Tiny()
    ids = jnp.arange(10).reshape(2, 5)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    attn_in = Role("matmul", contracting=(0,), output=(1, 2))
    roles = {
        "Embed_0/embedding": Role("gather", contracting=(1,), output=(0,)),
        "MultiHeadDotProductAttention_0/query/kernel": attn_in,
        "MultiHeadDotProductAttention_0/key/kernel": attn_in,
        "MultiHeadDotProductAttention_0/value/kernel": attn_in,
        "MultiHeadDotProductAttention_0/out/kernel": Role("matmul", (0, 1), (2,)),
        "ScanBlock_0/Dense_0/kernel": STACK_ROLE,
        "Dense_0/kernel": DENSE,
    }
    return model, ids, params, roles


def test_real_flax_layouts_with_roles(tiny, strict):
    model, ids, params, roles = tiny
    spec = QuantSpec(bits=8, granularity=PerGroup(4))
    with strict():
        q = jq.quantize(params, spec, roles=roles)
    scale_shapes = {
        "Embed_0/embedding": (12, 4),
        "MultiHeadDotProductAttention_0/query/kernel": (4, 4, 8),
        "MultiHeadDotProductAttention_0/out/kernel": (4, 2, 16),
        "ScanBlock_0/Dense_0/kernel": (3, 4, 16),
        "Dense_0/kernel": (4, 12),
    }
    leaves = dict(jax.tree_util.tree_leaves_with_path(q, is_leaf=jq.QArray.__instancecheck__))
    leaves = {"/".join(str(k.key) for k in kp): v for kp, v in leaves.items()}
    for path, shape in scale_shapes.items():
        assert leaves[path].scale.shape == shape, path
        flat = dict(zip(leaves, jax.tree.leaves(params)))
        check_against_reference(leaves[path], flat[path], spec, roles[path])
    out = model.apply({"params": jq.dequantize(q)}, ids)
    ref = model.apply({"params": params}, ids)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(ref), atol=0.05 * float(jnp.abs(ref).max())
    )


def test_per_channel_attention_scales_are_per_head_feature(tiny):
    _, _, params, roles = tiny
    q = jq.quantize(params, QuantSpec(), roles=roles)
    qa = q["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert qa.scale.shape == (1, 4, 8)
    w = np.asarray(params["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    np.testing.assert_array_equal(
        np.asarray(qa.scale)[0], np.abs(w).max(axis=0) * np.float32(1 / 127)
    )
    assert q["Embed_0"]["embedding"].scale.shape == (12, 1)
    assert q["ScanBlock_0"]["Dense_0"]["kernel"].scale.shape == (3, 1, 16)
    assert q["MultiHeadDotProductAttention_0"]["out"]["kernel"].scale.shape == (1, 1, 16)


def test_embedding_default_role_is_per_row():
    table = jnp.asarray(student_t((12, 6), 9))
    qa = jq.quantize({"Embed_0": {"embedding": table}}, QuantSpec())["Embed_0"]["embedding"]
    assert qa.scale.shape == (12, 1)
    np.testing.assert_array_equal(
        np.asarray(qa.scale)[:, 0], np.abs(np.asarray(table)).max(1) * np.float32(1 / 127)
    )


def test_nnx_state_round_trip():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 16, rngs=rngs)
            self.linear = nnx.Linear(16, 8, rngs=rngs)

        def __call__(self, ids):
            return self.linear(self.embed(ids))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    q = jq.quantize(state, QuantSpec(bits=4, granularity=PerGroup(8)))
    assert isinstance(q, nnx.State)
    assert isinstance(q["linear"]["kernel"].get_value(), QArray)
    assert q["embed"]["embedding"].get_value().scale.shape == (10, 2)
    assert not isinstance(q["linear"]["bias"].get_value(), QArray)
    model = nnx.merge(graphdef, jq.dequantize(q))
    ids = jnp.array([1, 2, 3])
    ref = nnx.merge(graphdef, state)(ids)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(ref), atol=0.1)
    fq = jq.fake_quantize(state, QuantSpec(bits=4, granularity=PerGroup(8)))
    np.testing.assert_array_equal(
        np.asarray(fq["linear"]["kernel"].get_value()),
        np.asarray(q["linear"]["kernel"].get_value().dequantize()),
    )


def test_equinox_out_in_layout_with_roles(strict):
    model = eqx.nn.Linear(16, 8, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    roles = {"weight": Role("matmul", contracting=(1,), output=(0,))}
    with strict():
        q = jq.quantize(
            params, QuantSpec(bits=4, granularity=PerGroup(8)), where="weight", roles=roles
        )
    assert q.weight.scale.shape == (8, 2) and q.bias is params.bias
    check_against_reference(
        q.weight, params.weight, QuantSpec(bits=4, granularity=PerGroup(8)), roles["weight"]
    )
    out = eqx.combine(jq.dequantize(q), static)(jnp.ones(16))
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(jnp.ones(16))), atol=0.1)
    with pytest.raises(ValueError, match="selects no leaf"):
        jq.quantize(params, QuantSpec())  # no 'kernel': Equinox needs where=/roles=


# ----------------------------------------------------------------------------------------------
# calibrate / scales= / fake_quantize (QAT)
# ----------------------------------------------------------------------------------------------


def test_calibrate_then_quantize_equals_quantize(mlp_params):
    spec = QuantSpec(bits=4, granularity=PerGroup(16), calibration=MSE(grid=10), symmetric=False)
    where = r".*Dense_1/kernel"
    scales = jq.calibrate(mlp_params, spec, where=where)
    assert list(scales) == ["params/Dense_1/kernel"]
    assert list(jq.calibrate(mlp_params, QuantSpec())) == [
        f"params/Dense_{i}/kernel" for i in range(3)
    ]
    direct = jq.quantize(mlp_params, spec, where=where)
    reused = jq.quantize(mlp_params, spec, where=where, scales=scales)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(reused)):
        np.testing.assert_array_equal(
            np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        )
    jitted = jax.jit(lambda p: jq.calibrate(p, spec, where=where))(mlp_params)
    for k in scales:
        np.testing.assert_array_equal(np.asarray(scales[k].scale), np.asarray(jitted[k].scale))


def test_scales_must_match(mlp_params):
    spec = QuantSpec(bits=4)
    scales = jq.calibrate(mlp_params, spec)
    missing = dict(list(scales.items())[:2])
    with pytest.raises(ValueError, match=r"missing 'params/Dense_2/kernel'"):
        jq.quantize(mlp_params, spec, scales=missing)
    with pytest.raises(ValueError, match=r"need \(8, 32\)"):
        jq.quantize(mlp_params, QuantSpec(bits=4, granularity=PerGroup(8)), scales=scales)
    with pytest.raises(ValueError, match="symmetric=False"):
        jq.fake_quantize(mlp_params, QuantSpec(bits=4, symmetric=False), scales=scales)
    with pytest.raises(TypeError, match="Scales"):
        jq.quantize(mlp_params, spec, scales={k: v.scale for k, v in scales.items()})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_forward_and_straight_through_gradient(dtype, symmetric, strict):
    w = jnp.asarray(student_t((32, 8), 11), dtype)
    params = {"kernel": w}
    spec = QuantSpec(bits=3, calibration=MSE(grid=20), symmetric=symmetric)
    scales = jq.calibrate(params, spec)
    with strict():
        fq = jq.fake_quantize(params, spec, scales=scales)["kernel"]
    qa = jq.quantize(params, spec, scales=scales)["kernel"]
    assert fq.dtype == dtype
    np.testing.assert_array_equal(f32(fq), f32(qa.dequantize()))

    def loss(p, x):
        return jnp.sum(jq.fake_quantize(p, spec, scales=scales)["kernel"] * x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=w.shape), dtype)
    grad = jax.jit(jax.grad(loss))(params, x)["kernel"]
    inside = unclipped(w, qa, spec, DENSE)
    assert 0 < inside.mean() < 1  # MSE clipping on heavy tails clips some weights
    np.testing.assert_array_equal(f32(grad), np.where(inside, f32(x), 0.0))


def test_fake_quantize_with_scales_runs_no_search(mlp_params):
    spec = QuantSpec(bits=4, calibration=MSE(grid=10))
    scales = jq.calibrate(mlp_params, spec)
    with_scales = str(
        jax.make_jaxpr(lambda p: jq.fake_quantize(p, spec, scales=scales))(mlp_params)
    )
    without = str(jax.make_jaxpr(lambda p: jq.fake_quantize(p, spec))(mlp_params))
    assert "scan[" in without and "scan[" not in with_scales and "while[" not in with_scales


def test_qat_in_an_ordinary_optax_loop():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)), jnp.float32)
    target = x @ jnp.asarray(student_t((16, 4), 1))
    params = {"Dense_0": {"kernel": jnp.asarray(student_t((16, 4), 2)) * 0.1}}
    spec = QuantSpec(bits=2)
    scales = jq.calibrate(params, spec)

    def loss(p):
        p = jq.fake_quantize(p, spec, scales=scales)
        return jnp.mean((x @ p["Dense_0"]["kernel"] - target) ** 2)

    opt = optax.sgd(0.05)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    losses = []
    for _ in range(30):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert step._cache_size() == 1
    assert losses[-1] < losses[0]
