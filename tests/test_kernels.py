"""The QArray matmul kernels: static activation steps in mode="int8" (calibrated W8A8)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from test_lowrank import np_dot_general
from test_runtime_compressed import LAYOUTS, SPECS, _dequantize, _quant, _quantize_tree
from test_runtime_roles import Stack

from jcompress.quantization import _dispatch, _kernels
from jcompress.quantization._qarray import GroupMajor, OutMajor, QArray, widen
from jcompress.runtime import compressed, explain, roles
from jcompress.runtime._explain import FUSED, INTEGER_DOT
from jcompress.tree import Role, is_compressed

DENSE = LAYOUTS["dense"][1]
DN = (((1,), (0,)), ((), ()))


def _with_step(q: QArray, step) -> QArray:
    """``q`` carrying the static activation step ``step`` (broadcastable, float32)."""
    a = jnp.asarray(step, jnp.float32)
    a = a.reshape(a.shape + (1,) * (len(q.shape) - a.ndim))
    return QArray(q.values, q.scale, q.zero_point, a, bits=q.bits, dtype=q.dtype)


KERNEL = jax.jit(_kernels.dot_general, static_argnums=2, static_argnames=("weight_is_rhs", "mode"))


def _fake_quant(x, a):
    """The NumPy reference of the static activation quantization: ``clip(round(x/a))``, int."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round(x / np.float32(a)), -127, 127).astype(np.int64)


def _int_reference(q: QArray, x, a) -> np.ndarray:
    """Dense layout: integer matmul of the quantized activations and ``values - zero_point``,
    rescaled by ``a·scale`` group by group (independent of the kernel's layout handling)."""
    v = np.asarray(q.values.astype(jnp.int8), np.int64)
    s = np.asarray(q.scale, np.float64)
    z = np.zeros_like(s, np.int64) if q.zero_point is None else np.asarray(q.zero_point, np.int64)
    k, n = v.shape
    g = k // s.shape[0]
    qx = _fake_quant(x, a)
    out = np.zeros((qx.shape[0], n))
    for j in range(s.shape[0]):  # per group (one group: per channel)
        rows = slice(j * g, (j + 1) * g)
        acc = qx[:, rows] @ (v[rows] - z[j])
        out += acc * s[j] * np.float64(np.float32(a))
    return out


# ------------------------------------------------------------------------------------------------
# Static activation steps
# ------------------------------------------------------------------------------------------------


def _fake_quant_lhs(x, steps, stacked: bool):
    """``clip(round(x/a))·a`` with one step per stacked slice (lhs axis 0) or one in all."""
    if stacked:
        return np.stack([_fake_quant(x[i], a) * a for i, a in enumerate(steps)])
    return _fake_quant(x, steps[0]) * steps[0]


@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    spec=st.sampled_from(range(len(SPECS))),
    step=st.sampled_from([1e-3, 0.01, 0.02, 0.1, 1e3]),  # 1e-3 and 0.01 saturate most inputs
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 3),
)
def test_static_equals_reference(layout, spec, step, dtype, seed):
    """Every layout: ``(clip(round(x/a))·a) @ dequantize(w)``; stacked: one step per layer;
    the dense layout also against an integer matmul in NumPy."""
    wshape, role, xshape, dn, rhs = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    steps = np.float32([step, 2 * step])[: 2 if role.stacked else 1]
    q = _with_step(_quant(rng.standard_normal(wshape), role, **SPECS[spec]), steps)
    x = jnp.asarray(rng.standard_normal(xshape), dtype)
    xq = _fake_quant_lhs(np.asarray(x, np.float32), steps, bool(role.stacked))
    w = q.dequantize()
    ops = (xq, w) if rhs else (w, xq)
    ref = np.asarray(lax.dot_general(*(jnp.asarray(o, jnp.float32) for o in ops), dn))
    got = KERNEL(q, x, dn, weight_is_rhs=rhs, mode="int8")
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    tol = 1e-5 * np.abs(ref).max() + 1e-30
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=tol)
    if layout == "dense":
        exact = _int_reference(q, np.asarray(x, np.float32), steps[0])
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=tol)


def test_static_jit_equals_eager(strict):
    wshape, role, xshape, dn, rhs = LAYOUTS["qkv"]
    rng = np.random.default_rng(0)
    q = _with_step(_quant(rng.standard_normal(wshape), role, **SPECS[3]), 0.02)
    x = jnp.asarray(rng.standard_normal(xshape), jnp.float32)
    with strict():
        got = KERNEL(q, x, dn, weight_is_rhs=rhs, mode="int8")
        eager = _kernels.dot_general(q, x, dn, weight_is_rhs=rhs, mode="int8")
    np.testing.assert_allclose(eager, got, rtol=1e-6, atol=1e-6 * np.abs(got).max())


