"""jc.tree: paths, selection, roles, path matching, the compressed-leaf protocol, groups."""

import dataclasses

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jcompress as jc
from jcompress import tree as jt
from jcompress.tree import Group, Member, Role

# ------------------------------------------------------------------ fixtures: real layouts


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(4)(x)


class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="query")(x)
        return nn.DenseGeneral(8, axis=(-2, -1), name="out")(q)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(6)(x), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = scan(name="layers")(x, None)
        return x


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.bn(self.l1(x)))


@pytest.fixture(scope="module")
def linen_vars():
    return Block().init(jax.random.key(0), jnp.ones((1, 6)))


def test_paths_linen(linen_vars):
    paths = [p for p, _ in jt.leaves_with_paths(linen_vars)]
    assert paths == [
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
        "params/LayerNorm_0/bias",
        "params/LayerNorm_0/scale",
    ]


def test_default_selection_linen_never_picks_biases_or_norms(linen_vars):
    sel = jt.select(linen_vars)
    assert jt.selected_paths(sel) == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    assert jax.tree.structure(sel) == jax.tree.structure(linen_vars)


def test_paths_nnx_state_drop_value():
    model = NnxNet(nnx.Rngs(0))
    _, state = nnx.split(model)
    paths = [p for p, _ in jt.leaves_with_paths(state)]
    assert "l1/kernel" in paths and "bn/mean" in paths
    assert not any(p.endswith("value") for p in paths)
    # Default selection: only the two kernels (BatchNorm scale, stats and biases excluded).
    assert jt.selected_paths(jt.select(state)) == ["l1/kernel", "l2/kernel"]


def test_nnx_optimizer_pure_state_paths_match():
    """nnx.Optimizer passes Param variables to init and plain arrays to update: same paths."""
    model = NnxNet(nnx.Rngs(0))
    seen = {}

    def init(params):
        seen["init"] = [p for p, _ in jt.leaves_with_paths(params)]
        seen["init_tree"] = params
        return optax.EmptyState()

    def update(updates, state, params=None):
        seen["update"] = [p for p, _ in jt.leaves_with_paths(updates)]
        seen["update_tree"] = updates
        return updates, state

    opt = nnx.Optimizer(model, optax.GradientTransformation(init, update), wrt=nnx.Param)
    grads = nnx.grad(lambda m: m(jnp.ones((2, 4))).sum())(model)
    opt.update(model, grads)
    assert seen["init"] == seen["update"]
    # A mask built from the Variable tree is matched against the plain-array tree by path.
    masks = jax.tree.map(lambda x: x > 0, seen["init_tree"])
    out = jt.map_with_paths(
        lambda p, u, m: jnp.where(m, u, 0), seen["update_tree"], masks, names=["masks"]
    )
    assert [p for p, _ in jt.leaves_with_paths(out)] == seen["update"]


def test_equinox_module_paths_and_explicit_roles():
    lin = eqx.nn.Linear(5, 3, key=jax.random.key(0))
    paths = [p for p, _ in jt.leaves_with_paths(lin)]
    assert paths == ["weight", "bias"]
    # Equinox names are not Flax's: the default selects nothing and says what to do.
    with pytest.raises(ValueError, match="roles="):
        jt.select(lin)
    roles = {"weight": Role("matmul", contracting=(1,), output=(0,)), "bias": Role("other")}
    assert jt.selected_paths(jt.select(lin, roles=roles)) == ["weight"]
    resolved = jt.resolve_roles(lin, jt.select(lin, roles=roles), roles)
    assert resolved["weight"].group_axis == 1
    # A where= tree of bools built from the (callable) module is a tree, not a callable.
    only_weight = jax.tree.map(lambda x: x.ndim == 2, lin)
    assert jt.selected_paths(jt.select(lin, only_weight)) == ["weight"]


def test_nested_lists_and_tuples():
    tree = {"layers": [{"kernel": jnp.ones((2, 3))}, ({"kernel": jnp.ones((3, 1))}, 1.0)]}
    paths = [p for p, _ in jt.leaves_with_paths(tree)]
    assert paths == ["layers/0/kernel", "layers/1/0/kernel", "layers/1/1"]
    assert jt.selected_paths(jt.select(tree)) == ["layers/0/kernel", "layers/1/0/kernel"]


