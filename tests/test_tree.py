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
from jcompress import tree as jtree
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
    paths = [p for p, _ in jtree.leaves_with_paths(linen_vars)]
    assert paths == [
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
        "params/LayerNorm_0/bias",
        "params/LayerNorm_0/scale",
    ]


def test_default_selection_linen_never_picks_biases_or_norms(linen_vars):
    sel = jtree.select(linen_vars)
    assert jtree.selected_paths(sel) == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    assert jax.tree.structure(sel) == jax.tree.structure(linen_vars)


def test_paths_nnx_state_drop_value():
    model = NnxNet(nnx.Rngs(0))
    _, state = nnx.split(model)
    paths = [p for p, _ in jtree.leaves_with_paths(state)]
    assert "l1/kernel" in paths and "bn/mean" in paths
    assert not any(p.endswith("value") for p in paths)
    # Default selection: only the two kernels (BatchNorm scale, stats and biases excluded).
    assert jtree.selected_paths(jtree.select(state)) == ["l1/kernel", "l2/kernel"]


def test_nnx_optimizer_pure_state_paths_match():
    """nnx.Optimizer passes Param variables to init and plain arrays to update: same paths."""
    model = NnxNet(nnx.Rngs(0))
    seen = {}

    def init(params):
        seen["init"] = [p for p, _ in jtree.leaves_with_paths(params)]
        seen["init_tree"] = params
        return optax.EmptyState()

    def update(updates, state, params=None):
        seen["update"] = [p for p, _ in jtree.leaves_with_paths(updates)]
        seen["update_tree"] = updates
        return updates, state

    opt = nnx.Optimizer(model, optax.GradientTransformation(init, update), wrt=nnx.Param)
    grads = nnx.grad(lambda m: m(jnp.ones((2, 4))).sum())(model)
    opt.update(model, grads)
    assert seen["init"] == seen["update"]
    # A mask built from the Variable tree is matched against the plain-array tree by path.
    masks = jax.tree.map(lambda x: x > 0, seen["init_tree"])
    out = jtree.map_with_paths(
        lambda p, u, m: jnp.where(m, u, 0), seen["update_tree"], masks, names=["masks"]
    )
    assert [p for p, _ in jtree.leaves_with_paths(out)] == seen["update"]


def test_equinox_module_paths_and_explicit_roles():
    lin = eqx.nn.Linear(5, 3, key=jax.random.key(0))
    paths = [p for p, _ in jtree.leaves_with_paths(lin)]
    assert paths == ["weight", "bias"]
    # Equinox names are not Flax's: the default selects nothing and says what to do.
    with pytest.raises(ValueError, match="roles="):
        jtree.select(lin)
    roles = {"weight": Role("matmul", contracting=(1,), output=(0,)), "bias": Role("other")}
    assert jtree.selected_paths(jtree.select(lin, roles=roles)) == ["weight"]
    resolved = jtree.resolve_roles(lin, jtree.select(lin, roles=roles), roles)
    assert resolved["weight"].group_axis == 1
    # A where= tree of bools built from the (callable) module is a tree, not a callable.
    only_weight = jax.tree.map(lambda x: x.ndim == 2, lin)
    assert jtree.selected_paths(jtree.select(lin, only_weight)) == ["weight"]


def test_nested_lists_and_tuples():
    tree = {"layers": [{"kernel": jnp.ones((2, 3))}, ({"kernel": jnp.ones((3, 1))}, 1.0)]}
    paths = [p for p, _ in jtree.leaves_with_paths(tree)]
    assert paths == ["layers/0/kernel", "layers/1/0/kernel", "layers/1/1"]
    assert jtree.selected_paths(jtree.select(tree)) == ["layers/0/kernel", "layers/1/0/kernel"]


def test_dense_general_and_scan_need_hand_written_roles():
    attn = Attn().init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    roles = {
        "query/kernel": Role("matmul", contracting=(0,), output=(1, 2)),
        "query/bias": Role("other"),
        "out/kernel": Role("matmul", contracting=(0, 1), output=(2,)),
        "out/bias": Role("other"),
    }
    sel = jtree.select(attn, roles=roles)
    assert jtree.selected_paths(sel) == ["out/kernel", "query/kernel"]
    resolved = jtree.resolve_roles(attn, sel, roles)
    assert resolved["out/kernel"].group_axis == 1
    assert resolved["query/kernel"].output == (1, 2)

    stack = Stack().init(jax.random.key(0), jnp.ones((1, 6)))["params"]
    k = stack["layers"]["Dense_0"]["kernel"]
    assert k.shape == (3, 6, 6)
    roles = {
        "layers/Dense_0/kernel": Role("matmul", contracting=(1,), output=(2,), stacked=(0,)),
        "layers/Dense_0/bias": Role("other", stacked=(0,)),
    }
    assert jtree.selected_paths(jtree.select(stack, roles=roles)) == ["layers/Dense_0/kernel"]
    # Without roles a stacked kernel is taken as a conv; roles are how to say otherwise.
    assert jtree.default_role("layers/Dense_0/kernel", k).kind == "conv"


