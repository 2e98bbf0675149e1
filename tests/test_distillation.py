"""Tests for jc.distillation: losses against NumPy references, distillation_loss semantics,
feature losses on real Flax activations, the jitted training step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jcompress import distillation as jd

# ----------------------------------------------------------------------------------------------
# NumPy references (independent of the implementation: float64, explicit softmax)
# ----------------------------------------------------------------------------------------------


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd(s, t, temperature):
    ls, lt = (
        np_log_softmax(np.asarray(s, np.float64) / temperature),
        np_log_softmax(np.asarray(t, np.float64) / temperature),
    )
    return temperature**2 * (np.exp(lt) * (lt - ls)).sum(-1)


def np_ce(logits, labels):
    ls = np_log_softmax(logits)
    return -np.take_along_axis(ls, np.asarray(labels)[..., None], -1)[..., 0]


def logits_pair(key, shape, scale=3.0, dtype=jnp.float32):
    ks, kt = jax.random.split(jax.random.key(key))
    return (
        (scale * jax.random.normal(ks, shape)).astype(dtype),
        (scale * jax.random.normal(kt, shape)).astype(dtype),
    )


# ----------------------------------------------------------------------------------------------
# kd_loss / soft_cross_entropy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("leading", [(), (7,), (3, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kd_loss_matches_numpy(temperature, leading, dtype, strict):
    s, t = logits_pair(0, (*leading, 10), dtype=dtype)
    with strict():
        got = jd.kd_loss(s, t, temperature=temperature)
    assert got.shape == leading and got.dtype == jnp.float32
    want = np_kd(np.asarray(s, np.float32), np.asarray(t, np.float32), temperature)
    # float32 cancellation in log p_t - log p_s grows with T (the T^2 factor amplifies it).
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-6)


def test_kd_loss_mixed_dtypes_under_strict_promotion(strict):
    s, t = logits_pair(1, (4, 6))
    with strict():
        got = jd.kd_loss(s.astype(jnp.bfloat16), t, temperature=2.0)
    want = np_kd(np.asarray(s.astype(jnp.bfloat16), np.float32), np.asarray(t), 2.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 7.0])
def test_kd_loss_is_zero_for_equal_logits(temperature):
    s, _ = logits_pair(2, (6, 9), scale=50.0)
    np.testing.assert_array_equal(np.asarray(jd.kd_loss(s, s, temperature=temperature)), 0.0)


def test_kd_loss_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        s, t = (x.astype(jnp.float64) for x in logits_pair(3, (3, 5)))
        f = lambda s: jnp.sum(jd.kd_loss(s, t, temperature=2.5))
        g = np.asarray(jax.grad(f)(s))
        eps, fd = 1e-6, np.zeros(s.shape)
        for idx in np.ndindex(*s.shape):
            d = jnp.zeros(s.shape, jnp.float64).at[idx].set(eps)
            fd[idx] = (float(f(s + d)) - float(f(s - d))) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
        # Closed form: d/ds T^2 KL = T (p_s - p_t).
        ps = np.exp(np_log_softmax(np.asarray(s) / 2.5))
        pt = np.exp(np_log_softmax(np.asarray(t) / 2.5))
        np.testing.assert_allclose(g, 2.5 * (ps - pt), rtol=1e-9, atol=1e-12)


def test_kd_loss_where_masks_value_and_gradient():
    s, t = logits_pair(4, (4, 3, 8))
    where = jnp.array([[True, False, True]] * 3 + [[False, False, False]])
    vg = jax.jit(jax.value_and_grad(lambda s, t: jnp.sum(jd.kd_loss(s, t, where=where))))
    loss, grad = vg(s, t)
    full = jd.kd_loss(s, t)
    np.testing.assert_array_equal(
        np.asarray(jd.kd_loss(s, t, where=where)), np.where(where, full, 0)
    )
    # Garbage (NaN, Inf) in masked rows changes neither the loss nor the gradient.
    junk = jnp.where(where[..., None], s, jnp.nan)
    junk_t = jnp.where(where[..., None], t, jnp.inf)
    loss2, grad2 = vg(junk, junk_t)
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(np.asarray(grad2), np.asarray(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(where)], 0.0)
    # A (batch,) prefix masks whole sequences.
    got = jd.kd_loss(s, t, where=jnp.array([True, False, True, False]))
    np.testing.assert_array_equal(np.asarray(got)[1::2], 0.0)
    np.testing.assert_array_equal(np.asarray(got)[::2], np.asarray(full)[::2])


def test_kd_loss_teacher_minus_inf_means_probability_zero():
    s = jnp.array([[1.0, 2.0, 3.0]])
    t = jnp.array([[0.0, -jnp.inf, 1.0]])
    got = float(jd.kd_loss(s, t)[0])
    t_np = np.array([0.0, 1.0])
    pt = np.exp(np_log_softmax(t_np))
    ls = np_log_softmax(np.array([1.0, 2.0, 3.0]))[[0, 2]]
    np.testing.assert_allclose(got, (pt * (np.log(pt) - ls)).sum(), rtol=1e-6)
    assert np.isfinite(np.asarray(jax.grad(lambda s: jd.kd_loss(s, t)[0])(s))).all()


def test_soft_cross_entropy_is_kd_plus_teacher_entropy(strict):
    s, t = logits_pair(5, (5, 7))
    q = jax.nn.softmax(t / 3.0)
    with strict():
        ce = jd.soft_cross_entropy(s, q, temperature=3.0)
        kd = jd.kd_loss(s, t, temperature=3.0)
    entropy = -(np.asarray(q, np.float64) * np.log(np.asarray(q, np.float64))).sum(-1)
    np.testing.assert_allclose(np.asarray(ce), np.asarray(kd) + 9.0 * entropy, rtol=1e-5)
    g_ce = jax.grad(lambda s: jnp.sum(jd.soft_cross_entropy(s, q, temperature=3.0)))(s)
    g_kd = jax.grad(lambda s: jnp.sum(jd.kd_loss(s, t, temperature=3.0)))(s)
    np.testing.assert_allclose(np.asarray(g_ce), np.asarray(g_kd), atol=1e-6)


@pytest.mark.parametrize("fn", [jd.kd_loss, jd.soft_cross_entropy])
def test_loss_errors(fn):
    s = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        fn(s, jnp.zeros((2, 4)))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be"):
            fn(s, jnp.full((2, 3), 1 / 3), temperature=bad)
    with pytest.raises(ValueError, match=r"where= has shape \(3,\).*\(2,\)"):
        fn(s, jnp.full((2, 3), 1 / 3), where=jnp.ones(3, bool))
    with pytest.raises(TypeError, match="floating"):
        fn(jnp.zeros((2, 3), jnp.int32), jnp.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="NaN/Inf"):
        fn(s.at[1, 2].set(jnp.nan), jnp.full((2, 3), 1 / 3))
    # ... but not in masked rows.
    fn(s.at[1, 2].set(jnp.nan), jnp.full((2, 3), 1 / 3), where=jnp.array([True, False]))


def test_soft_cross_entropy_rejects_negative_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        jd.soft_cross_entropy(jnp.zeros((1, 2)), jnp.array([[1.5, -0.5]]))


# ----------------------------------------------------------------------------------------------
# distillation_loss
# ----------------------------------------------------------------------------------------------

linear = lambda w, x: x @ w


@pytest.fixture(scope="module")
def problem():
    k = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(k[0], (16, 5))
    y = jax.random.randint(k[1], (16,), 0, 4)
    ws = 0.5 * jax.random.normal(k[2], (5, 4))
    wt = 2.0 * jax.random.normal(k[3], (5, 4))
    return x, y, ws, wt


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_combines_terms(problem, alpha, strict):
    x, y, ws, wt = problem
    loss_fn = jd.distillation_loss(linear, linear, temperature=3.0, alpha=alpha)
    with strict():
        loss, aux = loss_fn(ws, wt, x, y)
    kd = np_kd(np.asarray(x @ ws), np.asarray(x @ wt), 3.0).mean()
    hard = np_ce(np.asarray(x @ ws), np.asarray(y)).mean()
    np.testing.assert_allclose(float(aux["kd"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(aux["hard"]), hard, rtol=1e-5)
    np.testing.assert_allclose(float(loss), alpha * kd + (1 - alpha) * hard, rtol=1e-5)
    if alpha == 0.0:  # exactly the hard loss, gradient included
        plain = lambda w: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, y))
        assert float(loss) == float(plain(ws))
        g = jax.grad(lambda w: loss_fn(w, wt, x, y)[0])(ws)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.grad(plain)(ws)))
    if alpha == 1.0:  # exactly the KD loss; labels are optional
        pure, _ = loss_fn(ws, wt, x)
        assert (
            float(loss)
            == float(pure)
            == float(jnp.mean(jd.kd_loss(x @ ws, x @ wt, temperature=3.0)))
        )


def test_distillation_loss_config_errors(problem):
    x, y, ws, wt = problem
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha must be in"):
            jd.distillation_loss(linear, linear, temperature=1.0, alpha=bad)
    with pytest.raises(ValueError, match="temperature must be"):
        jd.distillation_loss(linear, linear, temperature=0.0, alpha=0.5)
    loss_fn = jd.distillation_loss(linear, linear, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"labels=None .* alpha=1"):
        loss_fn(ws, wt, x)
    bad_teacher = jd.distillation_loss(linear, lambda w, x: x @ w[:, :3], temperature=2.0, alpha=1)
    with pytest.raises(ValueError, match=r"teacher: .*\(16, 4\).*\(16, 3\)"):
        bad_teacher(ws, wt, x)
    with pytest.raises(ValueError, match="teacher_weights"):
        jd.distillation_loss(linear, [linear], temperature=1.0, alpha=1.0, teacher_weights=[1, 2])
    with pytest.raises(ValueError, match="teacher_weights"):
        jd.distillation_loss(
            linear, [linear, linear], temperature=1.0, alpha=1.0, teacher_weights=[0, 0]
        )
    with pytest.raises(ValueError, match="hard_loss returned shape"):
        jd.distillation_loss(
            linear, linear, temperature=1.0, alpha=0.5, hard_loss=lambda s, y: jnp.sum(s)
        )(ws, wt, x, y)


def test_teacher_gets_no_gradient_and_teacher_logits_path_is_equal(problem):
    x, y, ws, wt = problem
    loss_fn = jd.distillation_loss(linear, linear, temperature=2.0, alpha=0.7)
    (loss, _), (gs, gt) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(ws, wt, x, y)
    np.testing.assert_array_equal(np.asarray(gt), 0.0)
    assert np.abs(np.asarray(gs)).max() > 0
    f = lambda w: loss_fn(w, None, x, y, teacher_logits=x @ wt)
    (loss2, _), gs2 = jax.value_and_grad(f, has_aux=True)(ws)
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(np.asarray(gs2), np.asarray(gs))
    # Precomputed logits carry no gradient either.
    gl = jax.grad(lambda t: loss_fn(ws, None, x, y, teacher_logits=t)[0])(x @ wt)
    np.testing.assert_array_equal(np.asarray(gl), 0.0)


def test_teacher_fn_none_needs_stored_logits(problem):
    x, y, ws, wt = problem
    stored = jd.distillation_loss(linear, None, temperature=2.0, alpha=0.7)
    full = jd.distillation_loss(linear, linear, temperature=2.0, alpha=0.7)
    a, _ = stored(ws, None, x, y, teacher_logits=x @ wt)
    b, _ = full(ws, wt, x, y)
    assert float(a) == float(b)
    with pytest.raises(ValueError, match=r"teacher_fn=None.*teacher_logits="):
        stored(ws, wt, x, y)
    with pytest.raises(TypeError, match="teacher_fn must be"):
        jd.distillation_loss(linear, "teacher", temperature=2.0, alpha=0.7)


def test_teacher_params_are_arguments_not_constants(problem):
    x, y, ws, wt = problem
    loss_fn = jax.jit(jd.distillation_loss(linear, linear, temperature=2.0, alpha=0.5))
    a, _ = loss_fn(ws, wt, x, y)
    b, _ = loss_fn(ws, 2.0 * wt, x, y)
    assert float(a) != float(b)
    assert loss_fn._cache_size() == 1


@pytest.mark.parametrize("weights", [None, (3.0, 1.0)])
def test_several_teachers(problem, weights):
    x, y, ws, wt = problem
    wt2 = -wt
    shifted = lambda w, x: x @ w + 1.0  # a second, different teacher function
    loss_fn = jd.distillation_loss(
        linear, [linear, shifted], temperature=2.0, alpha=0.6, teacher_weights=weights
    )
    loss, aux = loss_fn(ws, [wt, wt2], x, y)
    k1 = np_kd(np.asarray(x @ ws), np.asarray(x @ wt), 2.0).mean()
    k2 = np_kd(np.asarray(x @ ws), np.asarray(x @ wt2 + 1.0), 2.0).mean()
    w = np.array(weights or (1.0, 1.0))
    w = w / w.sum()
    np.testing.assert_allclose(np.asarray(aux["kd_per_teacher"]), [k1, k2], rtol=1e-5)
    np.testing.assert_allclose(float(aux["kd"]), w[0] * k1 + w[1] * k2, rtol=1e-5)
    hard = np_ce(np.asarray(x @ ws), np.asarray(y)).mean()
    np.testing.assert_allclose(float(loss), 0.6 * float(aux["kd"]) + 0.4 * hard, rtol=1e-5)
    same, _ = loss_fn(ws, None, x, y, teacher_logits=[x @ wt, x @ wt2 + 1.0])
    assert float(same) == float(loss)
    with pytest.raises(TypeError, match="list or tuple of 2"):
        loss_fn(ws, wt, x, y)
    with pytest.raises(ValueError, match="1 entries for 2"):
        loss_fn(ws, [wt], x, y)


def test_where_masks_both_terms_with_padding_labels():
    # A sequence model: (batch, seq, vocab) logits, padded positions carry label -1.
    k = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(k[0], (3, 6, 4))
    ws, wt = jax.random.normal(k[1], (4, 5)), jax.random.normal(k[2], (4, 5))
    lengths = jnp.array([6, 2, 4])
    where = jnp.arange(6)[None, :] < lengths[:, None]
    y = jnp.where(where, jnp.arange(18).reshape(3, 6) % 5, -1)
    loss_fn = jd.distillation_loss(linear, linear, temperature=2.0, alpha=0.5)
    loss, aux = loss_fn(ws, wt, x, y, where=where)
    m = np.asarray(where)
    kd = np_kd(np.asarray(x @ ws), np.asarray(x @ wt), 2.0)[m].mean()
    hard = np_ce(np.asarray(x @ ws)[m], np.asarray(y)[m]).mean()
    np.testing.assert_allclose([float(aux["kd"]), float(aux["hard"])], [kd, hard], rtol=1e-5)
    # Changing padded inputs changes nothing (value or gradient).
    x2 = jnp.where(where[..., None], x, 1e3)
    g1 = jax.grad(lambda w: loss_fn(w, wt, x, y, where=where)[0])(ws)
    g2 = jax.grad(lambda w: loss_fn(w, wt, x2, y, where=where)[0])(ws)
    assert float(loss_fn(ws, wt, x2, y, where=where)[0]) == float(loss)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-7)
    # Fully masked: zero loss, zero gradient.
    none = jnp.zeros((3,), bool)
    assert float(loss_fn(ws, wt, x, y, where=none)[0]) == 0.0


class BNStudent(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(4)(x)


@pytest.fixture(scope="module")
def bn_student(problem):
    x = problem[0]
    model = BNStudent()
    variables = model.init(jax.random.key(0), x, train=False)
    return model, variables


def test_has_aux_returns_batchnorm_state_and_kwargs_reach_student(problem, bn_student):
    x, y, _, wt = problem
    model, variables = bn_student

    def student_fn(params, x, *, batch_stats, rngs):
        return model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            rngs=rngs,
            mutable=["batch_stats"],
        )

    loss_fn = jd.distillation_loss(student_fn, linear, temperature=2.0, alpha=0.5, has_aux=True)
    kw = {"batch_stats": variables["batch_stats"], "rngs": {"dropout": jax.random.key(1)}}
    loss, aux = loss_fn(variables["params"], wt, x, y, **kw)
    want_logits, want_state = student_fn(variables["params"], x, **kw)
    np.testing.assert_array_equal(np.asarray(aux["logits"]), np.asarray(want_logits))
    jax.tree.map(np.testing.assert_array_equal, aux["state"], want_state)
    mean = aux["state"]["batch_stats"]["BatchNorm_0"]["mean"]
    assert np.abs(np.asarray(mean)).max() > 0  # running statistics moved from their init (0)
    # The dropout key reaches the student: same key, same loss; another key, another loss.
    assert float(loss_fn(variables["params"], wt, x, y, **kw)[0]) == float(loss)
    kw2 = {**kw, "rngs": {"dropout": jax.random.key(2)}}
    assert float(loss_fn(variables["params"], wt, x, y, **kw2)[0]) != float(loss)


def test_has_aux_requires_a_pair(problem):
    x, y, ws, wt = problem
    loss_fn = jd.distillation_loss(linear, linear, temperature=1.0, alpha=0.5, has_aux=True)
    with pytest.raises(TypeError, match=r"\(logits, new_state\)"):
        loss_fn(ws, wt, x, y)


def test_jit_equals_eager_and_is_deterministic(problem):
    x, y, ws, wt = problem
    loss_fn = jd.distillation_loss(linear, [linear, linear], temperature=4.0, alpha=0.25)
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    (l_eager, _), g_eager = vg(ws, [wt, -wt], x, y)
    jitted = jax.jit(vg)
    (l_jit, _), g_jit = jitted(ws, [wt, -wt], x, y)
    (l_jit2, _), g_jit2 = jitted(ws, [wt, -wt], x, y)
    np.testing.assert_allclose(float(l_jit), float(l_eager), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_jit), np.asarray(g_eager), rtol=1e-5, atol=1e-7)
    assert float(l_jit) == float(l_jit2)
    np.testing.assert_array_equal(np.asarray(g_jit), np.asarray(g_jit2))
    assert jitted._cache_size() == 1


def test_nnx_student(problem):
    """A student given as an ``nnx.State`` (``nnx.split``), the teacher a linen dict."""
    x, y, _, _ = problem
    student = nnx.Sequential(
        nnx.Linear(5, 6, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(6, 4, rngs=nnx.Rngs(1))
    )
    graphdef, state = nnx.split(student)
    teacher = nn.Dense(4)
    tvars = teacher.init(jax.random.key(3), x)
    loss_fn = jd.distillation_loss(
        lambda s, x: nnx.merge(graphdef, s)(x), teacher.apply, temperature=2.0, alpha=0.5
    )
    opt = optax.adam(1e-2)
    step = jd.make_train_step(loss_fn, opt)
    opt_state = opt.init(state)
    first = None
    for _ in range(30):
        state, opt_state, loss, _ = step(state, opt_state, tvars, x, y)
        first = float(loss) if first is None else first
    assert isinstance(state, nnx.State)
    assert float(loss) < 0.8 * first
    assert step._cache_size() == 1


def test_train_step_static_flag_and_convergence_to_teacher(problem):
    x, _, _, wt = problem
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    params = model.init(jax.random.key(0), x)["params"]

    def student_fn(p, x, *, scale):  # a Python flag that decides the trace
        return model.apply({"params": p}, x) * scale

    loss_fn = jd.distillation_loss(student_fn, linear, temperature=1.0, alpha=1.0)
    opt = optax.adam(3e-2)
    step = jd.make_train_step(loss_fn, opt, static_argnames=("scale",))
    state = opt.init(params)
    for _ in range(300):
        params, state, loss, aux = step(params, state, wt, x, scale=1.0)
    assert float(loss) < 0.05
    agree = np.mean(np.argmax(aux["logits"], -1) == np.argmax(x @ wt, -1))
    assert agree == 1.0


# ----------------------------------------------------------------------------------------------
# Feature losses
# ----------------------------------------------------------------------------------------------


def np_unit(v, eps=1e-8):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), eps)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_feature_losses_match_numpy(dtype, strict):
    k = jax.random.split(jax.random.key(5), 3)
    s = jax.random.normal(k[0], (2, 3, 6)).astype(dtype)
    t = jax.random.normal(k[1], (2, 3, 6)).astype(dtype)
    s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
    with strict():
        mse = jd.feature_mse(s, t)
        cos = jd.feature_cosine(s, t)
        at = jd.attention_transfer(s, t)
    np.testing.assert_allclose(np.asarray(mse), ((s64 - t64) ** 2).mean(-1), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(cos), 1 - (np_unit(s64) * np_unit(t64)).sum(-1), rtol=1e-5, atol=1e-6
    )
    qs, qt = np_unit((s64**2).sum(-1).reshape(2, -1)), np_unit((t64**2).sum(-1).reshape(2, -1))
    np.testing.assert_allclose(np.asarray(at), ((qs - qt) ** 2).sum(-1), rtol=1e-4, atol=1e-7)


def test_projection_and_attention_handle_width_mismatch(strict):
    k = jax.random.split(jax.random.key(6), 3)
    s = jax.random.normal(k[0], (4, 8, 8, 3))  # NHWC, 3 channels
    t = jax.random.normal(k[1], (4, 8, 8, 16))
    with pytest.raises(ValueError, match=r"init_projection\(key, 3, 16\)"):
        jd.feature_mse(s, t)
    proj = jd.init_projection(k[2], 3, 16)
    with strict():
        got = jd.feature_mse(s, t, projection=proj)
    want = ((np.asarray(s) @ np.asarray(proj["kernel"]) - np.asarray(t)) ** 2).mean(-1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    assert jd.attention_transfer(s, t).shape == (4,)
    with pytest.raises(ValueError, match="equal batch and spatial"):
        jd.attention_transfer(s, t[:, :4])


class Net(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width, name="hidden")(x))
        return nn.Dense(4, name="out")(h)


def test_feature_loss_on_flax_intermediates_trains_projection(problem):
    x, _, _, _ = problem
    student, teacher = Net(6), Net(24)
    sp = student.init(jax.random.key(0), x)["params"]
    tp = teacher.init(jax.random.key(1), x)["params"]

    def feats(model, params):
        _, state = model.apply({"params": params}, x, capture_intermediates=True)
        return state["intermediates"]

    path = "hidden/__call__/0"
    s_feats, t_feats = feats(student, sp), feats(teacher, tp)
    with pytest.raises(ValueError, match=r"'hidden/__call__/1'.*available: .*'hidden/__call__/0'"):
        jd.feature_loss(s_feats, t_feats, pairs=["hidden/__call__/1"])
    with pytest.raises(ValueError, match=r"feature pair 'hidden/__call__/0'.*init_projection"):
        jd.feature_loss(s_feats, t_feats, pairs=[path])
    proj = jd.init_projections(jax.random.key(2), s_feats, t_feats, pairs=[path])
    assert list(proj) == [path] and proj[path]["kernel"].shape == (6, 24)

    def loss(both):
        p, pr = both
        return jd.feature_loss(feats(student, p), t_feats, pairs=[path], projections=pr)

    value, (gp, gpr) = jax.value_and_grad(loss)((sp, proj))
    want = jd.feature_mse(
        s_feats[path.split("/")[0]]["__call__"][0],
        t_feats["hidden"]["__call__"][0],
        projection=proj[path],
    )
    np.testing.assert_allclose(float(value), float(jnp.mean(want)), rtol=1e-6)
    assert np.abs(np.asarray(gpr[path]["kernel"])).max() > 0  # the projection is trained
    assert np.abs(np.asarray(gp["hidden"]["kernel"])).max() > 0
    np.testing.assert_array_equal(np.asarray(gp["out"]["kernel"]), 0.0)  # not on the path
    # Flat {path: activation} dicts work as well, with a mapping of student -> teacher paths.
    flat = jd.feature_loss(
        {"s": s_feats["hidden"]["__call__"][0]},
        {"t": t_feats["hidden"]["__call__"][0]},
        pairs={"s": "t"},
        projections={"s": proj[path]},
        loss=jd.feature_cosine,
    )
    assert flat.shape == () and 0.0 <= float(flat) <= 2.0


def test_feature_loss_with_jc_tap(problem):
    """The jcompress way to get activations: ``jc.runtime.tap`` on unmodified models."""
    from jcompress.runtime import tap

    x = problem[0]
    student, teacher = Net(6), Net(24)
    sp = student.init(jax.random.key(0), x)["params"]
    tp = teacher.init(jax.random.key(1), x)["params"]
    layer = "hidden/kernel"  # tap names layers by their parameter paths
    s_tap = tap(lambda p, x: student.apply({"params": p}, x), outputs_of=[layer])
    t_tap = tap(lambda p, x: teacher.apply({"params": p}, x), outputs_of=[layer])
    _, t_acts = t_tap(tp, x)
    proj = jd.init_projections(jax.random.key(2), s_tap(sp, x)[1], t_acts)

    def loss(both):
        params, projections = both
        _, s_acts = s_tap(params, x)
        return jd.feature_loss(s_acts, t_acts, projections=projections)

    value, (gp, gpr) = jax.value_and_grad(loss)((sp, proj))
    # tap's output of a Dense is its matmul result, before the bias.
    want = jd.feature_mse(
        x @ sp["hidden"]["kernel"], x @ tp["hidden"]["kernel"], projection=proj[layer]
    )
    np.testing.assert_allclose(float(value), float(jnp.mean(want)), rtol=1e-5)
    assert np.abs(np.asarray(gp["hidden"]["kernel"])).max() > 0
    assert np.abs(np.asarray(gpr[layer]["kernel"])).max() > 0


def test_feature_loss_where_and_errors():
    s = {"a": jnp.ones((3, 4)), "b": jnp.zeros((3, 2, 5))}
    t = {"a": jnp.zeros((3, 4)), "b": jnp.ones((3, 2, 5))}
    where = jnp.array([True, False, False])
    got = jd.feature_loss(s, t, where=where)
    assert float(got) == 2.0  # 1 (a) + 1 (b), masked mean over the one live example
    with pytest.raises(ValueError, match="not paired"):
        jd.feature_loss(
            s, t, pairs=["a"], projections={"b": jd.init_projection(jax.random.key(0), 5, 5)}
        )
    with pytest.raises(TypeError, match="dict of activations"):
        jd.feature_loss(jnp.ones((3, 4)), t)
    with pytest.raises(ValueError, match="feature path 'c'"):
        jd.feature_loss(s, {**t, "c": jnp.ones(3)})


# ----------------------------------------------------------------------------------------------
# Composition: distill into a pruned, quantization-aware student in one jitted step
# ----------------------------------------------------------------------------------------------


def test_distill_into_pruned_int4_student_in_one_jitted_step(problem):
    from jcompress.pruning import masks_of, polynomial_schedule, prune
    from jcompress.quantization import QuantSpec, fake_quantize

    x, y, _, wt = problem
    student = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
    params = student.init(jax.random.key(0), x)["params"]
    spec = QuantSpec(bits=4)
    seen = []

    def student_fn(p, x):
        q = fake_quantize(p, spec)
        seen.append(q)  # the weights the forward pass uses (tracers; inspected below)
        return student.apply({"params": q}, x)

    schedule = polynomial_schedule(0.9, begin_step=0, end_step=20, update_every=5)
    opt = prune(optax.adam(1e-2), schedule=schedule)
    loss_fn = jd.distillation_loss(student_fn, linear, temperature=2.0, alpha=0.5)
    step = jd.make_train_step(loss_fn, opt)
    state = opt.init(params)
    losses = []
    for _ in range(40):
        params, state, loss, _ = step(params, state, wt, x, y)
        losses.append(float(loss))
    assert step._cache_size() == 1  # one compiled step for the whole run
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    # Exactly 90% of every kernel is zero, and the zeros are where the masks say.
    masks = masks_of(state)
    for name in ("layers_0", "layers_2"):
        k, m = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
        assert int((k == 0).sum()) == round(0.9 * k.size) == int((~m).sum())
        np.testing.assert_array_equal(k[~m], 0.0)
        # The forward pass sees int4 weights: at most 16 levels per output channel, zeros kept.
        q = np.asarray(fake_quantize(params, spec)[name]["kernel"])
        np.testing.assert_array_equal(q[~m], 0.0)
        assert max(len(np.unique(q[:, j])) for j in range(q.shape[1])) <= 16
    assert len(seen) == 1  # traced once
