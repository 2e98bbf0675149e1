"""Tests of jcompress.structure.low_rank / LowRank against independent NumPy references.

References: the best rank-r approximation from ``np.linalg.svd`` in float64 (Eckart-Young), and
an activation-aware optimum computed through the symmetric square root of the Gram matrix
(``np.linalg.eigh``), not the Cholesky route the library takes.
"""

from __future__ import annotations

import itertools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jcompress.structure import LowRank, low_rank, low_rank_report
from jcompress.tree import Role, is_compressed

DENSE = Role("matmul", contracting=(0,), output=(1,))
STACK = Role("matmul", contracting=(1,), output=(2,), stacked=(0,))
DNUMS = (((1,), (0,)), ((), ()))


def rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def best_rank_r(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(best rank-r approximation, singular values), float64."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], s


def ref_whitened(w: np.ndarray, gram: np.ndarray, r: int, damp: float) -> np.ndarray:
    """argmin over rank-r W' of ``tr((W-W')ᵀ G_d (W-W'))`` via the symmetric root of ``G_d``."""
    g = np.asarray(gram, np.float64)
    g = g + damp * np.mean(np.diag(g)) * np.eye(len(g))
    lam, q = np.linalg.eigh(g)
    root = (q * np.sqrt(lam)) @ q.T
    inv_root = (q / np.sqrt(lam)) @ q.T
    best, _ = best_rank_r(root @ np.asarray(w, np.float64), r)
    return inv_root @ best


def kernel_of(tree, path="Dense_0/kernel"):
    node = tree
    for k in path.split("/"):
        node = node[k]
    return node


# ----------------------------------------------------------------------------------------------
# Plain SVD: Eckart-Young, energy, worth
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,r", [((48, 32), 5), ((32, 48), 12), ((13, 40), 3)])
def test_rank_r_is_the_best_rank_r_approximation(shape, r, strict):
    w = rand(shape, 1)
    with strict():
        lr = low_rank({"Dense_0": {"kernel": jnp.asarray(w)}}, rank=r)["Dense_0"]["kernel"]
    assert isinstance(lr, LowRank) and lr.rank == r
    assert lr.a.shape == (shape[0], r) and lr.b.shape == (r, shape[1])
    best, s = best_rank_r(w, r)
    got = np.asarray(lr.dequantize(), np.float64)
    err2 = np.sum((w - got) ** 2)
    np.testing.assert_allclose(err2, np.sum(s[r:] ** 2), rtol=1e-4)
    np.testing.assert_allclose(got, best, atol=2e-5 * np.abs(w).max())
    again = low_rank({"Dense_0": {"kernel": jnp.asarray(w)}}, rank=r)["Dense_0"]["kernel"]
    np.testing.assert_array_equal(np.asarray(again.a), np.asarray(lr.a))  # deterministic


def test_bfloat16_kernel_keeps_its_dtype(strict):
    w = rand((48, 32), 17)
    wb = jnp.asarray(w, jnp.bfloat16)
    with strict():
        lr = low_rank({"Dense_0": {"kernel": wb}}, rank=6)["Dense_0"]["kernel"]
    assert (
        lr.a.dtype == lr.b.dtype == lr.dequantize().dtype == jnp.bfloat16 and lr.dtype == wb.dtype
    )
    assert lr.nbytes == 6 * (48 + 32) * 2
    best, _ = best_rank_r(np.asarray(wb, np.float32), 6)
    got = np.asarray(lr.dequantize(), np.float64)
    np.testing.assert_allclose(got, best, atol=2e-2 * np.abs(best).max())


def test_stacked_energy_takes_the_largest_slice_rank():
    rng = np.random.default_rng(18)
    u, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    v, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    spectra = [np.r_[10.0, 1e-3 * np.ones(31)], np.r_[10.0, 9.0, 8.0, 1e-3 * np.ones(29)]]
    w = np.stack([(u * s) @ v.T for s in spectra]).astype(np.float32)
    out = low_rank({"w": jnp.asarray(w)}, energy=0.99, roles={"w": STACK})["w"]
    assert out.rank == 3 and out.a.shape == (2, 32, 3)
    for i in range(2):  # slice 0's tail is degenerate: compare errors, not matrices
        err2 = np.sum((w[i] - np.asarray(out[i].dequantize(), np.float64)) ** 2)
        np.testing.assert_allclose(err2, np.sum(spectra[i][3:] ** 2), rtol=1e-2)


def test_energy_picks_the_smallest_rank_reaching_it():
    # singular values 10, 8, ..., known exactly: W = U diag(s) Vᵀ
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    s = np.array([10, 8, 6, 4, 2] + [0.5] * 25, np.float64)
    w = (u[:, :30] * s) @ v.T
    cum = np.cumsum(s**2) / np.sum(s**2)
    params = {"Dense_0": {"kernel": jnp.asarray(w, jnp.float32)}}
    for energy in (0.3, 0.5, float(cum[2]) + 1e-4, 0.9, 0.95):
        want = int(np.argmax(cum >= energy)) + 1
        out = kernel_of(low_rank(params, energy=energy))
        if want * 70 < 1200:
            assert isinstance(out, LowRank) and out.rank == want, energy
            assert cum[want - 1] >= energy and (want == 1 or cum[want - 2] < energy)
        else:
            assert not is_compressed(out)


def test_layer_not_worth_factorizing_stays_dense_and_is_reported():
    w_small = jnp.asarray(rand((8, 8), 3))
    w_big = jnp.asarray(rand((64, 48), 4))
    params = {"a": {"kernel": w_big}, "b": {"kernel": w_small}, "b2": {"bias": jnp.zeros(8)}}
    out = low_rank(params, rank=4)  # 4·16 = 64 = 8·8: no saving for b
    assert out["b"]["kernel"] is w_small and out["b2"]["bias"] is params["b2"]["bias"]
    assert isinstance(out["a"]["kernel"], LowRank)
    rep = low_rank_report(params, out)
    assert [x.path for x in rep.layers] == ["a/kernel", "b/kernel"]
    a, b = rep.layers
    assert (a.rank, a.params, a.params_after) == (4, 64 * 48, 4 * (64 + 48))
    assert (a.flops, a.flops_after) == (64 * 48, 4 * 112)
    assert (a.nbytes, a.nbytes_after) == (64 * 48 * 4, 4 * 112 * 4)
    assert b.rank is None and b.params_after == 64 and "r < 4.0" in b.reason
    assert rep.params == 64 * 48 + 64 and rep.params_after == 4 * 112 + 64
    assert set(rep.dense) == {"b/kernel"} and "b/kernel" in str(rep)
    # energy=1 needs full rank: never worth it
    assert kernel_of(low_rank(params, energy=1.0), "a/kernel") is w_big


def test_rank_rules_first_match_wins_and_none_keeps_dense():
    params = {f"Dense_{i}": {"kernel": jnp.asarray(rand((32, 32), i))} for i in range(3)}
    out = low_rank(params, rank=[("Dense_0/.*", 3), ("Dense_[01]/.*", 5), ("Dense_2/.*", None)])
    assert out["Dense_0"]["kernel"].rank == 3 and out["Dense_1"]["kernel"].rank == 5
    assert out["Dense_2"]["kernel"] is params["Dense_2"]["kernel"]
    out = low_rank(params, rank={"Dense_1/kernel": 2})
    assert out["Dense_1"]["kernel"].rank == 2 and not is_compressed(out["Dense_0"]["kernel"])


# ----------------------------------------------------------------------------------------------
# Whitened (activation-aware) SVD
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def correlated():
    rng = np.random.default_rng(5)
    n, k, m = 512, 32, 24
    scales = np.ones(k)
    scales[:3] = 25.0  # a few high-variance channels
    mix = np.eye(k) + 0.3 * rng.standard_normal((k, k))
    x = ((rng.standard_normal((n, k)) * scales) @ mix).astype(np.float32)
    w = rng.standard_normal((k, m)).astype(np.float32)
    gram = x.astype(np.float64).T @ x
    return x, w, gram


def _stats(gram):
    from types import SimpleNamespace

    return SimpleNamespace(gram=jnp.asarray(gram, jnp.float32))


@pytest.mark.parametrize("r", [2, 6])
def test_whitened_svd_minimises_output_error(correlated, r, strict):
    x, w, gram = correlated
    params = {"Dense_0": {"kernel": jnp.asarray(w)}}
    stats = {"Dense_0/kernel": _stats(gram)}
    damp = 1e-4
    with strict():
        white = kernel_of(low_rank(params, rank=r, stats=stats, damp=damp)).dequantize()
        plain = kernel_of(low_rank(params, rank=r)).dequantize()
    ref = ref_whitened(w, gram, r, damp)
    x64 = x.astype(np.float64)

    def out_err(wh):
        return np.linalg.norm(x64 @ (w - np.asarray(wh, np.float64)))

    assert out_err(white) < 0.8 * out_err(plain)
    np.testing.assert_allclose(out_err(white), out_err(ref), rtol=2e-3)
    np.testing.assert_allclose(np.asarray(white), ref, atol=2e-3 * np.abs(ref).max())


def test_whitened_stacked_and_capture_layout():
    import jcompress.runtime as runtime

    x = jnp.asarray(rand((64, 16), 6))
    w = jnp.asarray(rand((3, 16, 16), 7))
    params = {"w": w}

    def fn(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p["w"][i])
        return x

    def scan_fn(p, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, p["w"])[0]

    stats = runtime.capture(scan_fn, params, x, gram=True)
    assert stats["w"].gram.shape == (3, 16, 16)
    out = low_rank(params, rank=3, roles={"w": STACK}, stats=stats)["w"]
    assert out.a.shape == (3, 16, 3)
    # each slice equals a 2-D whitened factorization with its own Gram matrix
    for i in range(3):
        one = low_rank(
            {"w": w[i]}, rank=3, roles={"w": DENSE}, stats={"w": _stats(stats["w"].gram[i])}
        )["w"]
        np.testing.assert_allclose(
            np.asarray(out[i].dequantize()), np.asarray(one.dequantize()), rtol=1e-5, atol=1e-5
        )
    # the compressed model runs through the runtime and matches the dequantized one
    got = runtime.compressed(scan_fn)({"w": out}, x)
    ref = scan_fn({"w": out.dequantize()}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    del fn


def test_zero_inputs_fall_back_to_plain_svd():
    w = jnp.asarray(rand((16, 16), 8))
    params = {"Dense_0": {"kernel": w}}
    zero = {"Dense_0/kernel": _stats(np.zeros((16, 16)))}
    got = kernel_of(low_rank(params, rank=3, stats=zero)).dequantize()
    want = kernel_of(low_rank(params, rank=3)).dequantize()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# LowRank: dot_general, dequantize, jit, vmap, scan, nbytes
# ----------------------------------------------------------------------------------------------


def _lr(layer_shape, contracting, r, stacked=(), dtype=jnp.float32, seed=0):
    k = int(np.prod([layer_shape[c] for c in contracting]))
    n = int(np.prod(layer_shape)) // k
    a = jnp.asarray(rand((*stacked, k, r), seed), dtype)
    b = jnp.asarray(rand((*stacked, r, n), seed + 1), dtype)
    out = tuple(d for d in range(len(layer_shape)) if d not in contracting)
    return LowRank(a, b, dtype=dtype, layer_shape=layer_shape, contracting=contracting, output=out)


# (layer_shape, contracting, stacked, x shape, dimension numbers with the weight on the right)
CASES = {
    "dense": ((16, 12), (0,), (), (5, 16), DNUMS),
    "dense_3d_x": ((16, 12), (0,), (), (2, 5, 16), (((2,), (0,)), ((), ()))),
    "transposed_use": ((16, 12), (0,), (), (5, 12), (((1,), (1,)), ((), ()))),
    "attn_in": ((16, 4, 3), (0,), (), (2, 5, 16), (((2,), (0,)), ((), ()))),
    "attn_out": ((4, 3, 16), (0, 1), (), (2, 5, 4, 3), (((2, 3), (0, 1)), ((), ()))),
    "attn_out_swapped": ((4, 3, 16), (0, 1), (), (2, 3, 4), (((1, 2), (1, 0)), ((), ()))),
    "eqx_out_in": ((12, 16), (1,), (), (5, 16), (((1,), (1,)), ((), ()))),
    "stacked_batch": ((16, 12), (0,), (3,), (3, 5, 16), (((2,), (1,)), ((0,), (0,)))),
    "stacked_batch_last": ((16, 12), (0,), (3,), (5, 16, 3), (((1,), (1,)), ((2,), (0,)))),
    "fallback_partial": ((4, 3, 16), (0, 1), (), (5, 4), (((1,), (0,)), ((), ()))),
    "fallback_stacked_free": ((16, 12), (0,), (3,), (5, 16), (((1,), (1,)), ((), ()))),
}


BF16_CASES = ("dense", "attn_out", "stacked_batch", "fallback_partial")


def np_dot_general(lhs, rhs, dimension_numbers):
    """``lax.dot_general`` in NumPy float64 through ``einsum`` (batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    ls = [next(letters) for _ in range(lhs.ndim)]
    rs = [next(letters) for _ in range(rhs.ndim)]
    for i, j in [*zip(lc, rc), *zip(lb, rb)]:
        rs[j] = ls[i]
    out = [ls[i] for i in lb]
    out += [ls[i] for i in range(lhs.ndim) if i not in lc and i not in lb]
    out += [rs[j] for j in range(rhs.ndim) if j not in rc and j not in rb]
    spec = f"{''.join(ls)},{''.join(rs)}->{''.join(out)}"
    return np.einsum(spec, np.asarray(lhs, np.float64), np.asarray(rhs, np.float64))


@pytest.mark.parametrize(
    "name,dtype",
    [(n, jnp.float32) for n in CASES] + [(n, jnp.bfloat16) for n in BF16_CASES],
)
def test_dot_general_equals_dequantized_matmul(name, dtype, strict):
    layer_shape, contracting, stacked, xshape, dn = CASES[name]
    lr = _lr(layer_shape, contracting, 3, stacked, dtype)
    x = jnp.asarray(rand(xshape, 9), dtype)
    (xc, wc), (xb, wb) = dn
    dn_left = ((wc, xc), (wb, xb))
    w = np.asarray(lr.dequantize(), np.float64)
    want_right = np_dot_general(x, w, dn)
    want_left = np_dot_general(w, x, dn_left)

    @jax.jit
    def run(lr, x):
        with strict():
            return (
                lr.dot_general(x, dn, mode="weight_only"),
                lr.dot_general(x, dn_left, weight_is_rhs=False),
                lr.dot_general(x, dn, preferred_element_type=jnp.float32),
                lr.dot_general(x, dn_left, weight_is_rhs=False, preferred_element_type=jnp.float32),
            )

    tol = (1e-5 if dtype == jnp.float32 else 3e-2) * np.abs(want_right).max()
    outs = run(lr, x)
    for got, want, out_dtype in zip(
        outs, [want_right, want_left] * 2, [dtype, dtype, jnp.float32, jnp.float32]
    ):
        assert got.shape == want.shape and got.dtype == out_dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol)


def test_fast_path_uses_two_thin_matmuls_and_fallback_one():
    lr = _lr((64, 48), (0,), 4)
    x = jnp.ones((8, 64))
    fast = jax.make_jaxpr(lambda lr, x: lr.dot_general(x, DNUMS))(lr, x)
    shapes = [e.outvars[0].aval.shape for e in fast.eqns if e.primitive.name == "dot_general"]
    assert shapes == [(8, 4), (8, 48)]
    slow = jax.make_jaxpr(lambda lr, x: lr.dot_general(x[:, :4], (((1,), (0,)), ((), ()))))
    lr3 = _lr((4, 16, 48), (0, 1), 4)
    dots = [e for e in slow(lr3, x).eqns if e.primitive.name == "dot_general"]
    assert [d.outvars[0].aval.shape for d in dots][-1] == (8, 16, 48)


def test_jit_equals_eager_and_no_recompilation():
    lr = _lr((16, 4, 3), (0,), 3)
    x = jnp.asarray(rand((2, 5, 16), 10))
    dn = (((2,), (0,)), ((), ()))

    @jax.jit
    def f(lr, x):
        return lr.dot_general(x, dn), lr.dequantize()

    y1, w1 = f(lr, x)
    y2, _ = f(_lr((16, 4, 3), (0,), 3, seed=5), x + 1)
    assert f._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(lr.dot_general(x, dn)))
    np.testing.assert_array_equal(np.asarray(w1), np.asarray(lr.dequantize()))
    assert w1.shape == (16, 4, 3) and not np.array_equal(np.asarray(y1), np.asarray(y2))


def test_stacked_vmap_scan_and_indexing():
    lr = _lr((16, 12), (0,), 3, stacked=(4,))
    assert lr.shape == (4, 16, 12) and lr[1].shape == (16, 12) and lr[1:3].shape == (2, 16, 12)
    x = jnp.asarray(rand((4, 5, 16), 11))
    dense = lr.dequantize()
    via_vmap = jax.vmap(lambda layer, xi: layer.dot_general(xi, DNUMS))(lr, x)
    np.testing.assert_allclose(
        np.asarray(via_vmap), np.asarray(jnp.einsum("lbi,lio->lbo", x, dense)), atol=1e-4
    )

    def body(h, layer):
        return layer.dot_general(h, DNUMS)[:, :12] @ jnp.ones((12, 16)), None

    h = jax.lax.scan(body, x[0], lr)[0]
    ref = x[0]
    for i in range(4):
        ref = (ref @ dense[i])[:, :12] @ jnp.ones((12, 16))
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref), rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(lr[2].dequantize()), np.asarray(dense[2]))
    with pytest.raises(IndexError, match="stacked"):
        lr[0, 0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shape_dtype_nbytes(dtype):
    lr = _lr((6, 5, 7), (0,), 2, stacked=(3,), dtype=dtype)
    item = np.dtype(dtype).itemsize
    assert lr.shape == (3, 6, 5, 7) and lr.dtype == dtype and lr.ndim == 4
    assert lr.nbytes == (3 * 6 * 2 + 3 * 2 * 35) * item
    assert lr.dequantize().dtype == dtype
    leaves, treedef = jax.tree.flatten(lr)
    assert len(leaves) == 2
    assert jax.tree.unflatten(treedef, leaves).shape == lr.shape


def test_lowrank_constructor_checks():
    with pytest.raises(ValueError, match="do not chain"):
        LowRank(jnp.ones((4, 2)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="flattens to"):
        LowRank(jnp.ones((4, 2)), jnp.ones((2, 5)), layer_shape=(2, 3, 5), contracting=(0,))
    with pytest.raises(TypeError, match="floating"):
        LowRank(jnp.ones((4, 2), jnp.int32), jnp.ones((2, 5)))


# ----------------------------------------------------------------------------------------------
# Real layouts: linen MLP, attention DenseGeneral, nn.scan, nnx, Equinox
# ----------------------------------------------------------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(32)(x)), None


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(x)
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = scan()(x, None)
        return nn.Dense(32)(x)


@pytest.fixture(scope="module")
def net():
    model = _Net()
    x = jnp.asarray(rand((2, 6, 32), 12))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    return model, x, params


def test_real_flax_layouts(net, strict):
    import jcompress.runtime as runtime

    model, x, params = net

    def fn(p, x):
        return model.apply({"params": p}, x)

    roles = runtime.roles(fn, params, x)
    assert roles["Scan_Block_0/Dense_0/kernel"].stacked == (0,)
    with strict():
        out = low_rank(params, rank=4, roles=roles)
    attn = out["MultiHeadDotProductAttention_0"]
    assert attn["query"]["kernel"].b.shape == (4, 32) and attn["query"]["kernel"].shape == (
        32,
        4,
        8,
    )
    assert attn["out"]["kernel"].a.shape == (32, 4)
    assert out["Scan_Block_0"]["Dense_0"]["kernel"].a.shape == (3, 32, 4)
    dense = jax.tree.map(
        lambda v: v.dequantize() if is_compressed(v) else v, out, is_leaf=is_compressed
    )
    for path, leaf in [("Scan_Block_0/Dense_0/kernel", None), ("Dense_0/kernel", None)]:
        w = np.asarray(kernel_of(params, path))
        got = np.asarray(kernel_of(dense, path))
        for i, wi in enumerate(w if w.ndim == 3 else [w]):
            best, _ = best_rank_r(wi, 4)
            np.testing.assert_allclose(got[i] if w.ndim == 3 else got, best, atol=1e-4)
        del leaf
    # the query kernel (32, 4, 8) is factored as (32, 32)
    q = np.asarray(params["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    best, _ = best_rank_r(q.reshape(32, 32), 4)
    np.testing.assert_allclose(
        np.asarray(dense["MultiHeadDotProductAttention_0"]["query"]["kernel"]),
        best.reshape(32, 4, 8),
        atol=1e-4,
    )
    got = runtime.compressed(fn)(out, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(fn(dense, x)), atol=1e-4)


def test_nnx_state_and_equinox_layouts(strict):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(32, 24, rngs=rngs)

    # abstract init, then concrete values: no random-init compiles
    _, state = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
    state = jax.tree.map(lambda s: jnp.asarray(rand(s.shape, 15)), state)
    out = low_rank(state, rank=3)
    assert isinstance(out, nnx.State)
    lr = out["l1"]["kernel"].get_value()
    assert isinstance(lr, LowRank) and lr.shape == (32, 24)
    assert not is_compressed(out["l1"]["bias"].get_value())

    shapes = eqx.filter_eval_shape(eqx.nn.Linear, 32, 24, key=jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.asarray(rand(s.shape, 16)), shapes)
    roles = {"weight": Role("matmul", contracting=(1,), output=(0,))}
    with strict():
        fac = low_rank(params, rank=3, where="weight", roles=roles)
    assert fac.weight.a.shape == (32, 3) and fac.weight.shape == (24, 32)
    best, _ = best_rank_r(np.asarray(params.weight), 3)
    np.testing.assert_allclose(np.asarray(fac.weight.dequantize()), best, atol=1e-4)
    x = jnp.ones((2, 32))
    np.testing.assert_allclose(
        np.asarray(fac.weight.dot_general(x, (((1,), (1,)), ((), ())))),
        np.asarray(x @ fac.weight.dequantize().T),
        atol=1e-4,
    )


def test_conv_selected_explicitly_is_left_dense_with_a_reason():
    params = {"Conv_0": {"kernel": jnp.asarray(rand((3, 3, 16, 32), 13))}}
    out = low_rank(params, rank=2, where=".*kernel")
    assert out["Conv_0"]["kernel"] is params["Conv_0"]["kernel"]
    rep = low_rank_report(params, out, where=".*kernel")
    assert "kind 'conv'" in rep.dense["Conv_0/kernel"]
    # stacked axes that do not lead (nn.scan with variable_axes={"params": 1}): left dense
    w = jnp.asarray(rand((16, 3, 16), 19))
    roles = {"w": Role("matmul", contracting=(0,), output=(2,), stacked=(1,))}
    assert low_rank({"w": w}, rank=2, roles=roles)["w"] is w
    rep = low_rank_report({"w": w}, {"w": w}, roles=roles)
    assert "do not lead" in rep.dense["w"] and rep.params_after == rep.params == w.size


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({}, ValueError, "exactly one of rank= .* and energy="),
        ({"rank": 2, "energy": 0.5}, ValueError, "exactly one"),
        ({"energy": 0.0}, ValueError, r"outside \(0, 1\]"),
        ({"energy": 1.5}, ValueError, r"outside \(0, 1\]"),
        ({"energy": float("nan")}, ValueError, r"outside \(0, 1\]"),
        ({"energy": "0.5"}, TypeError, "energy must be a float"),
        ({"rank": 0}, ValueError, "positive int"),
        ({"rank": -3}, ValueError, "positive int"),
        ({"rank": True}, ValueError, "positive int"),
        ({"rank": 2.5}, ValueError, "positive int"),
        ({"rank": [("a/.*", 0)]}, ValueError, "rule 'a/.*'"),
        ({"rank": ["a"]}, TypeError, "pairs"),
        ({"rank": [("(", 2)]}, ValueError, "not a valid regex"),
        ({"rank": 2, "damp": -1.0}, ValueError, "damp"),
        ({"rank": 2, "stats": {}}, ValueError, "a/kernel: .*no statistics"),
        ({"rank": 2, "stats": {"a/kernel": object()}}, ValueError, "gram=True"),
        ({"rank": 2, "where": "nothing"}, ValueError, "selects no leaf"),
    ],
)
def test_bad_input_raises(kwargs, err, match):
    params = {"a": {"kernel": jnp.ones((16, 16))}}
    with pytest.raises(err, match=match):
        low_rank(params, **kwargs)


def test_bad_values_raise_naming_the_path():
    w = jnp.asarray(rand((16, 16), 14)).at[2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match="a/kernel: low_rank found 1 NaN/Inf"):
        low_rank({"a": {"kernel": w}}, rank=2)
    good = {"a": {"kernel": jnp.ones((16, 16))}}
    with pytest.raises(ValueError, match=r"a/kernel: .*shape \(8, 8\), expected \(16, 16\)"):
        low_rank(good, rank=2, stats={"a/kernel": _stats(np.eye(8))})
    bad_gram = np.eye(16)
    bad_gram[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"a/kernel: .*NaN/Inf"):
        low_rank(good, rank=2, stats={"a/kernel": _stats(bad_gram)})
    with pytest.raises(ValueError, match="not positive definite"):
        low_rank(good, rank=2, stats={"a/kernel": _stats(-np.eye(16))})
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda p: low_rank(p, rank=2)["a"]["kernel"].a)(good)


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------

SHAPES = st.sampled_from([(8, 8), (13, 32), (32, 13), (32, 32)])


@given(shape=SHAPES, seed=st.integers(0, 2**16), scale=st.sampled_from([0.0, 1e-20, 1.0, 1e15]))
@settings()
def test_property_eckart_young_and_monotone_error(shape, seed, scale):
    k, n = shape
    w = rand((k, n), seed) * np.float32(scale)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    params = {"Dense_0": {"kernel": jnp.asarray(w)}}
    errs = []
    r_max = (k * n - 1) // (k + n)
    for r in sorted({1, max(1, r_max // 2), r_max}):
        lr = kernel_of(low_rank(params, rank=r))
        assert isinstance(lr, LowRank) and lr.rank == r
        got = np.asarray(lr.dequantize(), np.float64)
        assert np.all(np.isfinite(got))
        err2 = np.sum((w.astype(np.float64) - got) ** 2)
        tail = np.sum(s[r:] ** 2)
        assert abs(err2 - tail) <= 1e-4 * tail + 1e-10 * np.sum(s**2)
        errs.append(err2)
    assert all(b <= a * (1 + 1e-5) for a, b in itertools.pairwise(errs))
    # one past the break-even rank: dense
    assert kernel_of(low_rank(params, rank=r_max + 1)) is params["Dense_0"]["kernel"]


@given(shape=SHAPES, seed=st.integers(0, 2**16), energy=st.floats(0.05, 1.0))
@settings()
def test_property_energy_rank_is_smallest(shape, seed, energy):
    k, n = shape
    w = rand((k, n), seed)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    assume(np.min(np.abs(cum - energy)) > 1e-4)  # float32 SVD vs float64: no boundary cases
    want = int(np.argmax(cum >= energy)) + 1
    out = kernel_of(low_rank({"Dense_0": {"kernel": jnp.asarray(w)}}, energy=energy))
    if want * (k + n) < k * n:
        assert isinstance(out, LowRank) and out.rank == want
    else:
        assert not is_compressed(out)


@given(seed=st.integers(0, 2**16), r=st.sampled_from([1, 3]), zero=st.booleans())
@settings()
def test_property_whitened_never_worse_on_output(seed, r, zero):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 13)) * rng.choice([0.1, 1.0, 30.0], 13)
    if zero:
        x[:, :4] = 0.0  # dead inputs: a singular Gram matrix, rescued by damp
    w = rng.standard_normal((13, 8)).astype(np.float32)
    gram = x.T @ x
    params = {"Dense_0": {"kernel": jnp.asarray(w)}}
    white = kernel_of(low_rank(params, rank=r, stats={"Dense_0/kernel": _stats(gram)}, damp=1e-3))
    plain = kernel_of(low_rank(params, rank=r))

    def out_err(lr):
        return np.linalg.norm(x @ (w - np.asarray(lr.dequantize(), np.float64)))

    assert out_err(white) <= out_err(plain) * (1 + 1e-3) + 1e-4 * np.linalg.norm(x @ w)


def test_checkpoint_round_trip(tmp_path):
    import jcompress.checkpoint as checkpoint

    tree = {
        "attn": {"kernel": _lr((4, 3, 16), (0, 1), 2, dtype=jnp.bfloat16)},
        "scan": {"kernel": _lr((16, 12), (0,), 3, stacked=(3,))},
        "bias": jnp.ones(3),
    }
    checkpoint.save(tmp_path / "ckpt", tree)
    back = checkpoint.load(tmp_path / "ckpt")
    for key in ("attn", "scan"):
        got, want = back[key]["kernel"], tree[key]["kernel"]
        assert isinstance(got, LowRank) and repr(got) == repr(want)
        assert got.layer_shape == want.layer_shape and got.output == want.output
        np.testing.assert_array_equal(np.asarray(got.a), np.asarray(want.a))
        np.testing.assert_array_equal(np.asarray(got.b), np.asarray(want.b))