def test_embedding_default_is_gather_and_excluded_for_channel_kinds():
    params = {"Embed_0": {"embedding": jnp.ones((10, 4))}, "Dense_0": {"kernel": jnp.ones((4, 3))}}
    assert jtree.default_role("Embed_0/embedding", params["Embed_0"]["embedding"]) == Role(
        "gather", contracting=(1,), output=(0,)
    )
    assert jtree.selected_paths(jtree.select(params)) == ["Dense_0/kernel", "Embed_0/embedding"]
    sel = jtree.select(params, kinds=("matmul", "conv"))
    assert jtree.selected_paths(sel) == ["Dense_0/kernel"]


# ------------------------------------------------------------------ where= forms and errors


def test_where_forms_agree(linen_vars):
    by_regex = jtree.select(linen_vars, r"params/Dense_\d/kernel")
    by_callable = jtree.select(linen_vars, lambda p, x: p.endswith("kernel") and "Dense" in p)
    by_tree = jtree.select(linen_vars, by_regex)
    assert by_regex == by_callable == by_tree == jtree.select(linen_vars)


def test_regex_is_fullmatch(linen_vars):
    with pytest.raises(ValueError, match="selects no leaf"):
        jtree.select(linen_vars, "Dense_0")  # a substring, not the full path


def test_where_selecting_integer_leaf_names_it():
    params = {"kernel": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(ValueError, match=r"step: .*int32.*where="):
        jtree.select(params, ".*", what="pruning")


def test_where_tree_with_other_paths_is_an_error(linen_vars):
    bad = {"Dense_0": {"kernel": True}}
    with pytest.raises(ValueError, match="missing 'params/Dense_0/bias'"):
        jtree.select(linen_vars, bad)


def test_invalid_regex():
    with pytest.raises(ValueError, match="regular expression"):
        jtree.select({"kernel": jnp.ones((2, 2))}, "(")


def test_selected_leaf_missing_from_roles_names_prefix():
    params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
    roles = {"params/Dense_0/kernel": Role("matmul", (0,), (1,))}
    with pytest.raises(ValueError, match=r"(?s)Dense_0/kernel.*missing from roles.*'params/'"):
        jtree.select(params, ".*kernel", roles=roles)


def test_match_paths_names_missing_nearest_and_prefix(linen_vars):
    params = linen_vars["params"]
    with_prefix = {"params": jax.tree.map(lambda x: True, params)}
    with pytest.raises(ValueError) as e:
        jtree.match_paths(params, with_prefix, name="masks")
    msg = str(e.value)
    assert "masks does not match" in msg
    assert "missing 'Dense_0/kernel'" in msg
    assert "nearest given: ['params/Dense_0/kernel'" in msg
    assert "common prefix 'params/'" in msg


def test_match_paths_accepts_flat_dicts_and_reorders():
    tree = {"b": {"x": 1}, "a": 2}
    assert jtree.match_paths(tree, {"b/x": 10, "a": 20}) == [20, 10]


def test_duplicate_paths_rejected():
    with pytest.raises(ValueError, match="share the path"):
        jtree.leaves_with_paths({"a/b": 1, "a": {"b": 2}})


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
class _Halves(jtree.Compressed):
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
    paths = [p for p, _ in jtree.leaves_with_paths(tree)]
    assert paths == ["Dense_0/bias", "Dense_0/kernel"]  # never Dense_0/kernel/data
    assert jc.is_compressed(tree["Dense_0"]["kernel"])
    assert jtree.selected_paths(jtree.select(tree)) == ["Dense_0/kernel"]
    out = jtree.map_with_paths(lambda p, x: jc.is_compressed(x), tree)
    assert out == {"Dense_0": {"bias": False, "kernel": True}}
    # Users pass is_compressed to their own maps; jit and the pytree machinery still see arrays.
    doubled = jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t))(tree)
    assert doubled["Dense_0"]["kernel"].data.dtype == jnp.float16
    assert tree["Dense_0"]["kernel"].ndim == 2 and tree["Dense_0"]["kernel"].size == 8