def test_static_equals_dynamic_for_one_row_at_its_absmax():
    rng = np.random.default_rng(0)
    for spec in (SPECS[0], SPECS[3]):
        q = _quant(rng.standard_normal((16, 5)), DENSE, **spec)
        x = rng.standard_normal((1, 16)).astype(np.float32)
        step = np.float32(np.abs(x).max()) / np.float32(127.0)
        dn = (((1,), (0,)), ((), ()))
        dynamic = KERNEL(q, x, dn, mode="int8")
        static = KERNEL(_with_step(q, step), x, dn, mode="int8")
        np.testing.assert_allclose(static, dynamic, rtol=1e-6, atol=1e-6)


def test_static_saturates_and_weight_only_ignores_the_step():
    q = _quant(np.eye(4, dtype=np.float32), DENSE)
    qs = _with_step(q, 0.01)  # the representable range is +-1.27
    x = jnp.array([[0.5, -0.5, 3.0, -100.0]])
    dn = (((1,), (0,)), ((), ()))
    got = KERNEL(qs, x, dn, mode="int8")
    np.testing.assert_allclose(got, [[0.5, -0.5, 1.27, -1.27]], rtol=1e-6)
    dynamic = KERNEL(q, x, dn, mode="int8")  # per-token range: no saturation
    np.testing.assert_allclose(dynamic[0, 2:], [3.0, -100.0], atol=100 / 254)
    for mode in ("weight_only", "limbs", "dequantize"):
        np.testing.assert_allclose(KERNEL(qs, x, dn, mode=mode), x, atol=1e-4)


def test_static_nonfinite_rows_and_steps_give_nan():
    q = _with_step(_quant(np.ones((4, 2)), DENSE), 0.05)
    x = jnp.array([[1.0, jnp.inf, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [jnp.nan, 0, 0, 0]])
    dn = (((1,), (0,)), ((), ()))
    got = np.asarray(KERNEL(q, x, dn, mode="int8"))
    assert np.all(np.isnan(got[[0, 2]])) and np.allclose(got[1], 1.0)
    for bad in (0.0, -1.0, np.nan, np.inf):
        assert np.all(np.isnan(KERNEL(_with_step(q, bad), x[1:2], dn, mode="int8")))


def test_static_stacked_under_vmap_and_scan():
    """A stacked QArray with per-layer steps, split by ``vmap`` and by ``lax.scan``."""
    wshape, role, _, _, _ = LAYOUTS["stacked"]
    rng = np.random.default_rng(1)
    steps = np.array([0.004, 0.05], np.float32)
    q = _with_step(_quant(rng.standard_normal(wshape), role), steps)
    assert q.act_scale.shape == (2, 1, 1)
    x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    layer = lambda q, x: _kernels.dot_general(q, x, dn, mode="int8")
    w = np.asarray(q.dequantize())
    ref = np.stack([_fake_quant(x, steps[i]) * steps[i] @ w[i] for i in range(2)])
    mapped = jax.jit(jax.vmap(layer, in_axes=(0, None)))(q, x)
    scanned = jax.jit(lambda q, x: lax.scan(lambda c, qi: (c, layer(qi, x)), 0, q)[1])(q, x)
    for got in (mapped, scanned):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the steps are per layer: layer 0 with layer 1's step differs (0.004 saturates)
    assert not np.allclose(ref[0], _fake_quant(x, steps[1]) * steps[1] @ w[0], atol=1e-2)


def test_static_per_channel_step_is_an_error():
    q = _quant(np.ones((4, 3)), DENSE)
    dn = (((1,), (0,)), ((), ()))
    per_in = QArray(q.values, q.scale, None, jnp.ones((4, 1)), bits=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="per-input-channel static activation steps"):
        _kernels.dot_general(per_in, jnp.ones((1, 4)), dn, mode="int8")
    per_out = QArray(q.values, q.scale, None, jnp.ones((1, 3)), bits=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="size 1 on every axis except stacked"):
        _kernels.dot_general(per_out, jnp.ones((1, 4)), dn, mode="int8")
    # the weight-only path ignores act_scale entirely
    np.testing.assert_allclose(_kernels.dot_general(per_in, jnp.ones((1, 4)), dn), 4.0)
    with pytest.raises(ValueError, match=r"^w: .*per-input-channel"):
        compressed(lambda p, x: x @ p["w"], mode="int8")({"w": per_in}, jnp.ones((1, 4)))


def test_static_scan_stack_model_and_explain():
    """An ``nn.scan`` stack through ``compressed(mode="int8")`` with one step per layer."""
    model = Stack(features=8)
    x = jax.random.normal(jax.random.key(1), (2, 8))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)
    role_map = roles(fn, params, x)
    steps = np.array([0.01, 0.005, 0.02], np.float32)
    k = params["layers"]["Dense_0"]["kernel"]
    q = {
        "layers": {
            "Dense_0": {
                "kernel": _with_step(_quant(k, role_map["layers/Dense_0/kernel"]), steps),
                "bias": params["layers"]["Dense_0"]["bias"],
            }
        }
    }
    run = compressed(fn, mode="int8")
    got = run(q, x)
    w = np.asarray(q["layers"]["Dense_0"]["kernel"].dequantize())
    b = np.asarray(q["layers"]["Dense_0"]["bias"])
    h = np.asarray(x)
    for i in range(3):
        h = np.tanh((_fake_quant(h, steps[i]) * steps[i]) @ w[i] + b[i])
    np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)
    assert [r.compiled for r in explain(run, q, x)] == [INTEGER_DOT]
    assert is_compressed(q["layers"]["Dense_0"]["kernel"])


