"""Number formats beyond integers: ``QuantSpec(format=...)`` with ``Int`` (the default), ``NF4``
and ``Codebook`` (the ``LookupArray`` leaf), ``E4M3`` and ``E5M2`` (the ``Float8Array`` leaf),
checked against NumPy references; hypothesis properties at the end (``HYPOTHESIS_PROFILE=deep``
for >= 1000 examples)."""

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jcompress as jc
from jcompress import checkpoint
from jcompress.quantization import (
    E4M3,
    E5M2,
    MSE,
    NF4,
    Codebook,
    Float8Array,
    Int,
    LookupArray,
    Percentile,
    PerChannel,
    PerGroup,
    PerTensor,
    QArray,
    QuantSpec,
    awq_layer,
    calibrate,
    dequantize,
    fake_quantize,
    gptq,
    gptq_layer,
    nonfinite,
    quantize,
)
from jcompress.quantization._lookup import NF4_LEVELS, index_dtype
from jcompress.tree import Role, is_compressed

# ---- the format configs ----------------------------------------------------------------------


def test_default_spec_is_unchanged_int8():
    spec = QuantSpec()
    assert spec.format == Int() and spec.bits == 8 and spec.levels == (-127, 127)
    assert spec == QuantSpec(bits=8, format=Int()) == QuantSpec(bits=None)
    assert repr(spec) == (
        "QuantSpec(bits=8, granularity=PerChannel(), calibration=AbsMax(), symmetric=True, "
        "format=Int())"
    )


@pytest.mark.parametrize(
    ("fmt", "width"), [(NF4(), 4), (Codebook(), 4), (E4M3(), 8), (E5M2(), 8), (Int(), 8)]
)
def test_bits_default_to_the_format_width_and_specs_hash(fmt, width):
    spec = QuantSpec(format=fmt)
    assert spec.bits == width
    assert spec == QuantSpec(bits=width, format=fmt) and hash(spec) == hash(
        QuantSpec(bits=width, format=fmt)
    )
    jax.jit(lambda x, s: x, static_argnums=1)(1.0, spec)  # usable as a static argument


def test_format_configs_are_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Codebook().iters = 3
    assert Codebook(init="kmeans++", iters=0) == Codebook(init="kmeans++", iters=0)
    with pytest.raises(ValueError, match=r"Codebook.init must be one of .*'density'"):
        Codebook(init="uniform")
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r"Codebook\.iters must be an int >= 0"):
            Codebook(iters=bad)
    with pytest.raises(TypeError, match="positional"):
        Codebook("linear")  # keyword-only


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": NF4(), "bits": 8}, ValueError, r"NF4\(\)\) needs bits 4 \(or None\)"),
        ({"format": E4M3(), "bits": 4}, ValueError, "needs bits 8"),
        ({"format": E5M2(), "bits": 7}, ValueError, "needs bits 8"),
        ({"format": Codebook(), "bits": 9}, ValueError, r"needs bits in 1\.\.8"),
        ({"format": Codebook(), "bits": 0}, ValueError, r"needs bits in 1\.\.8"),
        ({"format": Int(), "bits": 1}, ValueError, r"bits must be an int in 2\.\.8"),
        ({"format": NF4(), "symmetric": False}, ValueError, "symmetric applies to Int"),
        ({"format": Codebook(), "symmetric": False}, ValueError, "drop symmetric=False"),
        ({"format": NF4(), "calibration": MSE()}, ValueError, "abs-max"),
        ({"format": Codebook(), "calibration": Percentile(99.0)}, ValueError, "calibration="),
        ({"format": Codebook(), "granularity": PerGroup(8)}, ValueError, "PerChannel"),
        ({"format": "nf4"}, TypeError, r"format must be Int\(\), NF4\(\)"),
        ({"format": NF4}, TypeError, "format must be"),
    ],
)
def test_spec_validation_names_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantSpec(**kwargs)


def test_valid_non_integer_specs():
    assert QuantSpec(format=NF4(), granularity=PerGroup(64)).bits == 4
    assert QuantSpec(format=Codebook(), bits=1, granularity=PerTensor()).bits == 1
    assert QuantSpec(format=Codebook(iters=3), bits=8, granularity=PerChannel()).bits == 8
    with pytest.raises(ValueError, match="levels"):
        _ = QuantSpec(format=NF4()).levels  # the integer grid of Int() only


# ---- NF4 -------------------------------------------------------------------------------------

# The NF4 data type of QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' table).
QLORA_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

DENSE = Role("matmul", (0,), (1,))


