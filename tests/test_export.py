"""jc.export: a serialized artifact of jc.compressed(fn) that runs without model code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress as jc
from jcompress import checkpoint, export, load_exported
from jcompress.demo import MLP
from jcompress.quantization import QuantSpec, dequantize, quantize
from jcompress.runtime import compressed
from jcompress.tree import Compressed


@pytest.fixture(scope="module")
def model_and_params():
    model = MLP((32, 10))
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 16)))["params"]
    return model, jax.jit(lambda p: quantize(p, QuantSpec(bits=4)))(params)


def apply_fn(model):
    return lambda p, x: model.apply({"params": p}, x)


def test_round_trip_through_bytes_and_a_checkpoint(model_and_params, tmp_path):
    model, q = model_and_params
    x = jax.random.normal(jax.random.key(1), (4, 16))
    blob = export(apply_fn(model), q, x)
    assert isinstance(blob, bytes)
    checkpoint.save(tmp_path / "q", q)
    loaded = checkpoint.load(tmp_path / "q")
    exported = load_exported(blob)
    out = exported.call(loaded, x)
    np.testing.assert_array_equal(out, compressed(apply_fn(model))(q, x))
    ref = model.apply({"params": dequantize(q)}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert [a.shape for a in exported.in_avals][-1] == (4, 16)


def test_a_runtime_layout_comes_back_as_itself(tmp_path):
    from jcompress.quantization import OutMajor, runtime_layout

    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((512, 256), np.float32))}}
    fn = lambda p, x: x @ p["Dense_0"]["kernel"]
    fast = runtime_layout(quantize(params, QuantSpec(bits=8)))
    assert isinstance(fast["Dense_0"]["kernel"].layout, OutMajor)
    x = jnp.ones((1, 512))
    exported = load_exported(export(fn, fast, x))
    (flat, _), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
    assert isinstance(flat["Dense_0/kernel"].layout, OutMajor)  # was a plain tuple
    np.testing.assert_array_equal(exported.call(fast, x), compressed(fn)(fast, x))


def test_shape_structs_are_enough(model_and_params):
    model, q = model_and_params
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), q)
    blob = export(apply_fn(model), specs, jax.ShapeDtypeStruct((2, 16), jnp.float32))
    out = load_exported(blob).call(q, jnp.ones((2, 16)))
    np.testing.assert_array_equal(out, compressed(apply_fn(model))(q, jnp.ones((2, 16))))


def test_unregistered_compressed_leaf_names_its_path():
    @jax.tree_util.register_pytree_node_class
    class Odd(Compressed):
        def __init__(self, w):
            self.w = w

        def tree_flatten(self):
            return (self.w,), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

        def dequantize(self):
            return self.w

        shape = property(lambda self: self.w.shape)
        dtype = property(lambda self: self.w.dtype)
        nbytes = property(lambda self: self.w.nbytes)

    with pytest.raises(TypeError, match="layer/w: export cannot serialize a Odd leaf"):
        export(lambda p, x: x @ p["layer"]["w"], {"layer": {"w": Odd(jnp.eye(2))}}, jnp.ones(2))


# ---- every tree form: the program takes the array leaves by path -------------------------


def _nnx_case():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            self.layers = nnx.List(
                [nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1))]
            )

        def __call__(self, x):
            return self.layers[1](jax.nn.relu(self.layers[0](x)))

    graphdef, state = nnx.split(Net())
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def _eqx_case():
    import equinox as eqx

    mlp = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    return (lambda m, x: jax.vmap(m)(x)), mlp


@pytest.mark.parametrize(
    "form", ["nnx_state", "nnx_pure_dict_int_keys", "eqx_module", "eqx_partitioned"]
)
def test_any_tree_form_exports_and_calls_with_the_tree_it_has(form):
    """nnx pure dicts have integer keys and Equinox modules hold functions and None leaves:
    none of them is a jax.export-serializable tree, all of them export."""
    from flax import nnx

    x = jax.random.normal(jax.random.key(2), (3, 4))
    if form.startswith("nnx"):
        fn, tree = _nnx_case()
        if form == "nnx_pure_dict_int_keys":
            tree = nnx.to_pure_dict(tree)
            assert 0 in tree["layers"]  # integer keys
    else:
        import equinox as eqx

        fn, tree = _eqx_case()
        if form == "eqx_partitioned":
            arrays, static = eqx.partition(tree, eqx.is_inexact_array)
            fn, tree = (lambda f: lambda a, x: f(eqx.combine(a, static), x))(fn), arrays
    q = quantize(tree, QuantSpec(bits=8), roles=jc.roles(fn, tree, x))
    exported = load_exported(export(fn, q, x))
    want = compressed(fn)(q, x)
    np.testing.assert_allclose(exported.call(q, x), want, rtol=1e-6, atol=1e-6)
    flat = dict(jc.tree.leaves_with_paths(q))
    flat = {p: v for p, v in flat.items() if v is not None and not callable(v)}
    np.testing.assert_allclose(exported.call(flat, x), want, rtol=1e-6, atol=1e-6)


def test_call_with_a_different_tree_names_the_missing_paths(model_and_params):
    model, q = model_and_params
    exported = load_exported(export(apply_fn(model), q, jnp.ones((1, 16))))
    with pytest.raises(ValueError, match=r"lacks the exported parameter.*Dense_0/kernel"):
        exported.call({"other": jnp.ones(3)}, jnp.ones((1, 16)))