def test_static_dense_model_explain(strict):
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    q = dict(params, kernel=_with_step(_quant(params["kernel"], DENSE), 0.02))
    run = compressed(lambda p, x: model.apply({"params": p}, x), mode="int8")
    with strict():
        got = run(q, x)
    ref = (_fake_quant(x, 0.02) * np.float32(0.02)) @ np.asarray(q["kernel"].dequantize())
    np.testing.assert_allclose(got, ref + np.asarray(params["bias"]), rtol=1e-5, atol=1e-5)
    (record,) = explain(run, q, x)
    assert record.intended == record.compiled == INTEGER_DOT and record.formulation == "int8"


# ------------------------------------------------------------------------------------------------
# The looped formulations (K-chunks / one group per step), widened int4, dispatch, explain
# ------------------------------------------------------------------------------------------------

BIG = {
    # name: (weight shape, role, lhs shape, dimension numbers, weight_is_rhs); K = 640 or 1024
    "dense": (lambda k: (k, 6), Role("matmul", (0,), (1,)), lambda k: (3, k), DN, True),
    "equinox": (lambda k: (6, k), Role("matmul", (1,), (0,)), lambda k: (k, 2), DN, False),
    "stacked": (
        lambda k: (2, k, 3),
        Role("matmul", (1,), (2,), (0,)),
        lambda k: (2, 1, k),
        (((2,), (1,)), ((0,), (0,))),
        True,
    ),
}


CASES = [(name, 8) for name in sorted(LAYOUTS)] + [(n, k) for n in sorted(BIG) for k in (640, 1024)]


