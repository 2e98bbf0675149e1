"""jc.tree.partition / combine: training the float children of compressed leaves (scales,
low-rank factors) with jax.grad and optax, integer values fixed, through jc.compressed."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jcompress as jc
from jcompress.quantization import (
    E4M3,
    NF4,
    Codebook,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    dequantize,
    quantize,
)
from jcompress.structure import low_rank

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.standard_normal((256, 64), np.float32) / 16)
X = jnp.asarray(RNG.standard_normal((4, 256), np.float32))
SPECS = {
    "int8": QuantSpec(bits=8),
    "int4-g64": QuantSpec(bits=4, granularity=PerGroup(64)),
    "int4-asym": QuantSpec(bits=4, symmetric=False),
}


def _params():
    return {"Dense_0": {"kernel": W, "bias": jnp.zeros(64)}, "step": jnp.asarray(3)}


def fn(p, x):
    return x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


def _same(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("scales", [False, True])
def test_partition_splits_by_declared_fields_and_combine_restores(scales):
    q = quantize(_params(), SPECS["int4-asym"])
    trainable, rest = jc.tree.partition(q, scales=scales)
    qa_t, qa_r = trainable["Dense_0"]["kernel"], rest["Dense_0"]["kernel"]
    assert qa_t is None if not scales else qa_t.scale is not None
    if scales:  # integers stay in rest: values and the zero point
        assert qa_t.values is None and qa_t.zero_point is None and qa_r.scale is None
    assert trainable["Dense_0"]["bias"] is not None and rest["Dense_0"]["bias"] is None
    assert trainable["step"] is None and rest["step"] is not None  # an integer leaf
    _same(jc.tree.combine(trainable, rest), q)
    frozen, everything = jc.tree.partition(q, floats=False)
    assert jax.tree.leaves(frozen) == []
    _same(jc.tree.combine(frozen, everything), q)


@pytest.mark.parametrize("spec", list(SPECS), ids=str)
@pytest.mark.parametrize("formulation", ["dequantize", "chunked", "limbs"])
def test_scale_gradient_through_compressed_equals_dequantized(spec, formulation):
    q = quantize(_params(), SPECS[spec])
    trainable, rest = jc.tree.partition(q, scales=True)
    fast = jc.compressed(fn, formulation=formulation)
    (record,) = jc.explain(fast, q, X)
    assert record.formulation == formulation

    def loss(t, x, f):
        return jnp.sum(jnp.sin(f(jc.tree.combine(t, rest), x)))

    def reference(p, x):
        return fn(dequantize(p), x)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(trainable, X, fast)
    eager = jax.grad(loss, argnums=(0, 1))(trainable, X, fast)
    want = jax.grad(loss, argnums=(0, 1))(trainable, X, reference)
    g, w = got[0]["Dense_0"]["kernel"].scale, want[0]["Dense_0"]["kernel"].scale
    assert float(jnp.max(jnp.abs(w))) > 1.0  # a real gradient (was zero on the integer paths)
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(w))))
    np.testing.assert_allclose(eager[0]["Dense_0"]["kernel"].scale, g, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got[0]["Dense_0"]["bias"], want[0]["Dense_0"]["bias"], atol=1e-5)


def _dots(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _dots(sub)
    return count


def test_the_scale_term_costs_nothing_unless_the_scale_is_differentiated():
    q = quantize(_params(), SPECS["int8"])
    trainable, rest = jc.tree.partition(q, scales=True)
    fast = jc.compressed(fn, formulation="limbs")

    def loss(t, x):
        return jnp.sum(jnp.sin(fast(jc.tree.combine(t, rest), x)))

    only_x = _dots(jax.make_jaxpr(jax.grad(loss, argnums=1))(trainable, X).jaxpr)
    both = _dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(trainable, X).jaxpr)
    assert both == only_x + 1  # the scale's cotangent; none when only x is differentiated


def test_optax_fine_tunes_scales_with_values_fixed():
    q = quantize(_params(), SPECS["int4-g64"])
    target = fn(_params(), X)
    trainable, rest = jc.tree.partition(q, scales=True)
    fast = jc.compressed(fn, formulation="limbs")

    def loss(t):
        return jnp.mean((fast(jc.tree.combine(t, rest), X) - target) ** 2)

    opt = optax.adam(1e-3)
    state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        value, g = jax.value_and_grad(loss)(t)
        updates, s = opt.update(g, s, t)
        return optax.apply_updates(t, updates), s, value

    first = float(loss(trainable))
    for _ in range(30):
        trainable, state, _ = step(trainable, state)
    tuned = jc.tree.combine(trainable, rest)
    assert float(loss(trainable)) < 0.7 * first
    assert np.array_equal(tuned["Dense_0"]["kernel"].values, q["Dense_0"]["kernel"].values)
    assert tuned["Dense_0"]["kernel"].bits == 4


def test_low_rank_factors_are_trainable_and_get_their_gradients():
    params = {"Dense_0": {"kernel": W, "bias": jnp.zeros(64)}}
    lr = low_rank(params, rank=8)
    trainable, rest = jc.tree.partition(lr, floats=False)
    leaf = trainable["Dense_0"]["kernel"]
    assert (
        leaf.a.shape == (256, 8)
        and leaf.b.shape == (8, 64)
        and trainable["Dense_0"]["bias"] is None
    )

    def loss(t, f):
        return jnp.sum(jnp.sin(f(jc.tree.combine(t, rest), X)))

    got = jax.grad(loss)(trainable, jc.compressed(fn))["Dense_0"]["kernel"]
    want = jax.grad(loss)(trainable, lambda p, x: fn(dequantize(p), x))["Dense_0"]["kernel"]
    np.testing.assert_allclose(got.a, want.a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.b, want.b, rtol=1e-4, atol=1e-5)


def test_nnx_state_round_trip():
    model = nnx.Linear(256, 64, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    q = quantize(state, SPECS["int8"])
    trainable, rest = jc.tree.partition(q, scales=True)
    _same(jc.tree.combine(trainable, rest), q)

    def loss(t):
        return jnp.sum(
            jc.compressed(lambda s, x: nnx.merge(graphdef, s)(x))(jc.tree.combine(t, rest), X)
        )

    grads = jax.grad(loss)(trainable)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_errors():
    q = quantize(_params(), SPECS["int8"])
    trainable, _ = jc.tree.partition(q, scales=True)
    with pytest.raises(ValueError, match="in both halves"):
        jc.tree.combine(trainable, q)
    with pytest.raises(ValueError, match="same structure"):
        jc.tree.combine(trainable, {"other": 1})
    with pytest.raises(TypeError, match="must be bools"):
        jc.tree.partition(q, scales="yes")
    with pytest.raises(ValueError, match="False, True or 'scales'"):
        jc.tree.field(trainable="tables")
    with pytest.raises(ValueError, match="for array children"):
        jc.tree.field(static=True, trainable=True)


# ------------------------------------------------------------------------------------------------
# lookup formats: codebook tables are trained, NF4 levels never
# ------------------------------------------------------------------------------------------------


def _pruned_w():
    w = np.asarray(W).copy()
    w[np.abs(w) < np.quantile(np.abs(w), 0.6)] = 0.0  # 60% exact zeros
    return jnp.asarray(w)


CODEBOOK = QuantSpec(bits=4, format=Codebook(init="linear", iters=10), granularity=PerTensor())


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel()], ids=["tensor", "channel"])
def test_centroid_gradient_is_the_per_cluster_sum_of_weight_gradients(granularity):
    spec = dataclasses.replace(CODEBOOK, granularity=granularity)
    params = {"Dense_0": {"kernel": _pruned_w(), "bias": jnp.zeros(64)}}
    q = quantize(params, spec)
    trainable, rest = jc.tree.partition(q, floats=False)
    leaf = q["Dense_0"]["kernel"]
    assert trainable["Dense_0"]["kernel"].table.shape == leaf.table.shape

    def loss(t, f):
        return jnp.sum(jnp.sin(f(jc.tree.combine(t, rest), X)))

    got = jax.jit(jax.grad(loss), static_argnums=1)(trainable, jc.compressed(fn))
    eager = jax.grad(loss)(trainable, jc.compressed(fn))
    table_grad = np.asarray(got["Dense_0"]["kernel"].table)
    # the dense gradient of the same loss at the dequantized weight, summed per cluster
    dense = dequantize(q)
    g_w = np.asarray(
        jax.grad(lambda w: jnp.sum(jnp.sin(X @ w + dense["Dense_0"]["bias"])))(
            dense["Dense_0"]["kernel"]
        )
    )
    idx = np.asarray(leaf.indices.astype(jnp.int32))
    table = np.asarray(leaf.table)
    want = np.zeros_like(table)
    for i in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            t = (0 if table.shape[0] == 1 else i, 0 if table.shape[1] == 1 else j)
            want[(*t, idx[i, j])] += g_w[i, j]
    zero = table[..., 0] == 0  # the reserved entry of pruned weights: never moves
    want[..., 0] = np.where(zero, 0.0, want[..., 0])
    np.testing.assert_allclose(table_grad, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eager["Dense_0"]["kernel"].table, table_grad, rtol=1e-5, atol=1e-5)


def test_centroid_fine_tuning_keeps_zeros_and_the_table_size():
    params = {"Dense_0": {"kernel": _pruned_w(), "bias": jnp.zeros(64)}}
    target = fn({"Dense_0": {"kernel": W, "bias": jnp.zeros(64)}}, X)
    q = quantize(params, CODEBOOK)
    trainable, rest = jc.tree.partition(q)
    apply = jc.compressed(fn)

    def loss(t):
        return jnp.mean((apply(jc.tree.combine(t, rest), X) - target) ** 2)

    opt = optax.adamw(1e-2, weight_decay=1e-2)  # decay would move a zero entry if it had one
    state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        g = jax.grad(loss)(t)
        updates, s = opt.update(g, s, t)
        return optax.apply_updates(t, updates), s

    first = float(loss(trainable))
    for _ in range(20):
        trainable, state = step(trainable, state)
    tuned = jc.tree.combine(trainable, rest)
    w = np.asarray(dequantize(tuned)["Dense_0"]["kernel"])
    assert float(loss(trainable)) < first
    np.testing.assert_array_equal(w == 0, np.asarray(params["Dense_0"]["kernel"]) == 0)
    assert len(np.unique(w)) <= 2**4
    assert np.array_equal(tuned["Dense_0"]["kernel"].indices, q["Dense_0"]["kernel"].indices)


def test_nf4_levels_are_never_trained_its_scales_when_asked():
    params = {"Dense_0": {"kernel": W, "bias": jnp.zeros(64)}}
    q = quantize(params, QuantSpec(format=NF4(), granularity=PerGroup(64)))
    frozen, _ = jc.tree.partition(q, floats=False)
    assert frozen["Dense_0"]["kernel"] is None  # the 16 levels are the format
    trainable, rest = jc.tree.partition(q, scales=True, floats=False)
    leaf = trainable["Dense_0"]["kernel"]
    assert leaf.table is None and leaf.indices is None and leaf.scale is not None

    def loss(t, f):
        return jnp.sum(jnp.sin(f(jc.tree.combine(t, rest), X)))

    got = jax.grad(loss)(trainable, jc.compressed(fn))["Dense_0"]["kernel"].scale
    want = jax.grad(loss)(trainable, lambda p, x: fn(dequantize(p), x))["Dense_0"]["kernel"].scale
    assert float(jnp.max(jnp.abs(want))) > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_scan_over_stacked_codebook_layers():
    layers = jnp.stack([_pruned_w()[:64, :64] * (i + 1) for i in range(3)])  # (3, 64, 64)
    params = {"kernel": layers}
    roles = {"kernel": jc.Role("matmul", contracting=(1,), output=(2,), stacked=(0,))}
    q = quantize(params, CODEBOOK, roles=roles)
    assert q["kernel"].table.shape[0] == 3  # one table per layer
    trainable, rest = jc.tree.partition(q, floats=False)
    x = X[:, :64]

    def run(t):
        def body(h, leaf):
            return jnp.tanh(h @ leaf.dequantize()), None

        h, _ = jax.lax.scan(body, x, jc.tree.combine(t, rest)["kernel"])
        return jnp.sum(h)

    def run_unrolled(t):
        k = jc.tree.combine(t, rest)["kernel"]
        h = x
        for i in range(3):
            h = jnp.tanh(h @ k[i].dequantize())
        return jnp.sum(h)

    got = jax.jit(jax.grad(run))(trainable)["kernel"].table
    want = jax.grad(run_unrolled)(trainable)["kernel"].table
    assert float(jnp.max(jnp.abs(want))) > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# one leaf of each number format with a trainable table or scales
FORMAT_SPECS = pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(format=NF4(), granularity=PerGroup(16)),
        QuantSpec(bits=3, format=Codebook(init="density", iters=5), granularity=PerChannel()),
        QuantSpec(format=E4M3()),
    ],
    ids=["nf4", "codebook", "e4m3"],
)


@FORMAT_SPECS
def test_sharded_formats_stay_sharded_through_quantize_partition_and_grad(devices, spec):
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    sharding = NamedSharding(mesh, P(None, "x"))  # output channels across the 8 devices
    w = jax.device_put(_pruned_w(), sharding)
    quant = jax.jit(lambda p: quantize(p, spec))
    q = quant({"kernel": w})
    leaf = q["kernel"]
    for name in jc.tree.fields(leaf):
        child = getattr(leaf, name.name) if not name.static else None
        if child is not None and child.shape[-1] == 64:  # per output channel: split, no gather
            assert child.sharding.is_equivalent_to(sharding, child.ndim), (name, child.sharding)
    assert "all-gather" not in quant.lower({"kernel": w}).compile().as_text()
    single = quantize({"kernel": jnp.asarray(np.asarray(w))}, spec)["kernel"]
    np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(single.dequantize()))
    trainable, rest = jc.tree.partition(q, scales=True, floats=False)
    x = jax.device_put(X, NamedSharding(mesh, P()))

    def loss(t):
        return jnp.sum(
            jnp.sin(jc.compressed(lambda p, x: x @ p["kernel"])(jc.tree.combine(t, rest), x))
        )

    grads = jax.jit(jax.grad(loss))(trainable)
    for g in jax.tree.leaves(grads):
        if g.shape[-1] == 64:
            assert g.sharding.is_equivalent_to(sharding, g.ndim), g.sharding


@FORMAT_SPECS
def test_vmap_and_scan_over_stacked_format_layers(spec):
    layers = jnp.stack([_pruned_w()[:64, :64] * (i + 1) for i in range(3)])  # (3, 64, 64)
    roles = {"kernel": jc.Role("matmul", contracting=(1,), output=(2,), stacked=(0,))}
    q = quantize({"kernel": layers}, spec, roles=roles)["kernel"]
    xs = jnp.stack([X[:, :64] * (i + 1) for i in range(3)])  # (3, 4, 64)
    matmul = jc.compressed(lambda w, x: x @ w)
    got = jax.jit(jax.vmap(matmul))(q, xs)
    want = np.stack([np.asarray(xs[i]) @ np.asarray(q[i].dequantize()) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def body(h, leaf):
        return jnp.tanh(matmul(leaf, h)), None

    h, _ = jax.lax.scan(body, X[:, :64], q)
    ref = X[:, :64]
    for i in range(3):
        ref = jnp.tanh(ref @ q[i].dequantize())
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# properties (hypothesis: bucketed shapes, every leaf kind, both flags)
# ------------------------------------------------------------------------------------------------

LEAF_SPECS = [
    QuantSpec(bits=4),
    QuantSpec(bits=3, symmetric=False, granularity=PerGroup(8)),
    QuantSpec(format=NF4(), granularity=PerGroup(8)),
    QuantSpec(bits=2, format=Codebook(init="linear", iters=2)),
    QuantSpec(format=E4M3(), granularity=PerTensor()),
]


@st.composite
def trees(draw):
    shape = draw(st.sampled_from([(16, 8), (32, 16), (8, 24)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < draw(st.sampled_from([0.0, 0.5, 0.9]))] = 0.0
    spec = draw(st.sampled_from(LEAF_SPECS))
    q = quantize({"a": {"kernel": jnp.asarray(w)}}, spec)
    tree = {
        **q,
        "b": {"kernel": jnp.asarray(w[:, :4]), "bias": jnp.zeros(4, jnp.bfloat16)},
        "count": jnp.arange(3),
        "none": None,
    }
    return tree, draw(st.booleans()), draw(st.booleans())


@given(trees())
def test_property_partition_combine_round_trip(problem):
    tree, scales, floats = problem
    trainable, rest = jc.tree.partition(tree, scales=scales, floats=floats)
    _same(jc.tree.combine(trainable, rest), tree)
    # the halves are disjoint: every array is in exactly one of them, integers never trainable
    n_train = len(jax.tree.leaves(trainable))
    n_rest = len(jax.tree.leaves(rest))
    assert n_train + n_rest == len(jax.tree.leaves(tree))
    assert all(jnp.issubdtype(x.dtype, jnp.inexact) for x in jax.tree.leaves(trainable))
    leaf = tree["a"]["kernel"]
    names = set(leaf.trainable_fields(scales=scales))
    part = trainable["a"]["kernel"]
    for f in jc.tree.fields(leaf):
        if f.static or getattr(leaf, f.name) is None:
            continue
        held = part is not None and getattr(part, f.name) is not None
        assert held == (f.name in names), (f.name, names)
    # a gradient step over the trainable half leaves the rest bit-identical
    moved = jax.tree.map(lambda x: x + 1, trainable)
    again = jc.tree.combine(moved, rest)
    _same(jc.tree.partition(again, scales=scales, floats=floats)[1], rest)