def test_dense_general_and_scan_need_hand_written_roles():
    attn = Attn().init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    roles = {
        "query/kernel": Role("matmul", contracting=(0,), output=(1, 2)),
        "query/bias": Role("other"),
        "out/kernel": Role("matmul", contracting=(0, 1), output=(2,)),
        "out/bias": Role("other"),
    }
    sel = jt.select(attn, roles=roles)
    assert jt.selected_paths(sel) == ["out/kernel", "query/kernel"]
    resolved = jt.resolve_roles(attn, sel, roles)
    assert resolved["out/kernel"].group_axis == 1
    assert resolved["query/kernel"].output == (1, 2)

    stack = Stack().init(jax.random.key(0), jnp.ones((1, 6)))["params"]
    k = stack["layers"]["Dense_0"]["kernel"]
    assert k.shape == (3, 6, 6)
    roles = {
        "layers/Dense_0/kernel": Role("matmul", contracting=(1,), output=(2,), stacked=(0,)),
        "layers/Dense_0/bias": Role("other", stacked=(0,)),
    }
    assert jt.selected_paths(jt.select(stack, roles=roles)) == ["layers/Dense_0/kernel"]
    # Without roles a stacked kernel is taken as a conv; roles are how to say otherwise.
    assert jt.default_role("layers/Dense_0/kernel", k).kind == "conv"


def test_embedding_default_is_gather_and_excluded_for_channel_kinds():
    params = {"Embed_0": {"embedding": jnp.ones((10, 4))}, "Dense_0": {"kernel": jnp.ones((4, 3))}}
    assert jt.default_role("Embed_0/embedding", params["Embed_0"]["embedding"]) == Role(
        "gather", contracting=(1,), output=(0,)
    )
    assert jt.selected_paths(jt.select(params)) == ["Dense_0/kernel", "Embed_0/embedding"]
    sel = jt.select(params, kinds=("matmul", "conv"))
    assert jt.selected_paths(sel) == ["Dense_0/kernel"]


# ------------------------------------------------------------------ where= forms and errors


def test_where_forms_agree(linen_vars):
    by_regex = jt.select(linen_vars, r"params/Dense_\d/kernel")
    by_callable = jt.select(linen_vars, lambda p, x: p.endswith("kernel") and "Dense" in p)
    by_tree = jt.select(linen_vars, by_regex)
    assert by_regex == by_callable == by_tree == jt.select(linen_vars)


def test_regex_is_fullmatch(linen_vars):
    with pytest.raises(ValueError, match="selects no leaf"):
        jt.select(linen_vars, "Dense_0")  # a substring, not the full path


def test_where_selecting_integer_leaf_names_it():
    params = {"kernel": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(ValueError, match=r"step: .*int32.*where="):
        jt.select(params, ".*", what="pruning")


def test_where_tree_with_other_paths_is_an_error(linen_vars):
    bad = {"Dense_0": {"kernel": True}}
    with pytest.raises(ValueError, match="missing 'params/Dense_0/bias'"):
        jt.select(linen_vars, bad)


def test_invalid_regex():
    with pytest.raises(ValueError, match="regular expression"):
        jt.select({"kernel": jnp.ones((2, 2))}, "(")


def test_selected_leaf_missing_from_roles_names_prefix():
    params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
    roles = {"params/Dense_0/kernel": Role("matmul", (0,), (1,))}
    with pytest.raises(ValueError, match=r"(?s)Dense_0/kernel.*missing from roles.*'params/'"):
        jt.select(params, ".*kernel", roles=roles)


def test_match_paths_names_missing_nearest_and_prefix(linen_vars):
    params = linen_vars["params"]
    with_prefix = {"params": jax.tree.map(lambda x: True, params)}
    with pytest.raises(ValueError) as e:
        jt.match_paths(params, with_prefix, name="masks")
    msg = str(e.value)
    assert "masks does not match" in msg
    assert "missing 'Dense_0/kernel'" in msg
    assert "nearest given: ['params/Dense_0/kernel'" in msg
    assert "common prefix 'params/'" in msg


def test_match_paths_accepts_flat_dicts_and_reorders():
    tree = {"b": {"x": 1}, "a": 2}
    assert jt.match_paths(tree, {"b/x": 10, "a": 20}) == [20, 10]


def test_duplicate_paths_rejected():
    with pytest.raises(ValueError, match="share the path"):
        jt.leaves_with_paths({"a/b": 1, "a": {"b": 2}})


# ------------------------------------------------------------------ Role, Group, Member


def test_role_validation():
    with pytest.raises(ValueError, match="kind"):
        Role("dense", (0,), (1,))
    with pytest.raises(ValueError, match="overlap"):
        Role("matmul", (0,), (0,))
    with pytest.raises(ValueError, match="non-negative"):
        Role("matmul", (-1,), (1,))
    with pytest.raises(ValueError, match="needs contracting and output"):
        Role("matmul", (), (1,))
    with pytest.raises(ValueError, match="rank 2"):
        Role("conv", (0, 1, 2), (3,)).check("w", (3, 3))
    assert Role("matmul", 0, 1) == Role("matmul", (0,), (1,))
    assert hash(Role("other")) == hash(Role("other"))


def test_group_member_plain_hashable_data():
    g = Group((Member("a/kernel", 1), Member("b/kernel", 0, offset=0, stride=4)), size=4)
    assert hash(g) == hash(Group([Member("a/kernel", 1), Member("b/kernel", 0, 0, 4)], 4))
    assert g.paths == ("a/kernel", "b/kernel")
    assert g.members[1].indices(2, 12) == [2, 6, 10]
    assert g.members[0].indices(2, 12) == [2]
    assert g.blocked is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.size = 3


# ------------------------------------------------------------------ compressed-leaf protocol


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Halves(jt.Compressed):
    """A toy compressed leaf: a float array stored as float16."""

    data: jax.Array

    def dequantize(self):
        return self.data.astype(jnp.float32)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def nbytes(self):
        return self.data.size * 2


def test_compressed_leaf_is_one_leaf():
    tree = {"Dense_0": {"kernel": _Halves(jnp.ones((4, 2), jnp.float16)), "bias": jnp.zeros(2)}}
    paths = [p for p, _ in jt.leaves_with_paths(tree)]
    assert paths == ["Dense_0/bias", "Dense_0/kernel"]  # never Dense_0/kernel/data
    assert jc.is_compressed(tree["Dense_0"]["kernel"])
    assert jt.selected_paths(jt.select(tree)) == ["Dense_0/kernel"]
    out = jt.map_with_paths(lambda p, x: jc.is_compressed(x), tree)
    assert out == {"Dense_0": {"bias": False, "kernel": True}}
    # Users pass is_compressed to their own maps; jit and the pytree machinery still see arrays.
    doubled = jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t))(tree)
    assert doubled["Dense_0"]["kernel"].data.dtype == jnp.float16
    assert tree["Dense_0"]["kernel"].ndim == 2 and tree["Dense_0"]["kernel"].size == 8


