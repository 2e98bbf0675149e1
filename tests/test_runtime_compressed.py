"""compressed / explain / the QArray matmul formulations: equal to the dequantized model."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from test_runtime_roles import Attention, Stack, shard_mapped

from jcompress.demo import CNN, MLP
from jcompress.quantization import _dispatch, _kernels
from jcompress.quantization._qarray import QArray
from jcompress.runtime import compressed, explain, roles
from jcompress.runtime._explain import FLOAT_FALLBACK, GATHER, INTEGER_DOT
from jcompress.tree import Role, is_compressed, map_with_paths


def _quant(w, role: Role, bits=8, group=None, asym=False):
    """A reference RTN quantizer (NumPy): per output channel, optionally per group."""
    dtype = w.dtype if isinstance(w, jax.Array) else np.float32
    w = np.asarray(w, np.float32)
    qmax = 2 ** (bits - 1) - 1
    contracting = role.contracting
    ga = contracting[-1]
    shape = list(w.shape)
    if group is not None:
        shape[ga : ga + 1] = [w.shape[ga] // group, group]
    blocked = w.reshape(shape)
    red = tuple(a + (group is not None and a > ga) for a in contracting)
    if group is not None:
        red = tuple(a if a != ga else ga + 1 for a in red)
    if asym:
        lo = np.minimum(blocked.min(axis=red, keepdims=True), 0)
        hi = np.maximum(blocked.max(axis=red, keepdims=True), 0)
        s = (hi - lo) / (2 * qmax + 1)
        s = np.where(s == 0, 1, s)
        zp = np.clip(np.round(-lo / s) - qmax - 1, -qmax - 1, qmax)
    else:
        s = np.abs(blocked).max(axis=red, keepdims=True) / qmax
        s = np.where(s == 0, 1, s)
        zp = np.zeros_like(s)
    v = np.clip(np.round(blocked / s) + zp, -qmax - 1, qmax)
    sshape = [1 if a in contracting and a != ga else w.shape[a] for a in range(w.ndim)]
    if group is not None:
        sshape[ga] = w.shape[ga] // group
    else:
        sshape[ga] = 1
    dt = jnp.int8 if bits > 4 else jnp.int4
    return QArray(
        jnp.asarray(v.reshape(w.shape).astype(np.int8)).astype(dt),
        jnp.asarray(s.reshape(sshape).astype(np.float32)),
        jnp.asarray(zp.reshape(sshape).astype(np.int8)).astype(dt) if asym else None,
        bits=bits,
        dtype=dtype,
    )


def _quantize_tree(params, role_map, **kw):
    return map_with_paths(
        lambda p, x: _quant(x, role_map[p], **kw) if role_map[p].kind != "other" else x, params
    )


def _dequantize(tree):
    return jax.tree.map(
        lambda x: x.dequantize() if is_compressed(x) else x, tree, is_leaf=is_compressed
    )


def _close(a, b, scale=1.0):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-5 * scale, rtol=2e-5
    )


SPECS = [dict(bits=8), dict(bits=4), dict(bits=8, group=4), dict(bits=4, group=4, asym=True)]


# ------------------------------------------------------------------------------------------------
# Kernels: every layout, every granularity, against lax.dot_general on the dequantized weight
# ------------------------------------------------------------------------------------------------

LAYOUTS = {
    # name: (weight shape, role, lhs shape, dimension numbers, weight_is_rhs)
    "dense": ((8, 6), Role("matmul", (0,), (1,)), (3, 8), (((1,), (0,)), ((), ())), True),
    "equinox": ((6, 8), Role("matmul", (1,), (0,)), (8, 3), (((1,), (0,)), ((), ())), False),
    "qkv": ((8, 2, 3), Role("matmul", (0,), (1, 2)), (2, 3, 8), (((2,), (0,)), ((), ())), True),
    "out": ((2, 8, 5), Role("matmul", (0, 1), (2,)), (3, 2, 8), (((1, 2), (0, 1)), ((), ())), True),
    "stacked": (
        (2, 8, 3),
        Role("matmul", (1,), (2,), (0,)),
        (2, 5, 8),
        (((2,), (1,)), ((0,), (0,))),
        True,
    ),
}


def test_kernel_every_layout_and_granularity():
    """Every layout, asymmetric per group (the property tests in test_kernels sample the rest)."""
    for layout, (wshape, role, xshape, dn, rhs) in LAYOUTS.items():
        rng = np.random.default_rng(len(layout))
        x = rng.standard_normal(xshape).astype(np.float32)
        for spec in (SPECS[3],):
            q = _quant(rng.standard_normal(wshape), role, **spec)
            w = q.dequantize()
            ref = lax.dot_general(x, w, dn) if rhs else lax.dot_general(w, x, dn)
            kernel = jax.jit(
                lambda q, x, dn=dn, rhs=rhs: _kernels.dot_general(
                    q, x, dn, weight_is_rhs=rhs, mode="limbs"
                )
            )
            _close(kernel(q, x), ref, scale=10)


def test_kernel_int8_error_bound():
    """W8A8: error <= half an activation step times sum |w| per output."""
    role = LAYOUTS["dense"][1]
    rng = np.random.default_rng(0)
    q = _quant(rng.standard_normal((64, 16)), role)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    w = np.asarray(q.dequantize(), np.float64)
    ref = np.asarray(x, np.float64) @ w
    got = jax.jit(lambda q, x: _kernels.dot_general(q, x, (((1,), (0,)), ((), ())), mode="int8"))(
        q, x
    )
    step = np.abs(np.asarray(x)).max(1, keepdims=True) / 127
    bound = step / 2 * np.abs(w).sum(0, keepdims=True) + 1e-4
    err = np.abs(np.asarray(got) - ref)
    assert np.all(err <= bound) and err.max() > 1e-6  # it does quantize the activations


def test_kernel_nonfinite_rows_are_nan():
    q = _quant(np.ones((4, 2)), LAYOUTS["dense"][1])
    x = jnp.array([[1.0, jnp.inf, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    got = jax.jit(lambda q, x: _kernels.dot_general(q, x, (((1,), (0,)), ((), ())), mode="limbs"))(
        q, x
    )
    assert np.all(np.isnan(got[0])) and np.allclose(got[1], 1.0)


def test_dispatch_table():
    assert _dispatch.formulation("weight_only", 1, "cpu", size=1 << 20, int8_dot=True) == "limbs"
    assert _dispatch.formulation("weight_only", 1, "cpu", size=100) == "dequantize"
    assert _dispatch.formulation("weight_only", 64, "gpu", size=1 << 20) == "dequantize"
    with pytest.raises(ValueError, match="mode"):
        _dispatch.formulation("fast", 1)


# ------------------------------------------------------------------------------------------------
# compressed on real models
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    model = MLP((32, 16, 10))
    x = jax.random.normal(jax.random.key(1), (4, 24))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)
    return fn, params, x, roles(fn, params, x)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_mlp_equals_dequantized_and_explain(mlp, spec, strict):
    fn, params, x, role_map = mlp
    q = _quantize_tree(params, role_map, **spec)
    ref = jax.jit(fn)(_dequantize(q), x)
    fast = compressed(fn, formulation="limbs")  # the CPU path of large layers, forced
    with strict():
        out = fast(q, x)
    _close(out, ref)
    records = explain(fast, q, x)
    assert {r.path for r in records} == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
    assert all(r.intended == r.compiled == INTEGER_DOT for r in records), records
    if spec == SPECS[0]:
        # the dispatch (small layers: dequantize on CPU) and the explicit float formulation are
        # reported as what they are, never silently
        auto = compressed(fn)
        _close(auto(q, x), ref)
        assert all(r.intended == r.compiled for r in explain(auto, q, x))
        slow = compressed(fn, formulation="dequantize")
        assert all(r.compiled == FLOAT_FALLBACK for r in explain(jax.jit(slow), q, x))
        _close(slow(q, x), ref)


def test_no_retrace_jit_vmap(mlp):
    fn, params, x, role_map = mlp
    q = _quantize_tree(params, role_map, bits=4, group=4)
    count = []

    def counted(p, x):
        count.append(1)
        return fn(p, x)

    cfn = compressed(counted)
    a = cfn(q, x)
    b = cfn(q, x + 1.0)
    assert len(count) == 1
    np.testing.assert_array_equal(jax.jit(cfn)(q, x), a)  # jit(compressed) == compressed
    assert not np.array_equal(a, b)
    ref = jax.jit(fn)(_dequantize(q), x)
    v = jax.vmap(cfn, in_axes=(None, 0))(q, x[:, None, :])
    _close(v[:, 0], ref)


def test_grad_wrt_inputs_equals_dequantized(mlp):
    fn, params, x, role_map = mlp
    q = _quantize_tree(params, role_map)
    loss = lambda f: lambda x: jnp.sum(jnp.tanh(f(x)))
    got = jax.jit(jax.grad(loss(lambda x: compressed(fn, formulation="limbs")(q, x))))(x)
    ref = jax.jit(jax.grad(loss(lambda x: fn(_dequantize(q), x))))(x)
    _close(got, ref)


def test_int8_mode_close(mlp):
    fn, params, x, role_map = mlp
    q = _quantize_tree(params, role_map)
    ref = jax.jit(fn)(_dequantize(q), x)
    out = compressed(fn, mode="int8")(q, x)
    assert 0 < np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert all(r.compiled == INTEGER_DOT for r in explain(compressed(fn, mode="int8"), q, x))
    # options reach the leaves unread: a leaf rejects what it does not know, naming the path
    with pytest.raises(ValueError, match=r"Dense_0/kernel: .*mode"):
        compressed(fn, mode="int4")(q, x)
    with pytest.raises(ValueError, match=r"Dense_0/kernel: formulation= applies"):
        compressed(fn, mode="int8", formulation="limbs")(q, x)
    with pytest.raises(TypeError, match=r"Dense_0/kernel: .*unexpected keyword"):
        compressed(fn, fast=True)(q, x)
    with pytest.raises(TypeError, match="mode must be a string"):
        compressed(fn, mode=8)


def test_sharded_inputs(mlp, devices):
    fn, params, x, role_map = mlp
    q = _quantize_tree(params, role_map)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    xs = jax.device_put(jnp.tile(x, (2, 1)), NS(mesh, P("data", None)))
    qs = jax.tree.map(
        lambda a: jax.device_put(a, NS(mesh, P(*([None] * (a.ndim - 1)), "model"))), q
    )
    out = compressed(fn)(qs, xs)
    _close(out, jax.jit(fn)(_dequantize(q), jnp.tile(x, (2, 1))))
    assert len(out.sharding.device_set) == 8


def test_attention_and_embedding():
    model = Attention(vocab=13, features=16)
    ids = jnp.array([[1, 5, 12], [0, 3, 3]])
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    fn = lambda p, i: model.apply({"params": p}, i)
    role_map = roles(fn, params, ids)
    q = _quantize_tree(params, role_map, bits=8, group=8)
    fast = compressed(fn, formulation="limbs")
    _close(fast(q, ids), jax.jit(fn)(_dequantize(q), ids))
    by_path = {r.path: r for r in explain(fast, q, ids)}
    assert by_path["Embed_0/embedding"].compiled in (GATHER, INTEGER_DOT)
    for name in ("query", "key", "value", "out"):
        r = by_path[f"MultiHeadDotProductAttention_0/{name}/kernel"]
        assert r.intended == r.compiled == INTEGER_DOT


def test_cnn_conv_falls_back_to_dequantize_not_silently():
    model = CNN(channels=(4,), hidden=8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)
    q = _quantize_tree(params, roles(fn, params, x))
    fast = compressed(fn, formulation="limbs")
    _close(fast(q, x), jax.jit(fn)(_dequantize(q), x))
    by_path = {r.path: r for r in explain(fast, q, x)}
    conv = by_path["Conv_0/kernel"]  # QArray has no conv kernel: said, with the reason
    assert conv.compiled == FLOAT_FALLBACK and conv.note == QArray.no_conv_reason
    assert by_path["Dense_0/kernel"].compiled == INTEGER_DOT


def test_scan_stack_and_other_uses():
    model = Stack(features=8)
    x = jax.random.normal(jax.random.key(1), (2, 8))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)
    q = _quantize_tree(params, roles(fn, params, x), bits=4)
    _close(compressed(fn, formulation="limbs")(q, x), jax.jit(fn)(_dequantize(q), x))
    # a compressed leaf reaching a primitive without a fast path is dequantized
    other = lambda p, x: fn(p, x) * jnp.sum(p["layers"]["Dense_0"]["kernel"])
    _close(compressed(other)(q, x), jax.jit(other)(_dequantize(q), x), scale=10)


def test_nnx_and_equinox_and_static_args():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 6, rngs=rngs)

        def __call__(self, x, *, double=False):
            y = self.a(x)
            return 2 * y if double else y

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (3, 8))
    fn = lambda s, x, double=False: nnx.merge(graphdef, s)(x, double=double)
    q = _quantize_tree(state, roles(fn, state, x))
    assert isinstance(jax.tree.leaves(q, is_leaf=is_compressed)[1], QArray)
    cfn = compressed(fn)
    _close(cfn(q, x), jax.jit(fn)(_dequantize(q), x))
    _close(cfn(q, x, double=True), 2 * jax.jit(fn)(_dequantize(q), x))  # a static flag

    lin = eqx.nn.Linear(8, 5, key=jax.random.key(0))
    efn = lambda m, x: jax.vmap(m)(x)
    qm = _quantize_tree(lin, roles(efn, lin, x), bits=4, group=4)
    fast = compressed(efn, formulation="limbs")
    _close(fast(qm, x), jax.jit(efn)(_dequantize(qm), x))
    assert [r.compiled for r in explain(fast, qm, x)] == [INTEGER_DOT]


def test_unsupported_primitive_named():
    q = {"w": _quant(np.ones((3, 3)), LAYOUTS["dense"][1])}
    with pytest.raises(ValueError, match="shard_map"):
        compressed(shard_mapped)(q, jnp.ones((1, 3)))


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return nn.Dense(3)(nn.relu(x))


def test_linen_apply_with_static_flags_and_bfloat16():
    """``compressed(model.apply)`` with ``train=``/``mutable=`` flags; bfloat16 weights."""
    model = _BatchNormNet()
    x = jax.random.normal(jax.random.key(1), (4, 6))
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
    variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)
    role_map = roles(lambda v, x: model.apply(v, x, train=False), variables, x)
    q = _quantize_tree(variables, role_map)
    assert q["params"]["Dense_0"]["kernel"].dtype == jnp.bfloat16
    apply = compressed(model.apply, formulation="limbs")
    out = apply(q, x.astype(jnp.bfloat16), train=False, mutable=False)
    ref = jax.jit(model.apply, static_argnames=("train", "mutable"))(
        _dequantize(q), x.astype(jnp.bfloat16), train=False, mutable=False
    )
    assert out.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=0.05, rtol=0.02)
    out, updates = apply(q, x, train=True, mutable=["batch_stats"])
    assert set(updates) == {"batch_stats"} and out.shape == (4, 3)
