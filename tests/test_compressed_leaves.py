"""The compressed-leaf protocol: declared fields, what is derived from them, and wrapper leaves.

A toy declared leaf (``Halves``: float16 storage of a float array, with a checking constructor)
and a toy wrapper (``Scaled``: ``factor · inner`` around any compressed leaf, whose
``dot_general`` scales the activation and calls the inner leaf's) go through every place that
knows compressed leaves: pytree machinery (keys, vmap, grad, tree maps), indexing, checkpoints,
``jc.report``, ``dequantize``, ``jc.compressed`` and ``jc.export``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress as jc
from jcompress import checkpoint
from jcompress.quantization import (
    AWQArray,
    PerGroup,
    QArray,
    QuantSpec,
    dequantize,
    quantize,
    widen,
)
from jcompress.structure import LowRank
from jcompress.tree import Compressed, field, is_compressed


class Halves(Compressed, kind="test.Halves"):
    """A float array stored as float16; the constructor counts its calls and checks its input."""

    data = field()
    dtype = field(static=True, default=np.dtype(np.float32))
    checks = 0  # constructor calls (a class attribute)

    def __init__(self, data, dtype=np.float32):
        type(self).checks += 1
        if getattr(data, "dtype", None) != jnp.float16:
            raise TypeError(f"Halves stores float16 data, got {type(data).__name__}")
        super().__init__(data, dtype=np.dtype(dtype))

    @property
    def shape(self):
        return tuple(self.data.shape)

    def dequantize(self):
        return self.data.astype(self.dtype)


class Scaled(Compressed, kind="test.Scaled"):
    """``W = factor · inner``: a wrapper around any compressed leaf."""

    inner = field()
    factor = field()  # a float32 scalar
    calls = 0  # dot_general calls (at trace time)

    def __init__(self, inner, factor):
        if not is_compressed(inner):
            raise TypeError(f"Scaled wraps a compressed leaf, got {type(inner).__name__}")
        super().__init__(inner, jnp.asarray(factor, jnp.float32))

    @property
    def shape(self):
        return self.inner.shape

    @property
    def dtype(self):
        return self.inner.dtype

    def dequantize(self):
        w = self.inner.dequantize().astype(jnp.float32) * self.factor
        return w.astype(self.dtype)

    def dot_general(self, lhs, dimension_numbers, **options):
        type(self).calls += 1
        scaled = lhs * self.factor.astype(lhs.dtype)  # x · (f W) = (f x) · W
        return self.inner.dot_general(scaled, dimension_numbers, **options)


class Negated(Compressed):
    """A declared leaf with the default constructor and no kind (not checkpointable)."""

    w = field()
    shape = property(lambda self: self.w.shape)
    dtype = property(lambda self: self.w.dtype)

    def dequantize(self):
        return -self.w


def _rng_kernel(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


STACKED = jc.Role("matmul", contracting=(1,), output=(2,), stacked=(0,))


def _quantize(w, spec):
    """One kernel ``(in, out)`` or stacked ``(layers, in, out)`` as a QArray."""
    role = STACKED if w.ndim == 3 else jc.Role("matmul", contracting=(0,), output=(1,))
    return quantize({"kernel": w}, spec, roles={"kernel": role})["kernel"]


# ---- what the declaration derives ------------------------------------------------------------


def test_declared_fields_and_what_is_derived():
    h = Halves(jnp.ones((2, 3), jnp.float16))
    assert Halves.array_fields == ("data",) and Halves.static_fields == ("dtype",)
    assert [(f.name, f.static) for f in jc.tree.fields(h)] == [("data", False), ("dtype", True)]
    assert [f.name for f in jc.tree.fields(QArray) if f.static and not f.stored] == ["layout"]
    assert h.nbytes == 12 and h.ndim == 2 and h.size == 6
    assert repr(h) == "Halves(shape=(2, 3), data=float16[2,3])"  # default dtype not shown
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(h)[0]]
    assert paths == [".data"]
    with pytest.raises(AttributeError, match="immutable"):
        h.data = jnp.zeros((2, 3), jnp.float16)
    with pytest.raises(AttributeError, match="immutable"):
        del h.data
    checks = Halves.checks
    bf = h.replace(dtype=np.dtype(jnp.bfloat16))  # a view: no constructor
    assert Halves.checks == checks and bf.dequantize().dtype == jnp.bfloat16
    assert h.dtype == np.float32 and bf.data is h.data
    with pytest.raises(TypeError, match="unknown field"):
        h.replace(scale=1)
    with pytest.raises(TypeError, match="float16"):
        Halves(jnp.ones(3))  # users' constructions are checked
    # the default constructor binds fields by position or keyword
    n = Negated(jnp.ones(2))
    assert float(Negated(w=jnp.ones(2)).dequantize()[0]) == -1.0 and n.nbytes == 8
    for bad, match in [((), "missing field 'w'"), ((1, 2), "takes 1 fields")]:
        with pytest.raises(TypeError, match=match):
            Negated(*bad)
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['v'\]"):
        Negated(v=1)
    with pytest.raises(TypeError, match="repeated"):
        Negated(1, w=1)


def test_kind_names_are_checked_at_class_definition():
    with pytest.raises(ValueError, match=r"'QArray' is already registered for .*_qarray\.QArray"):

        class Impostor(Compressed, kind="QArray"):
            values = field()

    with pytest.raises(TypeError, match="kind= needs fields declared"):

        class NoFields(Compressed, kind="test.NoFields"):
            pass

    with pytest.raises(TypeError, match="at least one array child"):

        class OnlyStatic(Compressed):
            bits = field(static=True)

    with pytest.raises(ValueError, match="stored=False"):
        field(stored=False)
    assert checkpoint._registry.kind_named("QArray").cls is QArray


# ---- unflattening never runs the constructor -------------------------------------------------


def _leaves_of_every_kind():
    q = _quantize(_rng_kernel((4, 8)), QuantSpec(bits=4, symmetric=False))
    return {
        "halves": Halves(jnp.ones((4, 8), jnp.float16)),
        "qarray": q,
        "lowrank": LowRank(_rng_kernel((4, 2)), _rng_kernel((2, 8), 1)),
        "awq": AWQArray(q, jnp.full((4, 1), 2.0)),
        "scaled": Scaled(Halves(jnp.ones((4, 8), jnp.float16)), 3.0),
    }


def test_tree_map_to_none_and_placeholders_skip_validation():
    leaves = _leaves_of_every_kind()
    checks = Halves.checks
    nones = jax.tree.map(lambda x: None, leaves)
    assert Halves.checks == checks
    for name, leaf in nones.items():
        assert type(leaf) is type(leaves[name]) and jax.tree.leaves(leaf) == []
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), leaves)
    assert structs["awq"].shape == (4, 8) and isinstance(structs["awq"].inner, QArray)
    assert Halves.checks == checks


def test_vmap_over_stacked_leaves_skips_validation():
    stacked = Halves(jnp.arange(6, dtype=jnp.float16).reshape(3, 2))
    q = _quantize(_rng_kernel((3, 4, 5)), QuantSpec(bits=8))
    wrapped = Scaled(q, 0.5)
    checks = Halves.checks
    sums = jax.vmap(lambda h: h.dequantize().sum())(stacked)
    np.testing.assert_array_equal(sums, [1.0, 5.0, 9.0])
    # the in_axes spec is a Scaled holding ints and None: built without the constructor too
    spec = jax.tree.map(lambda x: 0 if x.ndim else None, wrapped)
    assert type(spec) is Scaled and spec.factor is None and spec.inner.values == 0
    per_layer = jax.jit(jax.vmap(lambda s: s.dequantize(), in_axes=(spec,)))(wrapped)
    np.testing.assert_array_equal(per_layer, wrapped.dequantize())
    assert Halves.checks == checks  # in_axes specs and tracers as children: no constructor


def test_grad_through_integer_children_gives_float0_without_validation():
    q = _quantize(_rng_kernel((4, 6)), QuantSpec(bits=4, symmetric=False))
    leaves = {"q": q, "awq": AWQArray(q, jnp.full((4, 1), 2.0))}
    grads = jax.grad(lambda t: sum(x.dequantize().sum() for x in t.values()), allow_int=True)(
        leaves
    )
    g = grads["q"]
    assert type(g) is QArray and g.values.dtype == jax.dtypes.float0
    assert g.zero_point.dtype == jax.dtypes.float0
    # d/dscale of sum((values - zp) * scale), per output channel, in NumPy
    centred = np.asarray(q.values, np.float64) - np.asarray(q.zero_point, np.float64)
    np.testing.assert_allclose(g.scale, centred.sum(0, keepdims=True), rtol=1e-6)
    ga = grads["awq"]
    assert type(ga) is AWQArray and ga.inner.values.dtype == jax.dtypes.float0
    np.testing.assert_allclose(ga.inner.scale, centred.sum(0, keepdims=True) / 2.0, rtol=1e-6)


# ---- indexing stacked layers (one implementation for every kind) -----------------------------


def test_indexing_stacked_layers_of_every_kind():
    w = _rng_kernel((3, 8, 4))
    q = _quantize(w, QuantSpec(bits=4, granularity=PerGroup(4)))
    lr = LowRank(_rng_kernel((3, 8, 2)), _rng_kernel((3, 2, 4), 1))
    for leaf in (q, lr, Scaled(q, 2.0), Scaled(lr, 2.0), AWQArray(q, jnp.ones((3, 8, 1)))):
        dense = np.asarray(leaf.dequantize())
        np.testing.assert_allclose(leaf[1].dequantize(), dense[1], rtol=1e-6)
        np.testing.assert_allclose(leaf[np.int64(2)].dequantize(), dense[2], rtol=1e-6)
        np.testing.assert_allclose(leaf[0:2].dequantize(), dense[0:2], rtol=1e-6)
        assert type(leaf[1]) is type(leaf)
        with pytest.raises(TypeError, match="ints and slices"):
            leaf[jnp.array(1)]
    with pytest.raises(ValueError, match="blocked scales"):
        q[:, 1]  # per-group scales along the contracting axis
    with pytest.raises(IndexError, match="1 leading"):
        lr[0, 1]  # the layer's own axes live in the factors


# ---- a wrapper leaf everywhere ---------------------------------------------------------------


def mlp(p, x):
    return jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) @ p["Dense_1"]["kernel"]


@pytest.fixture(scope="module")
def wrapped_model():
    params = {
        "Dense_0": {"kernel": _rng_kernel((16, 32)), "bias": jnp.zeros(32)},
        "Dense_1": {"kernel": _rng_kernel((32, 8), 1)},
    }
    q = quantize(params, QuantSpec(bits=4))
    lr = LowRank(_rng_kernel((32, 3), 2), _rng_kernel((3, 8), 3))
    tree = {
        "Dense_0": {"kernel": Scaled(widen(q["Dense_0"]["kernel"]), 0.5), "bias": jnp.zeros(32)},
        "Dense_1": {"kernel": Scaled(lr, 2.0)},
    }
    x = _rng_kernel((4, 16), 4)
    return tree, x


def test_wrapper_dequantize_and_compressed(wrapped_model, strict):
    tree, x = wrapped_model
    inner0 = tree["Dense_0"]["kernel"].inner
    dense = dequantize(tree)
    np.testing.assert_array_equal(dense["Dense_0"]["kernel"], inner0.dequantize() * 0.5)
    assert jc.tree.leaves_with_paths(tree)[1][0] == "Dense_0/kernel"  # one leaf, never /inner
    calls = Scaled.calls
    run = jc.compressed(mlp)
    with strict():
        out = run(tree, x)
    assert Scaled.calls == calls + 2  # both matmuls went through the wrapper's dot_general
    np.testing.assert_allclose(out, mlp(dense, x), rtol=1e-5, atol=1e-5)
    with strict():  # (the promotion mode is part of jit's cache key)
        run(tree, x)
    assert Scaled.calls == calls + 2  # cached: no retrace


def test_wrapper_checkpoint_report_and_export(wrapped_model, tmp_path):
    tree, x = wrapped_model
    checkpoint.save(tmp_path / "c", tree)
    node = json.loads((tmp_path / "c" / "jcompress.json").read_text())["tree"]
    k0 = dict(dict(node["items"])["Dense_0"]["items"])["kernel"]
    assert k0["kind"] == "test.Scaled" and k0["arrays"]["inner"]["kind"] == "QArray"
    back = checkpoint.load(tmp_path / "c")
    k0 = back["Dense_0"]["kernel"]
    assert type(k0) is Scaled and type(k0.inner) is QArray
    assert k0.inner.values.dtype == jnp.int4  # the widened inner QArray was stored packed
    assert type(back["Dense_1"]["kernel"].inner) is LowRank
    for path in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(
            dequantize(back)[path]["kernel"], dequantize(tree)[path]["kernel"]
        )
    # report: one row per wrapper, sizes through the nesting
    rows = {r.path: r for r in jc.report.summarize(tree).leaves}
    r0, r1 = rows["Dense_0/kernel"], rows["Dense_1/kernel"]
    assert r0.kind == "test.Scaled" and r0.shape == (16, 32)
    packed = 16 * 32 // 2 + 32 * 4  # int4 values + one float32 scale per output channel
    assert r0.memory_bytes == 16 * 32 + 32 * 4 + 4  # widened: int8 containers; the factor
    assert r0.encoded_bytes == packed + 4  # what the checkpoint writes: packed int4
    assert r1.memory_bytes == (32 * 3 + 3 * 8) * 4 + 4 == r1.encoded_bytes
    # export: the program takes the wrapper (and the leaf it wraps) as its argument
    exported = jc.load_exported(jc.export(mlp, tree, x))
    got = exported.call(widen(back), x)  # exported for the widened (runtime) form
    np.testing.assert_allclose(got, jc.compressed(mlp)(tree, x), rtol=1e-6)


def test_unregistered_declared_leaf_is_refused_by_checkpoints_and_exports(tmp_path):
    tree = {"w": Negated(jnp.ones((2, 2)))}
    with pytest.raises(TypeError, match=r"w: cannot save .*kind="):
        checkpoint.save(tmp_path / "c", tree)
    with pytest.raises(TypeError, match=r"w/inner: export cannot serialize a Negated leaf"):
        jc.export(lambda p, x: x @ p["w"], {"w": Scaled(tree["w"], 1.0)}, jnp.ones((1, 2)))