def test_check_finite_eager_only():
    with pytest.raises(ValueError, match="w: pruning found 2 NaN/Inf"):
        jt.check_finite("w", jnp.array([1.0, jnp.nan, jnp.inf]), what="pruning")
    jax.jit(lambda x: jt.check_finite("w", x) or x)(jnp.array([jnp.nan]))  # traced: no check
    jt.check_finite("i", jnp.array([1, 2]))  # integers are not checked


# ------------------------------------------------------------------ properties


_names = st.sampled_from(["kernel", "bias", "embedding", "scale", "weight"])


@given(
    st.dictionaries(
        st.text("abcxyz_0123", min_size=1, max_size=5),
        st.tuples(_names, st.integers(0, 3), st.sampled_from(["float32", "bfloat16", "int32"])),
        min_size=1,
        max_size=5,
    )
)
def test_default_selection_property(layers):
    tree = {
        k: {name: np.zeros((2,) * ndim, dtype=jnp.dtype(dt))}
        for k, (name, ndim, dt) in layers.items()
    }
    sel = jt.select(tree, allow_empty=True)
    for (p, x), (_, s) in zip(jt.leaves_with_paths(tree), jt.leaves_with_paths(sel)):
        name = p.rsplit("/", 1)[-1]
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        expected = floating and (
            (name == "kernel" and x.ndim >= 2) or (name == "embedding" and x.ndim == 2)
        )
        assert s == expected, (p, x.dtype, x.shape)
    # A round trip through map_with_paths preserves structure and order.
    back = jt.map_with_paths(lambda p, x, s: s, tree, sel)
    assert back == sel


def test_match_paths_single_level_nnx_state_gives_values_not_variables():
    """A one-level nnx.State is a Mapping whose keys equal the paths: still unwrap Variables."""
    _, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    plain = nnx.to_pure_dict(state)
    got = jt.match_paths(plain, state, name="state")
    assert all(isinstance(x, jax.Array) for x in got)
    resolved = jt.resolve_roles(state, jt.select(state))
    assert resolved == {"kernel": Role("matmul", contracting=(0,), output=(1,))}


def test_match_paths_flat_dict_of_pytrees():
    """Flat {path: pytree} dicts (statistics per path) are looked up, not flattened."""
    tree = {"a": {"kernel": 1.0}, "b": {"kernel": 2.0}}
    stats = {"a/kernel": (1, 2), "b/kernel": (3, 4)}
    assert jt.match_paths(tree, stats) == [(1, 2), (3, 4)]
