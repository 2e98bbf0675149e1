"""roles: inferred from the jaxpr on real Flax / nnx / Equinox layouts, and the walker's errors."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

from jcompress.demo import CNN, MLP
from jcompress.runtime import roles
from jcompress.tree import Role

DENSE = Role("matmul", contracting=(0,), output=(1,))
OTHER = Role("other")


def _linen(model, x):
    # roles only read shapes: abstract parameters keep the tests fast
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params


def test_mlp(strict):
    fn, params = _linen(MLP((8, 4)), jnp.ones((2, 5)))
    with strict():
        got = roles(fn, params, jnp.ones((2, 5)))
    assert got == {
        "Dense_0/bias": OTHER,
        "Dense_0/kernel": DENSE,
        "Dense_1/bias": OTHER,
        "Dense_1/kernel": DENSE,
    }


def test_cnn():
    x = jnp.ones((2, 8, 8, 1))
    fn, params = _linen(CNN(channels=(4, 8), hidden=16), x)
    got = roles(fn, params, x)
    assert got["Conv_0/kernel"] == Role("conv", contracting=(0, 1, 2), output=(3,))
    assert got["Conv_1/kernel"] == Role("conv", contracting=(0, 1, 2), output=(3,))
    assert got["Dense_0/kernel"] == DENSE
    assert got["Conv_0/bias"] == OTHER


class Attention(nn.Module):
    """Embed -> multi-head attention -> tied output projection (shared with other runtime tests)."""

    vocab: int = 11
    features: int = 8

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.features)
        h = nn.MultiHeadDotProductAttention(num_heads=2)(embed(ids))
        return embed.attend(h)


def test_attention_and_tied_embedding():
    ids = jnp.zeros((2, 3), jnp.int32)
    fn, params = _linen(Attention(), ids)
    got = roles(fn, params, ids)
    mha = "MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value"):
        assert got[f"{mha}/{name}/kernel"] == Role("matmul", contracting=(0,), output=(1, 2))
        assert got[f"{mha}/{name}/bias"] == OTHER
    assert got[f"{mha}/out/kernel"] == Role("matmul", contracting=(0, 1), output=(2,))
    # the gather and the tied projection x @ embedding.T agree: rows are output channels
    assert got["Embed_0/embedding"] == Role("gather", contracting=(1,), output=(0,))


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(self.features)(c)), None


class Stack(nn.Module):
    """``length`` tanh Dense layers as one ``nn.scan`` stack named ``layers``."""

    features: int = 4
    length: int = 3

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.length
        )
        return scan(self.features, name="layers")(x, None)[0]


def test_nn_scan_stack():
    fn, params = _linen(Stack(), jnp.ones((2, 4)))
    got = roles(fn, params, jnp.ones((2, 4)))
    assert got["layers/Dense_0/kernel"] == Role(
        "matmul", contracting=(1,), output=(2,), stacked=(0,)
    )
    assert got["layers/Dense_0/bias"] == OTHER


def test_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 5, rngs=rngs)
            self.b = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    got = roles(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.ones((2, 4)))
    assert got == {"a/bias": OTHER, "a/kernel": DENSE, "b/bias": OTHER, "b/kernel": DENSE}


def test_equinox_linear():
    model = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    got = roles(lambda m, x: jax.vmap(m)(x), model, jnp.ones((2, 4)))
    assert got == {"weight": Role("matmul", contracting=(1,), output=(0,)), "bias": OTHER}


def test_views_and_control_flow():
    """Through jit, remat, cond, while, transposes, reshapes and casts."""
    params = {
        "t": jnp.ones((4, 4)),  # used transposed: (out, in)
        "r": jnp.ones((2, 2, 5)),  # merged by a reshape into (4, 5)
        "c": jnp.ones((5, 5)),  # inside cond and while
        "unused": jnp.ones(3),
    }

    @jax.checkpoint
    def inner(p, x):
        return x @ p["t"].T.astype(jnp.float32)

    def fn(p, x):
        h = jax.jit(inner)(p, x)
        h = h @ p["r"].reshape(4, 5)
        h = lax.cond(h.sum() > 0, lambda h: h @ p["c"], lambda h: -h, h)
        return lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["c"]), (0, h))

    got = roles(fn, params, jnp.ones((2, 4)))
    assert got["t"] == Role("matmul", contracting=(1,), output=(0,))
    assert got["r"] == Role("matmul", contracting=(0, 1), output=(2,))
    assert got["c"] == DENSE
    assert got["unused"] == OTHER


def test_inconsistent_roles_name_path_and_both():
    with pytest.raises(ValueError, match=r"w: consumed twice with inconsistent roles.*Role"):
        roles(lambda p, x: x @ p["w"] + x @ p["w"].T, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)))


def shard_mapped(p, x):
    """``x @ p["w"]`` inside ``shard_map``: a higher-order primitive the walker rejects."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    spec = jax.sharding.PartitionSpec()
    f = jax.shard_map(lambda w, x: x @ w, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    return f(p["w"], x)


def test_unsupported_higher_order_primitive_named():
    with pytest.raises(ValueError, match="shard_map"):
        roles(shard_mapped, {"w": jnp.ones((3, 3))}, jnp.ones((1, 3)))


def test_path_mismatch_is_named():
    params = {"dense": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match=r"'Dense'.*paths are \['dense/kernel'\]"):
        roles(lambda p, x: x @ p["Dense"]["kernel"], params, jnp.ones((1, 3)))
    fn, linen_params = _linen(MLP((4,)), jnp.ones((1, 3)))
    renamed = {"Dense_7": linen_params["Dense_0"]}
    with pytest.raises(ValueError, match=r"paths are \['Dense_7/bias', 'Dense_7/kernel'\]"):
        roles(fn, renamed, jnp.ones((1, 3)))


@given(
    n_in=st.sampled_from([1, 3, 8]),
    n_out=st.sampled_from([2, 5]),
    transposed=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_dense_roles_property(n_in, n_out, transposed, dtype):
    shape = (n_out, n_in) if transposed else (n_in, n_out)
    w = jnp.zeros(shape, dtype)

    def fn(p, x):
        return x @ (p["w"].T if transposed else p["w"])

    got = roles(fn, {"w": w}, jax.ShapeDtypeStruct((2, n_in), dtype))["w"]
    c, o = ((1,), (0,)) if transposed else ((0,), (1,))
    assert got == Role("matmul", contracting=c, output=o)