def _kernel(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(
        dtype
    )


def _leaf(w, spec, role=DENSE, key=None):
    return quantize({"kernel": w}, spec, roles={"kernel": role}, key=key)["kernel"]


def test_nf4_levels_are_the_published_qlora_values():
    np.testing.assert_allclose(NF4_LEVELS, QLORA_NF4, rtol=0, atol=1e-7)
    assert NF4_LEVELS.dtype == np.float32 and NF4_LEVELS[7] == 0.0
    # and they are QLoRA's construction: normal quantiles of 8 positive / 7 negative bins
    ppf = statistics.NormalDist().inv_cdf
    offset = 0.9677083
    pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    built = np.sort(np.array([*pos, 0.0, *neg]))
    np.testing.assert_allclose(NF4_LEVELS, built / built.max(), rtol=0, atol=2e-7)


def _ref_blocks(w: np.ndarray, group: int | None, per_channel: bool):
    """A Dense ``(in, out)`` kernel in float32 as ``(blocks (n, size, out|1...), abs-max per
    block)``: groups of ``group`` inputs, or one block per output channel / for the tensor."""
    x = np.asarray(w, np.float32)
    n_in, n_out = x.shape
    if group is not None:
        blocks = x.reshape(n_in // group, group, n_out)
        return blocks, np.abs(blocks).max(axis=1, keepdims=True)
    axes = (1,) if per_channel else (1, 2)
    return x[None], np.abs(x[None]).max(axis=axes, keepdims=True)


def _ref_nf4(w: np.ndarray, group: int | None, per_channel: bool):
    """NumPy NF4 of a Dense ``(in, out)`` kernel: ``(scale, indices, nearest distance, distance
    to every level)``."""
    x = np.asarray(w, np.float32)
    blocks, absmax = _ref_blocks(x, group, per_channel)
    scale = np.where(absmax > 0, absmax, np.float32(1)).astype(np.float32)
    r = blocks * (np.float32(1) / scale)
    dist = np.abs(r[..., None] - NF4_LEVELS)
    idx = dist.argmin(-1)
    return scale, idx.reshape(x.shape), dist.min(-1).reshape(x.shape), dist.reshape(*x.shape, 16)


@pytest.mark.parametrize(
    ("granularity", "group", "per_channel"),
    [(PerTensor(), None, False), (PerChannel(), None, True), (PerGroup(16), 16, True)],
)
def test_nf4_matches_the_numpy_reference(granularity, group, per_channel):
    w = _kernel((64, 12))
    w = w.at[3, 2].set(0.0).at[:, 5].set(0.0)  # a pruned weight and a pruned channel
    la = _leaf(w, QuantSpec(format=NF4(), granularity=granularity))
    assert isinstance(la, LookupArray) and la.format == "NF4" and la.bits == 4
    assert la.indices.dtype == jnp.uint4 and la.table.shape == (1, 1, 16)
    np.testing.assert_array_equal(la.table[0, 0], NF4_LEVELS)
    ref_scale, _, best, dist = _ref_nf4(np.asarray(w), group, per_channel)
    np.testing.assert_array_equal(la.scale, ref_scale.reshape(la.scale.shape))
    idx = np.asarray(la.indices, np.int64)
    # the chosen level is a nearest one (exactly, up to a float32 ulp at a midpoint)
    chosen = np.take_along_axis(dist, idx[..., None], -1)[..., 0]
    np.testing.assert_allclose(chosen, best, rtol=0, atol=1e-6)
    # every dequantized value is a level times its block's scale, exactly
    scale = np.asarray(la.scale)
    full = np.repeat(scale, 64 // scale.shape[0], axis=0) if scale.shape[0] > 1 else scale
    np.testing.assert_array_equal(la.dequantize(), NF4_LEVELS[idx] * full)
    deq = np.asarray(la.dequantize())
    assert deq[3, 2] == 0.0 and not deq[:, 5].any()  # pruned zeros stay exactly zero
    assert np.all(np.abs(deq) <= np.abs(np.asarray(w)).max())


def test_nf4_keeps_bf16_and_stacked_layers_quantize_alone():
    w = _kernel((3, 32, 8), dtype=jnp.bfloat16)
    stacked = Role("matmul", (1,), (2,), stacked=(0,))
    spec = QuantSpec(format=NF4(), granularity=PerGroup(8))
    la = _leaf(w, spec, role=stacked)
    assert la.dtype == jnp.bfloat16 and la.dequantize().dtype == jnp.bfloat16
    assert la.scale.shape == (3, 4, 8)
    for i in range(3):
        alone = _leaf(w[i], spec)
        np.testing.assert_array_equal(la[i].dequantize(), alone.dequantize())


# ---- Codebook --------------------------------------------------------------------------------


def _per_table(deq: np.ndarray, per_channel: bool) -> list[np.ndarray]:
    return [deq[:, j] for j in range(deq.shape[1])] if per_channel else [deq.ravel()]


def _sq_error(w, la) -> float:
    return float(np.sum((np.asarray(la.dequantize(), np.float64) - np.asarray(w)) ** 2))


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel()])
def test_codebook_tables_and_pruned_zeros(bits, granularity):
    w = np.array(_kernel((40, 6), seed=bits))
    w[np.random.default_rng(1).random(w.shape) < 0.3] = 0.0  # pruned
    w[:, 1] = 0.0  # a pruned channel
    la = _leaf(jnp.asarray(w), QuantSpec(format=Codebook(), bits=bits, granularity=granularity))
    per_channel = isinstance(granularity, PerChannel)
    assert la.scale is None and la.format == "Codebook"
    assert la.table.shape == ((1, 6, 2**bits) if per_channel else (1, 1, 2**bits))
    assert la.indices.dtype == index_dtype(bits)
    deq = np.asarray(la.dequantize())
    assert np.all(deq[w == 0] == 0)  # pruned zeros stay exactly zero
    for values in _per_table(deq, per_channel):
        assert len(np.unique(values[values != 0])) <= 2**bits
    # entry 0 of every table holding zeros is exactly 0.0; others are free
    tables = np.asarray(la.table).reshape(-1, 2**bits)
    assert np.all(tables[:, 0] == 0)
    # true packed size: indices at their container width, float32 tables
    container = {1: 2, 2: 2, 3: 4, 5: 8, 8: 8}[bits]
    assert la.nbytes == -(-w.size * container // 8) + tables.size * 4


def _ref_lloyd_linear(x: np.ndarray, k: int, iters: int) -> np.ndarray:
    """NumPy Lloyd k-means of one dense table (no zeros), linear init; the dequantized values."""
    x = np.asarray(x, np.float32)
    s = np.abs(x).max()
    xn = x * (np.float32(1) / s)
    c = (xn.min() * (1 - np.linspace(0, 1, k)) + xn.max() * np.linspace(0, 1, k)).astype(np.float32)
    for _ in range(iters):
        a = np.abs(xn[:, None] - c[None]).argmin(1)
        for j in range(k):
            if np.any(a == j):
                c[j] = xn[a == j].mean()
    a = np.abs(xn[:, None] - c[None]).argmin(1)
    return (c * s)[a]


def test_codebook_matches_a_numpy_lloyd_reference():
    w = _kernel((50, 4), seed=3)
    la = _leaf(w, QuantSpec(format=Codebook(init="linear", iters=8), bits=3))
    ref = np.stack([_ref_lloyd_linear(np.asarray(w)[:, j], 8, 8) for j in range(4)], axis=1)
    np.testing.assert_allclose(la.dequantize(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["linear", "density", "kmeans++"])
def test_kmeans_never_increases_the_error_of_its_init(init):
    w = np.array(_kernel((64, 5), seed=7))
    w[:8] = 0.0
    key = jax.random.key(3)
    for granularity in (PerTensor(), PerChannel()):
        spec = QuantSpec(format=Codebook(init=init, iters=15), bits=3, granularity=granularity)
        start = _leaf(w, dataclasses.replace(spec, format=Codebook(init=init, iters=0)), key=key)
        done = _leaf(w, spec, key=key)
        assert _sq_error(w, done) <= _sq_error(w, start) * (1 + 1e-6)
        assert _sq_error(w, done) < _sq_error(w, start)  # and it moved


def test_linear_and_density_are_deterministic_kmeanspp_follows_its_key():
    w = _kernel((48, 6), seed=11)
    for init in ("linear", "density"):
        spec = QuantSpec(format=Codebook(init=init), bits=3)
        a, b = _leaf(w, spec), _leaf(w, spec, key=jax.random.key(5))  # the key is unused
        np.testing.assert_array_equal(a.table, b.table)
        np.testing.assert_array_equal(a.indices, b.indices)
    spec = QuantSpec(format=Codebook(init="kmeans++", iters=0), bits=3)
    a = _leaf(w, spec, key=jax.random.key(1))
    again = _leaf(w, spec, key=jax.random.key(1))
    other = _leaf(w, spec, key=jax.random.key(2))
    np.testing.assert_array_equal(a.table, again.table)
    assert not np.array_equal(a.table, other.table)
    # raw uint32 keys work too
    _leaf(w, spec, key=jax.random.PRNGKey(0))
    # initial entries of k-means++ are weights of their channel (to the rounding of the
    # normalisation by the channel's abs-max)
    for j in range(6):
        gap = np.abs(np.asarray(a.table)[0, j][:, None] - np.asarray(w)[:, j][None]).min(1)
        assert gap.max() <= 1e-6


def test_density_init_takes_quantiles_of_the_nonzero_weights():
    w = jnp.asarray(np.array([[0.0], [1.0], [2.0], [3.0], [0.0], [4.0], [5.0], [6.0], [7.0]]))
    la = _leaf(w, QuantSpec(format=Codebook(init="density", iters=0), bits=2))
    # zeros present: entry 0 is 0.0, three entries at the quantiles 1/6, 1/2, 5/6 of the 7
    # non-zero weights (sorted positions floor(q * 7) = 1, 3, 5)
    nonzero = np.sort(np.asarray(w)[np.asarray(w) != 0])
    want = [0.0, *nonzero[np.floor(np.array([1, 3, 5]) / 6 * 7).astype(int)]]
    assert want == [0.0, 2.0, 4.0, 6.0]
    np.testing.assert_allclose(np.asarray(la.table).ravel(), want, rtol=1e-6)


# ---- FP8 -------------------------------------------------------------------------------------

FP8 = {"E4M3": (E4M3(), jnp.float8_e4m3fn, 448.0), "E5M2": (E5M2(), jnp.float8_e5m2, 57344.0)}


def _ref_float8(w: np.ndarray, fp8, fmax: float, group: int | None, per_channel: bool):
    """NumPy ``scale * float8(clip(w / scale))`` of a Dense ``(in, out)`` kernel, blocks as in
    :func:`_ref_nf4`: ``(scale, values, dequantized in float32)``."""
    x = np.asarray(w, np.float32)
    blocks, absmax = _ref_blocks(x, group, per_channel)
    scale = absmax * np.float32(1 / fmax)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    r = np.clip(blocks * (np.float32(1) / scale), -fmax, fmax).astype(np.float32)
    values = r.astype(fp8)
    return scale, values.reshape(x.shape), (values.astype(np.float32) * scale).reshape(x.shape)


@pytest.mark.parametrize("name", sorted(FP8))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    ("granularity", "group", "per_channel"),
    [(PerTensor(), None, False), (PerChannel(), None, True), (PerGroup(8), 8, True)],
)
def test_float8_is_scale_times_float8_of_w_over_scale(name, dtype, granularity, group, per_channel):
    fmt, fp8, fmax = FP8[name]
    w = np.array(_kernel((32, 6), seed=12), np.float32)
    w[0, 0] = 40.0  # an outlier sets its block's scale
    w[:, 3] = 0.0  # a pruned channel
    w = np.asarray(jnp.asarray(w).astype(dtype))
    fa = _leaf(jnp.asarray(w), QuantSpec(format=fmt, granularity=granularity))
    assert isinstance(fa, Float8Array) and fa.format == name and fa.bits == 8
    assert fa.values.dtype == fp8 and fa.dtype == dtype and fa.dequantize().dtype == dtype
    scale, values, deq = _ref_float8(w, fp8, fmax, group, per_channel)
    np.testing.assert_array_equal(fa.scale, scale.reshape(fa.scale.shape))
    np.testing.assert_array_equal(np.asarray(fa.values, np.float32), values.astype(np.float32))
    np.testing.assert_array_equal(fa.dequantize(), deq.astype(dtype))
    assert np.all(np.asarray(fa.dequantize())[:, 3] == 0)
    assert np.abs(np.asarray(fa.values, np.float32)).max() == fmax  # the block's abs-max
    assert fa.nbytes == w.size + fa.scale.size * 4


@pytest.mark.parametrize("name", sorted(FP8))
def test_float8_casts_saturate(name):
    fmt, fp8, fmax = FP8[name]
    # w * (1 / scale) rounds above fmax for some abs-max values: clipped, never Inf or NaN
    w = jnp.asarray(np.array([[3.0, -3.0, 1e-3], [7.0, 1e38, -1e38]], np.float32))
    fa = _leaf(w, QuantSpec(format=fmt, granularity=PerTensor()))
    values = np.asarray(fa.values, np.float32)
    assert np.isfinite(values).all() and np.abs(values).max() == fmax
    assert np.isfinite(np.asarray(fa.dequantize())).all()
    r = np.float32(fmax) * np.float32(1 + 2**-20)
    assert np.asarray(jnp.clip(r, -fmax, fmax).astype(fp8), np.float32) == fmax


# ---- one place for each: quantize, jit, rules, errors ----------------------------------------

SPECS = {
    "nf4": QuantSpec(format=NF4(), granularity=PerGroup(8)),
    "codebook": QuantSpec(format=Codebook(init="kmeans++", iters=5), bits=3),
    "e4m3": QuantSpec(format=E4M3(), granularity=PerGroup(8)),
    "e5m2": QuantSpec(format=E5M2(), granularity=PerTensor()),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_jit_equals_eager_and_does_not_recompile(name):
    w = _kernel((32, 8), seed=2)
    params = {"Dense_0": {"kernel": w, "bias": jnp.zeros(8)}}
    key = jax.random.key(0)
    eager = quantize(params, SPECS[name], key=key)
    traces = []

    def run(p, k):
        traces.append(1)
        return quantize(p, SPECS[name], key=k)

    jitted = jax.jit(run)
    got = jitted(params, key)
    jitted(params, key)
    assert len(traces) == 1
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    assert type(got["Dense_0"]["kernel"]) is (Float8Array if name[0] == "e" else LookupArray)


def test_rules_mix_formats_and_where_selects(strict):
    params = {
        "Dense_0": {"kernel": _kernel((16, 8)), "bias": jnp.zeros(8)},
        "Dense_1": {"kernel": _kernel((8, 8), 1)},
        "Dense_2": {"kernel": _kernel((8, 4), 2)},
    }
    rules = [
        ("Dense_0/kernel", QuantSpec(format=NF4())),
        ("Dense_1/kernel", QuantSpec(format=Codebook(), bits=2)),
        (".*", QuantSpec(bits=4)),
    ]
    with strict():
        q = quantize(params, rules)
    assert type(q["Dense_0"]["kernel"]) is LookupArray and q["Dense_0"]["kernel"].format == "NF4"
    assert q["Dense_1"]["kernel"].format == "Codebook"
    assert type(q["Dense_2"]["kernel"]) is QArray
    q = quantize(params, QuantSpec(format=NF4()), where="Dense_1/kernel")
    assert type(q["Dense_1"]["kernel"]) is LookupArray and not is_compressed(q["Dense_0"]["kernel"])


def test_errors_name_the_leaf_and_the_fix():
    params = {"Dense_0": {"kernel": _kernel((8, 4))}}
    with pytest.raises(ValueError, match=r"Dense_0/kernel: .*kmeans\+\+.* needs a random key"):
        quantize(params, QuantSpec(format=Codebook(init="kmeans++")))
    with pytest.raises(ValueError, match=r"Dense_0/kernel: .*kmeans\+\+.*fake_quantize\(\.\.\."):
        fake_quantize(params, QuantSpec(format=Codebook(init="kmeans++")))
    with pytest.raises(ValueError, match="Dense_0/kernel: calibrate supports QuantSpec"):
        calibrate(params, QuantSpec(format=NF4()))
    scales = calibrate(params, QuantSpec(bits=4))
    with pytest.raises(ValueError, match=r"scales= \(frozen calibration\) supports"):
        quantize(params, QuantSpec(format=NF4()), scales=scales)
    with pytest.raises(ValueError, match="Dense_0/kernel: GPTQ supports QuantSpec"):
        gptq_layer(
            params["Dense_0"]["kernel"], jnp.eye(8), QuantSpec(format=NF4()), path="Dense_0/kernel"
        )
    with pytest.raises(ValueError, match="AWQ supports"):
        awq_layer(params["Dense_0"]["kernel"], jnp.eye(8), QuantSpec(format=Codebook()))
    # gptq over a model takes the formats (tests/test_gptq_formats.py); gptq_layer does not
    q = gptq(
        lambda p, x: x @ p["Dense_0"]["kernel"],
        params,
        [jnp.ones((2, 8))],
        QuantSpec(format=NF4()),
        quiet=True,
    )
    assert isinstance(q["Dense_0"]["kernel"], LookupArray)
    bad = {"Dense_0": {"kernel": _kernel((8, 4)).at[1, 1].set(jnp.nan)}}
    for spec in SPECS.values():
        with pytest.raises(ValueError, match="Dense_0/kernel"):
            quantize(bad, spec, key=jax.random.key(0))
        flagged = jax.jit(lambda p, s=spec: quantize(p, s, key=jax.random.key(0)))(bad)
        assert bool(nonfinite(flagged))
        deq = np.asarray(flagged["Dense_0"]["kernel"].dequantize())
        assert np.isnan(deq[:, 1]).all() and np.isnan(deq).any()
    assert not bool(nonfinite(quantize(params, SPECS["nf4"])))


def test_constructor_checks():
    idx = jnp.zeros((2, 3), jnp.uint4)
    table = jnp.zeros((1, 1, 16), jnp.float32)
    with pytest.raises(TypeError, match="stored as uint4"):
        LookupArray(idx.astype(jnp.uint8), table, bits=4, dtype=jnp.float32, format="NF4")
    with pytest.raises(ValueError, match=r"table must be float32 of shape \(\*blocks, 16\)"):
        LookupArray(idx, jnp.zeros((1, 1, 8)), bits=4, dtype=jnp.float32, format="NF4")
    with pytest.raises(ValueError, match="format must be one of"):
        LookupArray(idx, table, bits=4, dtype=jnp.float32, format="nf4")
    with pytest.raises(ValueError, match="scale shape"):
        LookupArray(idx, table, jnp.ones((4, 3)), bits=4, dtype=jnp.float32, format="NF4")
    with pytest.raises(TypeError, match="float dtype"):
        LookupArray(idx, table, bits=4, dtype=jnp.int8, format="NF4")


# ---- dequantize, QAT, checkpoints, report, export, jc.compressed -----------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fake_quantize_forward_is_dequantize_and_gradient_passes_through(name):
    params = {"kernel": _kernel((16, 8), seed=4)}
    key = jax.random.key(9)
    spec = SPECS[name]
    fq = fake_quantize(params, spec, key=key)["kernel"]
    np.testing.assert_array_equal(fq, dequantize(quantize(params, spec, key=key))["kernel"])
    target = _kernel((16, 8), seed=5)

    def loss_of(w):
        return jnp.sum(jnp.sin(w * target) ** 2)

    g = jax.jit(jax.grad(lambda p: loss_of(fake_quantize(p, spec, key=key)["kernel"])))(params)
    np.testing.assert_allclose(g["kernel"], jax.grad(loss_of)(fq), rtol=1e-6, atol=1e-7)


def mlp(p, x):
    return jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) @ p["Dense_1"]["kernel"]


@pytest.fixture(scope="module")
def lookup_model():
    params = {
        "Dense_0": {"kernel": _kernel((16, 32)), "bias": jnp.zeros(32)},
        "Dense_1": {"kernel": _kernel((32, 8), 1).at[:4].set(0.0)},
    }
    rules = [("Dense_0/kernel", SPECS["nf4"]), ("Dense_1/kernel", QuantSpec(format=Codebook()))]
    return quantize(params, rules), _kernel((4, 16), 2)


def test_compressed_equals_the_dequantized_function_and_explain_names_the_lookup(
    lookup_model, strict
):
    tree, x = lookup_model
    run = jc.compressed(mlp)
    with strict():
        out = run(tree, x)
    np.testing.assert_allclose(out, mlp(dequantize(tree), x), rtol=1e-6, atol=1e-6)
    xb = x.astype(jnp.bfloat16)  # mixed dtypes: promoted as the float function promotes them
    want = mlp(dequantize(tree), xb)
    outb = run(tree, xb)
    assert outb.dtype == want.dtype
    np.testing.assert_allclose(outb, want, rtol=1e-6, atol=1e-6)
    explained = {e.path: e for e in jc.explain(run, tree, x)}
    assert explained["Dense_0/kernel"].formulation == "nf4_lookup"
    assert explained["Dense_1/kernel"].formulation == "codebook_lookup"
    assert all(e.intended == "float fallback" and e.ok for e in explained.values())
    # a transposed use (x @ W.T) and the weight on the left go through the same lookup
    w = tree["Dense_1"]["kernel"]
    y = _kernel((3, 8), 5)
    got = jc.compressed(lambda p, y: y @ p["w"].T)({"w": w}, y)
    np.testing.assert_allclose(got, y @ w.dequantize().T, rtol=1e-6, atol=1e-6)
    got = jc.compressed(lambda p, y: p["w"] @ y.T)({"w": w}, y)
    np.testing.assert_allclose(got, w.dequantize() @ y.T, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def float8_model():
    params = {
        "Dense_0": {"kernel": _kernel((16, 32)), "bias": jnp.zeros(32)},
        "Dense_1": {"kernel": _kernel((32, 8), 1).astype(jnp.bfloat16)},
    }
    rules = [("Dense_0/kernel", SPECS["e4m3"]), ("Dense_1/kernel", SPECS["e5m2"])]
    return quantize(params, rules), _kernel((4, 16), 2)


def test_float8_model_compressed_checkpoint_report_export(float8_model, tmp_path):
    tree, x = float8_model
    run = jc.compressed(mlp)
    out = run(tree, x)
    np.testing.assert_allclose(out, mlp(dequantize(tree), x), rtol=1e-6, atol=1e-6)
    explained = {e.path: e.formulation for e in jc.explain(run, tree, x)}
    assert explained == {"Dense_0/kernel": "e4m3_dequantize", "Dense_1/kernel": "e5m2_dequantize"}
    checkpoint.save(tmp_path / "c", tree)
    back = checkpoint.load(tmp_path / "c")
    for path in ("Dense_0", "Dense_1"):
        a, b = tree[path]["kernel"], back[path]["kernel"]
        assert type(b) is Float8Array and b.format == a.format and b.dtype == a.dtype
        assert b.values.dtype == a.values.dtype
        np.testing.assert_array_equal(b.dequantize(), a.dequantize())
    rows = {r.path: r for r in jc.report.summarize(tree).leaves}
    assert rows["Dense_0/kernel"].kind == "Float8Array" and rows["Dense_0/kernel"].bits == 8.0
    assert rows["Dense_0/kernel"].memory_bytes == 16 * 32 + 2 * 32 * 4
    exported = jc.load_exported(jc.export(mlp, tree, x))
    np.testing.assert_allclose(exported.call(back, x), out, rtol=1e-6)


def test_checkpoint_report_and_export(lookup_model, tmp_path):
    tree, x = lookup_model
    checkpoint.save(tmp_path / "c", tree)
    back = checkpoint.load(tmp_path / "c")
    for path in ("Dense_0", "Dense_1"):
        a, b = tree[path]["kernel"], back[path]["kernel"]
        assert type(b) is LookupArray and b.format == a.format and b.bits == a.bits
        assert b.indices.dtype == a.indices.dtype == jnp.uint4
        for name in LookupArray.array_fields:
            if getattr(a, name) is None:
                assert getattr(b, name) is None
            else:
                np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
    rows = {r.path: r for r in jc.report.summarize(tree).leaves}
    r0, r1 = rows["Dense_0/kernel"], rows["Dense_1/kernel"]
    assert r0.kind == r1.kind == "LookupArray" and r0.bits == r1.bits == 4.0
    assert r0.memory_bytes == 16 * 32 // 2 + 16 * 4 + 2 * 32 * 4  # indices, levels, scales
    assert r1.memory_bytes == 32 * 8 // 2 + 8 * 16 * 4  # indices, one table per channel
    assert r1.sparsity >= 4 / 32  # the pruned rows stay zero
    assert r0.encoded_bytes <= r0.memory_bytes
    exported = jc.load_exported(jc.export(mlp, tree, x))
    np.testing.assert_allclose(exported.call(back, x), jc.compressed(mlp)(tree, x), rtol=1e-6)


# ---- properties (HYPOTHESIS_PROFILE=deep for >= 1000 each) -----------------------------------

# (shape, role): bucketed shapes (each is an XLA compile): odd sizes, conv, attention, stacked.
CASES = [
    ((24, 7), Role("matmul", (0,), (1,))),
    ((8, 12), Role("matmul", (1,), (0,))),
    ((3, 3, 4, 6), Role("conv", (0, 1, 2), (3,))),
    ((6, 2, 4), Role("matmul", (0,), (1, 2))),
    ((2, 16, 5), Role("matmul", (1,), (2,), stacked=(0,))),
]
MODES = ["normal", "pruned", "zeros", "tiny", "huge"]


def _values(shape, dtype, mode, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4.0, size=shape)
    if mode == "pruned":
        w[rng.random(shape) < 0.5] = 0.0
    elif mode == "zeros":
        w = np.zeros(shape)
    elif mode == "tiny":
        w = w * 1e-30
    elif mode == "huge":
        w = w * 1e36
    return np.asarray(jnp.asarray(w, jnp.float32).astype(dtype))


def _expand(block: np.ndarray, shape) -> np.ndarray:
    """A blocked per-axis array (size 1, the axis' size or a divisor) repeated to ``shape``."""
    for axis, (b, n) in enumerate(zip(block.shape, shape)):
        if b not in (1, n):
            block = np.repeat(block, n // b, axis=axis)
    return np.broadcast_to(block, shape)


@st.composite
def lookup_problems(draw):
    shape, role = draw(st.sampled_from(CASES))
    kind = draw(st.sampled_from(["nf4", "codebook", "e4m3", "e5m2"]))
    if kind != "codebook":
        group = shape[role.group_axis]
        sizes = [d for d in (2, 4, 8) if group % d == 0]
        grans = [PerTensor(), PerChannel(), *(PerGroup(d) for d in sizes)]
        fmt = {"nf4": NF4(), "e4m3": E4M3(), "e5m2": E5M2()}[kind]
        spec = QuantSpec(format=fmt, granularity=draw(st.sampled_from(grans)))
    else:
        init = draw(st.sampled_from(["linear", "density", "kmeans++"]))
        spec = QuantSpec(
            format=Codebook(init=init, iters=4),
            bits=draw(st.integers(1, 8)),
            granularity=draw(st.sampled_from([PerTensor(), PerChannel()])),
        )
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    w = _values(shape, dtype, draw(st.sampled_from(MODES)), draw(st.integers(0, 2**16)))
    return w, role, spec, draw(st.integers(0, 2**16))


@given(lookup_problems())
def test_property_format_invariants(problem):
    w, role, spec, seed = problem
    la = _leaf(jnp.asarray(w), spec, role=role, key=jax.random.key(seed))
    deq = np.asarray(la.dequantize())
    assert la.shape == w.shape and deq.dtype == w.dtype and np.isfinite(deq).all()
    assert np.all(deq[np.asarray(w, np.float32) == 0] == 0)  # pruned zeros stay exactly zero
    if isinstance(la, Float8Array):
        _, fp8, fmax = FP8[la.format]
        scale = _expand(np.asarray(la.scale), w.shape)
        r = np.clip(np.asarray(w, np.float32) * (np.float32(1) / scale), -fmax, fmax)
        values = np.asarray(la.values, np.float32)
        np.testing.assert_array_equal(values, r.astype(np.float32).astype(fp8).astype(np.float32))
        np.testing.assert_array_equal(deq, (values * scale).astype(w.dtype))
        assert np.abs(values).max() == (fmax if np.any(np.asarray(w) != 0) else 0.0)
        return
    assert la.indices.dtype == index_dtype(spec.bits)
    idx = np.asarray(la.indices, np.int64)
    assert idx.max() < 2**spec.bits
    table = np.asarray(la.table)
    values = np.take_along_axis(_expand(table, (*w.shape, table.shape[-1])), idx[..., None], -1)
    values = values[..., 0]
    if la.format == "NF4":
        scale = _expand(np.asarray(la.scale), w.shape)
        np.testing.assert_array_equal(deq, (values * scale).astype(w.dtype))
        assert set(np.unique(values)) <= set(NF4_LEVELS.tolist())
        # the nearest level of w / scale (to a float32 ulp at a midpoint)
        r = np.asarray(w, np.float32) * (np.float32(1) / scale)
        best = np.abs(r[..., None] - NF4_LEVELS).min(-1)
        np.testing.assert_allclose(np.abs(r - values), best, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(deq, values.astype(w.dtype))
        flat_tables = table.reshape(-1, table.shape[-1])
        blocks = _expand(np.arange(len(flat_tables)).reshape(table.shape[:-1]), w.shape)
        for t in range(len(flat_tables)):
            mine = values[blocks == t]
            assert len(np.unique(mine[mine != 0])) <= 2**spec.bits
            if np.any(np.asarray(w, np.float32)[blocks == t] == 0):
                assert flat_tables[t, 0] == 0.0  # entry 0 reserved for the zeros
        # Lloyd never increases the error of its initial table
        start = _leaf(
            jnp.asarray(w),
            dataclasses.replace(spec, format=dataclasses.replace(spec.format, iters=0)),
            role=role,
            key=jax.random.key(seed),
        )
        w64 = np.asarray(w, np.float64)
        err = np.sum((np.asarray(la.lookup(), np.float64) - w64) ** 2)
        err0 = np.sum((np.asarray(start.lookup(), np.float64) - w64) ** 2)
        assert err <= err0 * (1 + 1e-5) + 1e-300


def test_partition_trains_codebook_tables_with_the_indices_fixed():
    w = _kernel((16, 4), seed=8)
    la = _leaf(w, QuantSpec(format=Codebook(), bits=2))
    trainable, rest = jc.tree.partition({"k": la})
    assert trainable["k"].indices is None and rest["k"].table is None
    g = jax.grad(lambda t: jnp.sum(jc.tree.combine(t, rest)["k"].dequantize() * w))(trainable)
    # d/dtable[c, e] of sum(table[c, idx] * w) = sum of w over the weights using entry e
    idx = np.asarray(la.indices, np.int64)
    want = np.zeros((4, 4), np.float32)
    for (i, c), e in np.ndenumerate(idx):
        want[c, e] += np.asarray(w)[i, c]
    np.testing.assert_allclose(g["k"].table[0], want, rtol=1e-5, atol=1e-6)
    nf4 = _leaf(w, QuantSpec(format=NF4()))
    trainable, _ = jc.tree.partition({"k": nf4}, scales=True)
    assert trainable["k"].scale.shape == (1, 4)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_embedding_gather_takes_only_its_rows(name):
    table = _kernel((12, 8), seed=13).at[3].set(0.0)
    spec = dataclasses.replace(SPECS[name], granularity=PerChannel())  # per row of the table
    q = quantize({"embedding": table}, spec, key=jax.random.key(0))
    leaf = q["embedding"]
    ids = jnp.array([[0, 3, 11], [5, 5, 2]])
    want = jnp.take(leaf.dequantize(), ids, axis=0)
    np.testing.assert_array_equal(leaf.take(ids), want)
    np.testing.assert_array_equal(
        leaf.take(jnp.array([1, 7]), axis=1), leaf.dequantize()[:, [1, 7]]
    )
    run = jc.compressed(lambda p, ids: p["embedding"][ids])
    np.testing.assert_array_equal(run(q, ids), want)
    assert [e.formulation for e in jc.explain(run, q, ids)] == ["take"]