def test_check_finite_eager_only():
    with pytest.raises(ValueError, match="w: pruning found 2 NaN/Inf"):
        jtree.check_finite("w", jnp.array([1.0, jnp.nan, jnp.inf]), what="pruning")
    jax.jit(lambda x: jtree.check_finite("w", x) or x)(jnp.array([jnp.nan]))  # traced: no check
    jtree.check_finite("i", jnp.array([1, 2]))  # integers are not checked


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
    sel = jtree.select(tree, allow_empty=True)
    for (p, x), (_, s) in zip(jtree.leaves_with_paths(tree), jtree.leaves_with_paths(sel)):
        name = p.rsplit("/", 1)[-1]
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        expected = floating and (
            (name == "kernel" and x.ndim >= 2) or (name == "embedding" and x.ndim == 2)
        )
        assert s == expected, (p, x.dtype, x.shape)
    # A round trip through map_with_paths preserves structure and order.
    back = jtree.map_with_paths(lambda p, x, s: s, tree, sel)
    assert back == sel


def test_match_paths_single_level_nnx_state_gives_values_not_variables():
    """A one-level nnx.State is a Mapping whose keys equal the paths: still unwrap Variables."""
    _, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    plain = nnx.to_pure_dict(state)
    got = jtree.match_paths(plain, state, name="state")
    assert all(isinstance(x, jax.Array) for x in got)
    resolved = jtree.resolve_roles(state, jtree.select(state))
    assert resolved == {"kernel": Role("matmul", contracting=(0,), output=(1,))}


def test_match_paths_flat_dict_of_pytrees():
    """Flat {path: pytree} dicts (statistics per path) are looked up, not flattened."""
    tree = {"a": {"kernel": 1.0}, "b": {"kernel": 2.0}}
    stats = {"a/kernel": (1, 2), "b/kernel": (3, 4)}
    assert jtree.match_paths(tree, stats) == [(1, 2), (3, 4)]


# ------------------------------------------------------------------ selection objects


def test_selection_object_agrees_with_select_and_resolve_roles(linen_vars):
    chosen = jtree.selection(linen_vars)
    assert chosen.mask == jtree.select(linen_vars)
    assert list(chosen.paths) == jtree.selected_paths(jtree.select(linen_vars))
    assert chosen.roles == jtree.resolve_roles(linen_vars, jtree.select(linen_vars))
    assert list(chosen.all_paths) == [p for p, _ in jtree.leaves_with_paths(linen_vars)]
    for path in chosen.paths:
        assert chosen.leaves[path] is dict(jtree.leaves_with_paths(linen_vars))[path]
    narrow = chosen.narrow([chosen.paths[0]])
    assert narrow.paths == chosen.paths[:1] and list(narrow.roles) == [chosen.paths[0]]
    with pytest.raises(ValueError, match="not selected paths"):
        chosen.narrow(["params/LayerNorm_0/scale"])
    empty = jtree.selection(linen_vars, "nothing", allow_empty=True)
    assert empty.paths == () and not any(jax.tree.leaves(empty.mask))


def test_selection_unflatten_nnx_state_gives_plain_values_with_the_same_paths():
    _, state = nnx.split(NnxNet(nnx.Rngs(0)))
    chosen = jtree.selection(state)
    assert chosen.paths == ("l1/kernel", "l2/kernel")
    out = chosen.unflatten({"l1/kernel": 1, "l2/kernel": 2}, default=0)
    leaves = jtree.leaves_with_paths(out)
    assert [p for p, _ in leaves] == list(chosen.all_paths)
    assert dict(leaves) == {p: {"l1/kernel": 1, "l2/kernel": 2}.get(p, 0) for p in chosen.all_paths}
    assert not any(isinstance(x, nnx.Variable) for x in jax.tree.leaves(out))
    with pytest.raises(ValueError, match="not paths of the parameter tree"):
        chosen.unflatten({"l3/kernel": 1})


def test_selection_match_values_and_finite_check():
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.full((2, 2), 2.0)}}
    chosen = jtree.selection(params, "a/kernel")
    assert chosen.match({"a/kernel": 1, "b/kernel": 2}, name="x") == {"a/kernel": 1}
    assert chosen.match({"a/kernel": 3}, name="x") == {"a/kernel": 3}  # the selected paths only
    assert chosen.match(params, name="x")["a/kernel"] is params["a"]["kernel"]
    with pytest.raises(ValueError, match="x does not match"):
        chosen.match({"c/kernel": 1, "b/kernel": 2}, name="x")
    np.testing.assert_array_equal(chosen.values()["a/kernel"], np.ones((2, 2)))
    bad = {"a": {"kernel": jnp.array([[1.0, jnp.nan]])}}
    with pytest.raises(ValueError, match="a/kernel: pruning found 1 NaN/Inf"):
        jtree.selection(bad, what="pruning").check_finite()
    # inside jit nothing is checked (the caller flags it)
    jax.jit(lambda p: jtree.selection(p).check_finite().values()["a/kernel"])(bad)


