"""jc.export: a serialized artifact of jc.compressed(fn) that runs without model code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