@given(
    case=st.sampled_from(CASES),  # K = 8: one step; 640 / 1024: chunks of 320 / 512
    spec=st.sampled_from(["pc8", "pc4", "g8", "g4asym", "pc4wide"]),
    mode=st.sampled_from(["limbs", "chunked", "dequantize", "weight_only", "int8"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    magnitude=st.sampled_from([0.0, 1e-3, 1.0, 1e4]),
)
def test_formulations_equal_reference(case, spec, mode, dtype, magnitude):
    """Every layout and formulation, unlooped (K = 8) and looped over K-chunks (2-3 steps) or
    groups (5-16 steps): weight-only modes equal the dequantized matmul, ``int8`` (with a static
    step) the NumPy fake-quantized reference."""
    layout, k = case
    if k == 8:
        wshape, role, xshape, dn, rhs = LAYOUTS[layout]
    else:
        wshape, role, xshape, dn, rhs = BIG[layout]
        wshape, xshape = wshape(k), xshape(k)
    group = 4 if k == 8 else 128
    kw = {
        "pc8": {},
        "pc4": dict(bits=4),
        "pc4wide": dict(bits=4),
        "g8": dict(group=4 if k == 8 else k // 5 if k == 640 else 64),
        "g4asym": dict(bits=4, group=group, asym=True),
    }[spec]
    rng = np.random.default_rng(k)
    q = _quant(rng.standard_normal(wshape), role, **kw)
    x = jnp.asarray(rng.standard_normal(xshape) * magnitude, dtype)
    x32 = np.asarray(x, np.float32)
    if mode == "int8":
        steps = np.float32([0.01, 0.02])[: 2 if role.stacked else 1]
        q = _with_step(q, steps)
        x32 = _fake_quant_lhs(x32, steps, bool(role.stacked))
    if spec == "pc4wide":
        q = widen(q)
        assert q.values.dtype == jnp.int8 and q.bits == 4
    w = q.dequantize()
    ops = (x32, w) if rhs else (w, x32)
    ref = np.asarray(lax.dot_general(*(jnp.asarray(o, jnp.float32) for o in ops), dn))
    got = KERNEL(q, x, dn, weight_is_rhs=rhs, mode=mode)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    scale = np.abs(ref).max() + 1e-30
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5 * scale)


def test_chunk_sizes():
    assert _kernels._chunk(4096) == 512 and _kernels._chunk(640) == 320
    assert _kernels._chunk(300) == 300  # small axes: one step
    assert _kernels._chunk(4099) == 4099  # no divisor >= 128: one step
    assert _kernels._chunk(4096, 64) == 512 and _kernels._chunk(4096, 1024) == 1024
    assert _kernels._chunk(4100, 41) == 410  # per-group chunks hold whole groups


def test_dispatch_per_group_and_batch():
    size = 4096 * 4096
    f = functools.partial(_dispatch.formulation, "weight_only", backend="cpu", int8_dot=True)
    assert [f(r, size=size) for r in (1, 16, 256)] == ["limbs"] * 3
    # per group: one integer dot per group while 2 * rows <= group, then chunked dequantization
    assert [f(r, size=size, grouped=True, group=128) for r in (1, 64, 65)] == [
        "limbs",
        "limbs",
        "chunked",
    ]
    # groups of 32 or fewer: dequantized chunks at every batch; group-major weights: limbs
    assert [f(r, size=size, grouped=True, group=32) for r in (1, 16, 17)] == ["chunked"] * 3
    assert [f(r, size=size, grouped=True, group=128, group_major=True) for r in (1, 256)] == [
        "limbs",
        "limbs",
    ]
    assert f(1, size=size, grouped=True, group=128, group_major=True, int8_dot=False) == "chunked"
    assert f(1, size=100, grouped=True) == "dequantize"
    # no int8 dot instruction (or an unknown CPU): the float formulations only
    assert f(1, size=size, int8_dot=False) == "chunked"
    assert _dispatch.formulation("weight_only", 1, "gpu", size=size, grouped=True) == "dequantize"
    assert _dispatch.formulation("weight_only", 1, "metal", size=size) == "dequantize"
    assert _dispatch.formulation("int8", 1, "cpu", int8_dot=False) == "int8"


def test_widen_nbytes_checkpoint_and_no_retrace(tmp_path):
    from jcompress import checkpoint

    rng = np.random.default_rng(0)
    q4 = _quant(rng.standard_normal((1024, 8)), DENSE, bits=4, group=128, asym=True)
    tree = {"w": q4, "b": jnp.ones(3)}
    wide = widen(tree)
    w = wide["w"]
    assert w.values.dtype == w.zero_point.dtype == jnp.int8 and w.bits == 4
    assert w.nbytes == q4.nbytes + 1024 * 8 // 2 + 8 * 8 // 2  # values and zero points: 1 B each
    np.testing.assert_array_equal(w.dequantize(), q4.dequantize())
    assert widen(wide)["w"] is w  # idempotent
    checkpoint.save(tmp_path / "c", tree)  # save packed, widen after loading
    back = widen(checkpoint.load(tmp_path / "c"))
    assert back["w"].values.dtype == jnp.int8 and back["w"].bits == 4
    np.testing.assert_array_equal(back["w"].values, w.values)
    checkpoint.save(tmp_path / "wide", wide)  # stored packed: the file always loads
    packed = checkpoint.load(tmp_path / "wide")["w"]
    assert packed.values.dtype == jnp.int4 and packed.zero_point.dtype == jnp.int4
    np.testing.assert_array_equal(packed.values, q4.values)
    # packed on disk too (int8 containers would add ~4 KiB here); metadata varies by a few bytes
    assert (
        abs(checkpoint.disk_bytes(tmp_path / "wide") - checkpoint.disk_bytes(tmp_path / "c")) < 256
    )
    count = []

    def f(p, x):
        count.append(1)
        return x @ p["w"]

    run = compressed(f)
    x = jnp.asarray(rng.standard_normal((2, 1024)), jnp.float32)
    got = run(back, x)
    run(back, x + 1)
    assert len(count) == 1
    np.testing.assert_allclose(got, run(tree, x), rtol=1e-6, atol=1e-5)


def test_explain_looped_paths():
    rng = np.random.default_rng(0)
    q = {"w": _quant(rng.standard_normal((1024, 64)), DENSE, group=128)}
    x = jnp.asarray(rng.standard_normal((40, 1024)), jnp.float32)
    f = lambda p, x: x @ p["w"]
    for formulation, path in (("chunked", FUSED), ("limbs", INTEGER_DOT)):
        run = compressed(f, formulation=formulation)
        (record,) = explain(run, q, x)
        assert record.intended == record.compiled == path, record
        ref = x @ q["w"].dequantize()
        np.testing.assert_allclose(run(q, x), ref, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Runtime layouts (OutMajor): every layout computes, dequantizes, gathers and saves the same
# ------------------------------------------------------------------------------------------------


def _np_dequantize(q: QArray) -> np.ndarray:
    """``(values - zero_point) * scale`` in NumPy float64, blocked scales repeated (canonical)."""
    v = np.asarray(q.values.astype(jnp.int8), np.float64)
    s = np.asarray(q.scale, np.float64)
    z = 0.0 if q.zero_point is None else np.asarray(q.zero_point.astype(jnp.int8), np.float64)
    for axis, (n, k) in enumerate(zip(v.shape, s.shape)):
        if k not in (1, n):
            s = np.repeat(s, n // k, axis)
            z = z if np.ndim(z) == 0 else np.repeat(z, n // k, axis)
    return (v - z) * s


def _layouts(ndim: int) -> list[OutMajor]:
    return [OutMajor(a, b) for a in range(1, ndim) for b in range(1, ndim - a + 1)]


LAYOUT_CASES = [(name, om) for name in sorted(LAYOUTS) for om in _layouts(len(LAYOUTS[name][0]))]


@given(
    case=st.sampled_from(LAYOUT_CASES),
    spec=st.sampled_from(range(len(SPECS))),
    mode=st.sampled_from(["limbs", "chunked", "dequantize", "weight_only"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 3),
)
def test_every_layout_equals_the_numpy_reference(case, spec, mode, dtype, seed):
    """Any ``OutMajor`` layout of any weight (also ones where it moves per-group scales or
    the contracting axes first): ``dot_general`` equals the NumPy product with the NumPy
    dequantization of the canonical weight; ``dequantize`` and ``shape`` are unchanged."""
    name, layout = case
    wshape, role, xshape, dn, rhs = LAYOUTS[name]
    rng = np.random.default_rng(seed)
    q = _quant(rng.standard_normal(wshape), role, **SPECS[spec])
    laid = q.with_layout(layout)
    assert laid.layout == layout and laid.shape == q.shape and laid.nbytes == q.nbytes
    np.testing.assert_array_equal(laid.dequantize(), q.dequantize())
    w = _np_dequantize(q)
    x = jnp.asarray(rng.standard_normal(xshape), dtype)
    x64 = np.asarray(x, np.float64)
    ref = np_dot_general(x64, w, dn) if rhs else np_dot_general(w, x64, dn)
    got = KERNEL(laid, x, dn, weight_is_rhs=rhs, mode=mode)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_out_major_runs_one_integer_dot_and_equals_canonical(strict):
    """The layout ``runtime_layout`` picks (from roles and from the scales alike) for the
    per-channel Flax layouts, at a size where K chunks would loop: one integer dot (``limbs_nk``
    / ``int8_nk``), jit == eager, equal to the canonical weight's result."""
    expected = {"dense": OutMajor(1, 1), "qkv": OutMajor(1, 2), "out": OutMajor(2, 1)}
    expected["stacked"] = OutMajor(1, 1)
    rng = np.random.default_rng(0)
    for name, layout in expected.items():
        wshape, role, xshape, dn, rhs = LAYOUTS[name]
        k = 1024  # the contracting size: the K-major loop takes 2 chunks of 512
        wshape = tuple(k if a == role.contracting[-1] else n for a, n in enumerate(wshape))
        xshape = tuple(k if n == 8 else n for n in xshape)
        q = _quant(rng.standard_normal(wshape), role)
        for picked in (_pick(q, role), _pick(q, None)):
            assert picked == layout, (name, picked)
        laid = q.with_layout(layout)
        x = jnp.asarray(rng.standard_normal(xshape), jnp.float32)
        for mode in ("limbs", "int8"):
            with strict():
                got = KERNEL(laid, x, dn, weight_is_rhs=rhs, mode=mode)
                eager = _kernels.dot_general(laid, x, dn, weight_is_rhs=rhs, mode=mode)
            canonical = KERNEL(q, x, dn, weight_is_rhs=rhs, mode=mode)
            np.testing.assert_allclose(got, eager, rtol=1e-6, atol=1e-6 * np.abs(got).max())
            np.testing.assert_allclose(got, canonical, rtol=1e-5, atol=1e-5 * np.abs(got).max())
            hlo = KERNEL.lower(laid, x, dn, weight_is_rhs=rhs, mode=mode)
            text = hlo.as_text(debug_info=True)
            assert f"jc.kernel={mode}_nk|int" in text and "while" not in hlo.compile().as_text()


def _pick(q, role):
    """``preferred_layout`` on a CPU with an int8 dot instruction, for any weight size."""
    saved = _dispatch.int8_dot_cpu, _dispatch._MIN_SIZE
    _dispatch.int8_dot_cpu, _dispatch._MIN_SIZE = (lambda: True), 1
    try:
        return _dispatch.preferred_layout(q, role, "cpu")
    finally:
        _dispatch.int8_dot_cpu, _dispatch._MIN_SIZE = saved


def test_preferred_layout_keeps_what_a_loop_reads_best():
    rng = np.random.default_rng(0)
    dense, equinox = LAYOUTS["dense"][1], LAYOUTS["equinox"][1]
    grouped = _quant(rng.standard_normal((8, 6)), dense, group=4)
    assert _pick(grouped, dense) is None and _pick(grouped, None) is None  # per group: K-major
    eqx = _quant(rng.standard_normal((6, 8)), equinox)
    assert _pick(eqx, equinox) is None and _pick(eqx, None) is None  # contracting axis last
    table = _quant(rng.standard_normal((10, 4)), Role("gather", (1,), (0,)))
    assert _pick(table, Role("gather", (1,), (0,))) is None and _pick(table, None) is None
    q = _quant(rng.standard_normal((8, 6)), dense)
    assert _dispatch.preferred_layout(q, dense, "gpu") is None


def test_runtime_layout_take_index_stored_checkpoint_vmap_scan(tmp_path):
    from jcompress import checkpoint

    rng = np.random.default_rng(0)
    wshape, role, _, _, _ = LAYOUTS["stacked"]
    q4 = _quant(rng.standard_normal(wshape), role, bits=4)
    laid = widen(q4).with_layout(OutMajor(1, 1))
    assert laid.values.shape == (2, 3, 8) and laid.values.dtype == jnp.int8 and laid.bits == 4
    w = np.asarray(q4.dequantize())
    # take along every axis, with negative and 2-D indices
    for axis in range(3):
        idx = jnp.array([[0, -1], [1, 0]])
        np.testing.assert_array_equal(laid.take(idx, axis), np.take(w, np.asarray(idx), axis))
    # indexing stacked axes keeps the layout; indexing into the permuted axes goes canonical
    np.testing.assert_array_equal(laid[1].dequantize(), w[1])
    assert laid[1].layout == OutMajor(1, 1) and laid[0:1].shape == (1, 8, 3)
    np.testing.assert_array_equal(laid[1, 2].dequantize(), w[1, 2])
    # stored: canonical and packed; a checkpoint of the laid-out tree loads canonical
    back = laid.stored()
    assert back.layout is None and back.values.dtype == jnp.int4
    np.testing.assert_array_equal(back.values, q4.values)
    checkpoint.save(tmp_path / "c", {"w": laid})
    loaded = checkpoint.load(tmp_path / "c")["w"]
    assert loaded.layout is None and loaded.shape == q4.shape
    np.testing.assert_array_equal(loaded.dequantize(), w)
    # vmap and scan over the stacked axis: per-layer QArrays that keep the layout
    x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
    layer = lambda q, x: _kernels.dot_general(q, x, DN, mode="limbs")
    mapped = jax.jit(jax.vmap(layer, in_axes=(0, None)))(laid, x)
    scanned = jax.jit(lambda q, x: lax.scan(lambda c, qi: (c, layer(qi, x)), 0, q)[1])(laid, x)
    ref = np.stack([np.asarray(x, np.float64) @ _np_dequantize(q4[i]) for i in range(2)])
    for got in (mapped, scanned):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    assert "OutMajor" in repr(laid)
    from jcompress.quantization import AWQArray

    # a wrapper's QArray is widened (not laid out) by runtime_layout and widen
    awq = AWQArray(q4, jnp.ones((2, 8, 1)))
    for wide in (widen(awq), _dispatch.runtime_layout({"w": awq}, backend="cpu")["w"]):
        assert type(wide) is AWQArray and wide.inner.values.dtype == jnp.int8
        assert wide.inner.layout is None and wide.stored().inner.values.dtype == jnp.int4


def _laid_out_model(monkeypatch, model, x, **quant):
    """``(fn, role_map, q, fast, run)``: ``model``'s parameters quantized (``quant``), laid out
    by ``runtime_layout`` on a CPU said to have an int8 dot, and ``run = compressed(fn)`` checked
    against the canonical tree's float results without retracing on a second call."""
    monkeypatch.setattr(_dispatch, "int8_dot_cpu", lambda: True)
    monkeypatch.setattr(_dispatch, "_MIN_SIZE", 1)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    traced = []

    def fn(p, x):
        traced.append(1)
        return model.apply({"params": p}, x)

    role_map = roles(fn, params, x)
    q = _quantize_tree(params, role_map, **quant)
    fast = _dispatch.runtime_layout(q, backend="cpu")
    run = compressed(fn)
    traced.clear()
    got = run(fast, x)
    run(fast, x + 1)
    assert len(traced) == 1
    ref = jax.jit(fn)(_dequantize(q), x)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    return fn, role_map, q, fast, run


def test_runtime_layout_model_explain_and_no_retrace(monkeypatch):
    """``runtime_layout`` on an nn.scan stack and an MLP: ``jc.compressed`` gives the canonical
    tree's results, explain names the one-dot formulation, a second call does not retrace."""
    x = jax.random.normal(jax.random.key(1), (2, 8))
    fn, role_map, q, fast, _ = _laid_out_model(monkeypatch, Stack(features=8), x, bits=4)
    kernel = fast["layers"]["Dense_0"]["kernel"]
    assert kernel.layout == OutMajor(1, 1) and kernel.values.dtype == jnp.int8
    assert _dispatch.runtime_layout(q, roles=role_map, backend="cpu")["layers"]["Dense_0"][
        "kernel"
    ].layout == OutMajor(1, 1)
    assert _dispatch.runtime_layout(q, backend="gpu") is q
    (record,) = explain(compressed(fn, formulation="limbs"), fast, x)
    assert record.formulation == "limbs_nk" and record.intended == record.compiled == INTEGER_DOT


# ------------------------------------------------------------------------------------------------
# GroupMajor: per-group weights stored (..., G, out, g), one batched integer dot over the groups
# ------------------------------------------------------------------------------------------------

# name: (weight shape, role, lhs shape for m rows, dimension numbers, layout[, weight on the
# left]); groups of 4
GROUP_MAJOR = {
    "dense": ((8, 6), DENSE, lambda m: (m, 8), DN, GroupMajor(2, 1)),
    "dense_left": ((8, 6), DENSE, lambda m: (m, 8), (((0,), (1,)), ((), ())), GroupMajor(2, 1),
                   False),
    "qkv": ((8, 2, 3), LAYOUTS["qkv"][1], lambda m: (m, 8), (((1,), (0,)), ((), ())),
            GroupMajor(2, 2)),
    "stacked": ((2, 8, 3), LAYOUTS["stacked"][1], lambda m: (2, m, 8), LAYOUTS["stacked"][3],
                GroupMajor(2, 1)),
    # two contracting axes: the layout fits the array, the product goes canonical
    "out": ((2, 8, 5), LAYOUTS["out"][1], lambda m: (m, 2, 8), LAYOUTS["out"][3],
            GroupMajor(2, 1)),
}  # fmt: skip


@given(
    name=st.sampled_from(sorted(GROUP_MAJOR)),
    spec=st.sampled_from([dict(group=4), dict(bits=4, group=4, asym=True), dict(bits=4, group=4)]),
    mode=st.sampled_from(["limbs", "int8", "chunked", "dequantize", "weight_only"]),
    rows=st.sampled_from([1, 2, 3, 5]),  # 3 limbs: batched dot up to 4 rows, then the loop
    static=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 3),
)
def test_group_major_equals_the_numpy_reference(name, spec, mode, rows, static, dtype, seed):
    """A ``GroupMajor`` weight in every mode and at batches on both sides of the batched dot:
    weight-only modes equal the NumPy product with the NumPy dequantization; ``int8`` (dynamic
    or static step) equals the canonical weight's result (the same activation rounding);
    ``shape``, ``nbytes``, ``dequantize`` and ``stored`` are unchanged."""
    wshape, role, xshape, dn, layout, *left = GROUP_MAJOR[name]
    rhs = not left
    rng = np.random.default_rng(seed)
    q = _quant(rng.standard_normal(wshape), role, **spec)
    if static and mode == "int8":
        q = _with_step(q, np.float32([0.02, 0.04])[: 2 if role.stacked else 1])
    q = widen(q)
    laid = q.with_layout(layout)
    assert laid.layout == layout and laid.shape == q.shape and laid.nbytes == q.nbytes
    np.testing.assert_array_equal(laid.dequantize(), q.dequantize())
    np.testing.assert_array_equal(laid.stored().values, q.stored().values)
    x = jnp.asarray(rng.standard_normal(xshape(rows)), dtype)
    got = KERNEL(laid, x, dn, weight_is_rhs=rhs, mode=mode)
    canonical = KERNEL(q, x, dn, weight_is_rhs=rhs, mode=mode)
    ops = (np.asarray(x, np.float64), _np_dequantize(q))
    ref = canonical if mode == "int8" else np_dot_general(*(ops if rhs else ops[::-1]), dn)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    scale = np.abs(np.asarray(ref)).max() + 1e-30
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * scale)


def test_group_major_formulations_jit_eager_and_explain(strict):
    """At a size the dispatch serves: batch 1-4 one batched integer dot (``limbs_groups``, no
    loop), batch 8 one dot per group (``limbs``), ``int8`` alike; jit == eager; NaN rows."""
    rng = np.random.default_rng(0)
    q = widen(_quant(rng.standard_normal((1024, 256)), DENSE, bits=4, group=128, asym=True))
    laid = q.with_layout(GroupMajor(8, 1))
    for rows, mode, name in ((1, "limbs", "limbs_groups"), (4, "limbs", "limbs_groups"),
                             (8, "limbs", "limbs"), (1, "int8", "int8_groups"),
                             (16, "int8", "int8")):  # fmt: skip
        x = jnp.asarray(rng.standard_normal((rows, 1024)), jnp.float32)
        with strict():
            got = KERNEL(laid, x, DN, mode=mode)
            eager = _kernels.dot_general(laid, x, DN, mode=mode)
        np.testing.assert_allclose(got, eager, rtol=1e-6, atol=1e-6 * np.abs(got).max())
        np.testing.assert_allclose(
            got, KERNEL(q, x, DN, mode=mode), rtol=1e-5, atol=1e-5 * np.abs(got).max()
        )
        lowered = KERNEL.lower(laid, x, DN, mode=mode)
        assert f"jc.kernel={name}|int" in lowered.as_text(debug_info=True)
        assert ("while" in lowered.compile().as_text()) == (not name.endswith("_groups"))
    x = jnp.ones((2, 1024), jnp.float32).at[1, 3].set(jnp.nan)
    got = KERNEL(laid, x, DN, mode="limbs")
    assert np.isnan(got[1]).all() and np.isfinite(got[0]).all()


def test_group_major_gradients_equal_canonical():
    """The derivative through a ``GroupMajor`` weight: with respect to the activations and to
    the scales (trained through ``partition(..., scales=True)``), equal to the canonical one's
    (the scale's in the stored layout)."""
    rng = np.random.default_rng(1)
    q = widen(_quant(rng.standard_normal((2, 8, 3)), LAYOUTS["stacked"][1], group=4, asym=True))
    laid = q.with_layout(GroupMajor(2, 1))
    dn = LAYOUTS["stacked"][3]
    x = jnp.asarray(rng.standard_normal((2, 1, 8)), jnp.float32)

    def loss(w, x):
        return jnp.sum(jnp.sin(_kernels.dot_general(w, x, dn, mode="limbs")))

    gx, gx_ref = jax.grad(loss, 1)(laid, x), jax.grad(loss, 1)(q, x)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6)
    gs = jax.grad(lambda s: loss(laid.replace(scale=s), x))(laid.scale)
    gs_ref = jax.grad(lambda s: loss(q.replace(scale=s), x))(q.scale)
    np.testing.assert_allclose(gs, GroupMajor(2, 1).store(gs_ref), rtol=1e-5, atol=1e-6)


def test_group_major_pick_take_index_checkpoint_vmap_scan(tmp_path):
    """``runtime_layout`` makes ``GroupMajor`` for groups >= 128 along the one contracting axis
    (from roles and from the scales), nothing for smaller groups or two contracting axes; the
    laid-out weight gathers, indexes its stacked axis, vmaps, scans and saves canonical."""
    from jcompress import checkpoint

    rng = np.random.default_rng(2)
    stacked = LAYOUTS["stacked"][1]
    cases = [
        ((256, 8), DENSE, 128, GroupMajor(2, 1)),
        ((2, 256, 8), stacked, 128, GroupMajor(2, 1)),
        ((256, 2, 3), LAYOUTS["qkv"][1], 128, GroupMajor(2, 2)),
        ((256, 8), DENSE, 64, None),
        ((2, 256, 8), LAYOUTS["out"][1], 128, None),
    ]
    for wshape, role, group, expected in cases:
        q = _quant(rng.standard_normal(wshape), role, group=group)
        assert _pick(q, role) == expected, (wshape, group)
        assert _pick(q, None) == expected, (wshape, group)
    q4 = _quant(rng.standard_normal((2, 256, 8)), stacked, bits=4, group=128, asym=True)
    laid = widen(q4).with_layout(GroupMajor(2, 1))
    assert laid.values.shape == (2, 2, 8, 128) and laid.scale.shape == (2, 2, 8, 1)
    w = np.asarray(q4.dequantize())
    for axis in range(3):
        idx = jnp.array([[0, -1], [1, 0]])
        np.testing.assert_array_equal(laid.take(idx, axis), np.take(w, np.asarray(idx), axis))
    assert laid[1].layout == GroupMajor(2, 1) and laid[1].shape == (256, 8)
    np.testing.assert_array_equal(laid[1].dequantize(), w[1])
    checkpoint.save(tmp_path / "c", {"w": laid})
    loaded = checkpoint.load(tmp_path / "c")["w"]
    assert loaded.layout is None and loaded.values.dtype == jnp.int4
    np.testing.assert_array_equal(loaded.dequantize(), w)
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.float32)
    layer = lambda q, x: _kernels.dot_general(q, x, DN, mode="limbs")
    mapped = jax.jit(jax.vmap(layer, in_axes=(0, None)))(laid, x)
    scanned = jax.jit(lambda q, x: lax.scan(lambda c, qi: (c, layer(qi, x)), 0, q)[1])(laid, x)
    ref = np.stack([np.asarray(x, np.float64) @ w[i] for i in range(2)])
    for got in (mapped, scanned):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="blocks along axis 0"):
        widen(_quant(rng.standard_normal((6, 8)), LAYOUTS["equinox"][1], group=4)).with_layout(
            GroupMajor(2, 1)
        )
    with pytest.raises(TypeError, match="OutMajor or a GroupMajor"):
        q4.with_layout((1, 1))


def test_group_major_model_explain_and_no_retrace(monkeypatch):
    """``runtime_layout`` on a per-group MLP: ``jc.compressed`` equals the canonical tree's
    results, explain names the batched dot at batch 1, a second call does not retrace."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16)(nn.gelu(nn.Dense(256)(x)))

    x = jax.random.normal(jax.random.key(1), (1, 256))
    _, _, _, fast, run = _laid_out_model(monkeypatch, MLP(), x, bits=4, group=128)
    assert fast["Dense_0"]["kernel"].layout == fast["Dense_1"]["kernel"].layout == GroupMajor(2, 1)
    records = explain(run, fast, x)
    assert {r.formulation for r in records} == {"limbs_groups"}
    assert all(r.intended == r.compiled == INTEGER_DOT for r in records)


def test_group_major_sharded(devices):
    """A ``GroupMajor`` weight sharded along its output axis (and the activations along the
    batch) computes the canonical result on all 8 devices, batched dot and loop alike."""
    rng = np.random.default_rng(3)
    q = widen(_quant(rng.standard_normal((256, 16)), DENSE, bits=4, group=128, asym=True))
    laid = q.with_layout(GroupMajor(2, 1))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    out_axis = lambda a: NS(mesh, P(None, "model", None) if a.shape[1] > 1 else P())
    sharded = jax.tree.map(lambda a: jax.device_put(a, out_axis(a)), laid)
    for rows in (2, 8):  # limbs_groups, then the per-group loop
        x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.float32)
        xs = jax.device_put(x, NS(mesh, P("data", None)))
        got = KERNEL(sharded, xs, DN, mode="limbs")
        assert len(got.sharding.device_set) == 8
        np.testing.assert_allclose(
            got, KERNEL(q, x, DN, mode="limbs"), rtol=1e-5, atol=1e-5 * np.abs(got).max()
        )