def test_unwrap_rewrap_round_trip_nnx():
    _, state = nnx.split(NnxNet(nnx.Rngs(0)))
    plain = jtree.unwrap(state)
    assert not any(jtree.is_variable(x) for x in jax.tree.leaves(plain, is_leaf=jtree.is_variable))
    assert jtree.leaves_with_paths(plain) == jtree.leaves_with_paths(state)
    doubled = jax.tree.map(lambda x: 2 * x, plain)
    back = jtree.rewrap(state, doubled)
    variables = jax.tree.leaves(back, is_leaf=jtree.is_variable)
    assert [type(v) for v in variables] == [
        type(v) for v in jax.tree.leaves(state, is_leaf=jtree.is_variable)
    ]
    for (p, x), (q, y) in zip(jtree.leaves_with_paths(back), jtree.leaves_with_paths(state)):
        assert p == q
        np.testing.assert_array_equal(x, 2 * y)
    assert jtree.unwrap(nnx.Param(jnp.ones(2))).shape == (2,)
    with pytest.raises(ValueError, match="missing 'l1/kernel'"):
        jtree.rewrap(state, {"l1/bias": 1}, name="masks")


# ------------------------------------------------------------------ channel-group arithmetic


def _reference_per_channel(x, member, channels, reduce):
    """Slow reference: for each channel, reduce over x's entries at the member's indices."""
    n = x.shape[member.axis]
    out = []
    for c in range(channels):
        idx = member.indices(c, n)
        part = np.take(x, idx, axis=member.axis)
        if member.blocks > 1:
            size = x.shape[member.block_axis] // member.blocks
            b = member.block(c, n)
            part = np.take(part, range(b * size, (b + 1) * size), axis=member.block_axis)
        out.append(reduce(part))
    return np.array(out)


@pytest.mark.parametrize(
    "member,channels,shape",
    [
        (Member("k", 1), 4, (3, 4)),
        (Member("k", 0, offset=2, stride=4), 2, (12, 5)),
        (Member("k", 2, width=2), 3, (2, 3, 6)),
        (Member("k", 2, width=1, blocks=2, block_axis=3), 8, (3, 3, 4, 6)),
    ],
    ids=["plain", "strided", "wide", "grouped-conv"],
)
def test_member_table_reductions_match_a_reference(member, channels, shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    table = jtree.member_table(member, channels, shape)
    want = _reference_per_channel(x * x, member, channels, np.sum)
    np.testing.assert_allclose(jtree.per_channel(x * x, table, np.sum), want, rtol=1e-6)
    got = jtree.per_channel(jnp.asarray(x * x), table, jnp.sum)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)  # NumPy and jax agree
    alive = x > 1.5
    want_alive = _reference_per_channel(alive, member, channels, np.any)
    np.testing.assert_array_equal(jtree.per_channel(alive, table, np.any), want_alive)
    keep = np.arange(channels) % 3 != 1
    mask = np.broadcast_to(np.asarray(jtree.channel_mask(jnp.asarray(keep), table, shape)), shape)
    dropped = [c for c in range(channels) if not keep[c]]
    # a dropped channel's entries are masked, and nothing else is
    removed = ~_reference_per_channel(mask, member, channels, np.all)
    assert np.flatnonzero(removed).tolist() == dropped
    per_block = table.occupied(dropped)
    assert len(per_block) == member.blocks
    n = shape[member.axis]
    for b, indices in enumerate(per_block):
        mine = {i for c in dropped if member.block(c, n) == b for i in member.indices(c, n)}
        assert indices.tolist() == sorted(mine)


def test_member_table_errors_and_group_blocks():
    with pytest.raises(ValueError, match="outside the leaf's shape"):
        jtree.member_table(Member("k", 2), 2, (3, 4))
    with pytest.raises(ValueError, match="does not fit axis 1 of size 4"):
        jtree.member_table(Member("k", 1, offset=2), 4, (3, 4))
    group = Group((Member("k", 0),), size=6, blocks=3)
    assert group.block_of([0, 1, 2, 5]).tolist() == [0, 0, 1, 2]
    assert group.per_block([0, 1, 5]).tolist() == [2, 0, 1]
