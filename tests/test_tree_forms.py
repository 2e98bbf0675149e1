"""Every tree form, every transform: the matrix of issue 12.

Each public transform runs on each tree form a user brings, in float32 and bfloat16, and its
result is checked (exact zero counts, equality with the masked / dequantized model, jit == eager),
not only run. Where a form cannot support a transform, the transform raises a ``TypeError`` that
names the form and the fix, and the matrix asserts exactly that error (and then runs the fix).

Forms (``FORMS``):

* ``linen_params``: a linen params dict (``variables["params"]`` of ``Dense 8->16->4``);
* ``linen_variables``: a linen variables dict with ``batch_stats`` (conv + BatchNorm + Dense);
  ``prune`` takes its ``params`` collection, as optax does;
* ``nnx_state``: ``nnx.split(model, nnx.Param)``'s ``State`` (``Param`` Variables as leaves);
* ``nnx_pure``: ``nnx.as_pure(state)``, the plain arrays ``nnx.Optimizer.update`` hands optax;
* ``eqx_module``: an Equinox module, whole (its activation functions are leaves too);
* ``eqx_partitioned``: ``eqx.partition(model, eqx.is_inexact_array)[0]`` (``None`` leaves);
* ``list``: plain ``[(w, b), (w, b)]`` lists/tuples of arrays.

Flax forms use the default selection (no ``roles=``: Flax's ``kernel`` layouts); the others pass
``roles=jc.roles(fn, params, x)`` as a user must, and the default there is a clear error.

Cost (CI budget: 2 minutes on 2 cores): tiny models, one ``Form`` per (form, dtype) shared by
every test, one jitted train step per (optimizer, form, mask source) shared by both dtypes,
shapes shared across forms so jcompress's per-layout programs compile once.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jcompress as jc
from jcompress import pruning as P
from jcompress import quantization as Q
from jcompress import tree as jtree

FORMS = (
    "linen_params",
    "linen_variables",
    "nnx_state",
    "nnx_pure",
    "eqx_module",
    "eqx_partitioned",
    "list",
)
FLAX = ("linen_params", "linen_variables", "nnx_state", "nnx_pure")
DTYPES = (jnp.float32, jnp.bfloat16)
SPEC8 = Q.QuantSpec(bits=8)
SPEC4 = Q.QuantSpec(bits=4)


def strict():
    """Strict dtype promotion around jcompress calls (not optax's: they raise under it)."""
    return jax.numpy_dtype_promotion("strict")


_RNG = np.random.default_rng(0)  # NumPy draws: no random-number programs to compile
X = jnp.asarray(_RNG.normal(size=(16, 8)), jnp.float32)
XI = jnp.asarray(_RNG.normal(size=(4, 6, 6, 4)), jnp.float32)  # NHWC


# ----------------------------------------------------------------------------------------------
# Models (one per form, shared by both dtypes)
# ----------------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)  # Dense_0 reads the input
        return nn.Dense(4)(jax.nn.relu(h))


class LinenConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(8, (3, 3))(x)
        h = nn.BatchNorm(use_running_average=True)(h)
        return nn.Dense(4)(jax.nn.relu(h).mean(axis=(1, 2)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def _normal(shape, scale=None):
    scale = 1 / np.sqrt(shape[0]) if scale is None else scale
    return jnp.asarray(_RNG.normal(scale=scale, size=shape), jnp.float32)


def _fill(abstract):
    """Concrete values for an abstract init (``eval_shape``): weights ~ N(0, 1/fan_in), vectors
    0.1 + N(0, 0.1²) (non-zero biases: a model that ignores them would show)."""

    def one(a):
        if len(a.shape) >= 2:
            return _normal(a.shape, 1 / np.sqrt(math.prod(a.shape[:-1])))
        return 0.1 + _normal(a.shape, 0.1)

    return jax.tree.map(one, abstract)


@functools.cache
def model(name):
    """``(float32 params, fn, x, prune_view)``: ``fn(params, x)`` is the model; ``prune_view``
    maps the params to the tree an optax loop trains (the ``params`` collection for linen
    variables) and back: ``(view, rebuild(view) -> params)``."""
    identity = (lambda p: p, lambda p, v: v)
    if name == "linen_params":
        m = LinenMLP()
        p = _fill(jax.eval_shape(m.init, jax.random.key(0), X)["params"])
        return p, lambda p, x: m.apply({"params": p}, x), X, identity
    if name == "linen_variables":
        m = LinenConvBN()
        v = _fill(jax.eval_shape(m.init, jax.random.key(0), XI))
        v["batch_stats"]["BatchNorm_0"]["var"] = 1.0 + jnp.abs(_normal((8,), 1.0))
        return (
            v,
            lambda v, x: m.apply(v, x),
            XI,
            (lambda v: v["params"], lambda v, p: {**v, "params": p}),
        )
    if name in ("nnx_state", "nnx_pure"):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0))), nnx.Param)
        state = _fill(state)
        if name == "nnx_pure":
            state = nnx.as_pure(state)
        return state, lambda s, x: nnx.merge(graphdef, s)(x), X, identity
    if name in ("eqx_module", "eqx_partitioned"):
        m = eqx.filter_eval_shape(eqx.nn.MLP, 8, 4, 16, depth=1, key=jax.random.key(0))
        m = eqx.combine(_fill(eqx.filter(m, lambda a: isinstance(a, jax.ShapeDtypeStruct))), m)
        if name == "eqx_module":
            return m, lambda m, x: jax.vmap(m)(x), X, identity
        params, static = eqx.partition(m, eqx.is_inexact_array)
        return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x), X, identity
    if name == "list":
        p = [(_normal((8, 16)), _normal((16,), 0.1)), (_normal((16, 4)), jnp.zeros(4))]

        def fn(p, x):
            (w1, b1), (w2, b2) = p
            return jax.nn.relu(x @ w1 + b1) @ w2 + b2

        return p, fn, X, identity
    raise ValueError(name)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


class Form:
    """One tree form in one dtype, with lazily computed, shared results."""

    def __init__(self, name, dtype):
        p32, self.fn, x, (self.view, self.rebuild) = model(name)
        self.name, self.dtype = name, dtype
        self.params = _cast(p32, dtype)
        self.x = x.astype(dtype)
        self.flax = name in FLAX
        # roles are the same for both dtypes; a user of a non-Flax layout must pass them
        self.roles = jc.roles(self.fn, p32, x)
        self.kw = {} if self.flax else {"roles": self.roles}
        self.jit = eqx.filter_jit if name == "eqx_module" else jax.jit
        self.grad = eqx.filter_grad if name == "eqx_module" else jax.grad
        self._cache = {}

    def __repr__(self):
        return f"{self.name}-{jnp.dtype(self.dtype).name}"

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def weights(self):
        """Paths of the matmul/conv leaves: what the default selection picks."""
        return [p for p, r in self.roles.items() if r.kind in ("matmul", "conv")]

    def leaves(self, tree):
        return dict(jtree.leaves_with_paths(tree))

    def loss(self, params):
        return jnp.mean(jnp.square(self.fn(params, self.x).astype(jnp.float32)))

    def out(self, params):
        return np.asarray(self.fn(params, self.x), np.float32)

    @property
    def grads(self):
        """``jax.grad`` (Equinox: ``eqx.filter_grad``) of the loss, computed once in float32."""
        if self.dtype != jnp.float32:
            return self.cached("grads", lambda: _cast(get_form(self.name).grads, self.dtype))
        return self.cached("grads", lambda: self.jit(self.grad(self.loss))(self.params))

    @property
    def compressed(self):
        """``jc.compressed(fn)``, one per form (it caches its traced programs per shape)."""
        return self.cached("compressed", lambda: jc.compressed(self.fn))

    @property
    def quantized(self):
        with strict():
            return self.cached("q", lambda: Q.quantize(self.params, SPEC8, **self.kw))


CASES = [(f, d) for f in FORMS for d in DTYPES]


@functools.cache
def get_form(name, dtype=jnp.float32):
    return Form(name, dtype)


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{jnp.dtype(d).name}" for f, d in CASES])
def form(request):
    return get_form(*request.param)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def f32(x):
    return np.asarray(x, np.float32)


def n_zeros(x):
    return int(np.size(x) - np.count_nonzero(f32(x)))


def full(mask, shape):
    return np.broadcast_to(np.asarray(mask, bool), shape)


def k_of(sparsity, size):
    return round(float(np.float32(sparsity)) * size)


def same_structure(a, b):
    is_leaf = jc.is_compressed
    return jax.tree.structure(a, is_leaf=is_leaf) == jax.tree.structure(b, is_leaf=is_leaf)


def assert_trees_equal(a, b):
    """Same structure (Variables and compressed nodes included), dtypes and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if eqx.is_array(x):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x is y or x == y


def role_axes(form, path):
    r = form.roles[path]
    return r.contracting, r.output


def no_roles_error(form):
    """The error the default selection gives where it cannot know the layout."""
    return pytest.raises(ValueError, match=r"(?s)selects no leaf.*roles=jc\.roles\(fn, params")


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

MASKS = ("magnitude", "nm", "structured", "random", "saliency")


def make_masks(form, kind, p=None, **kw):
    p = form.params if p is None else p
    with strict():
        if kind == "magnitude":
            return P.magnitude_masks(p, 0.5, **kw)
        if kind == "nm":
            return P.nm_masks(p, n=2, m=4, **kw)
        if kind == "structured":
            return P.structured_masks(p, 0.5, **kw)
        if kind == "random":
            return P.random_masks(jax.random.key(3), p, 0.5, **kw)
        return P.saliency_masks(p, form.grads, 0.5, **kw)


@pytest.mark.parametrize("kind", MASKS)
def test_masks(form, kind):
    masks = make_masks(form, kind, **form.kw)
    weights = form.leaves(form.params)
    mask_leaves = form.leaves(masks)
    assert list(mask_leaves) == list(weights)  # the params' paths (masks hold plain arrays)
    grads = form.leaves(form.grads) if kind == "saliency" else None
    for path, w in weights.items():
        m = mask_leaves[path]
        if path not in form.weights:
            assert m is True, path
            continue
        w = f32(w)
        keep = full(m, w.shape)
        contracting, output = role_axes(form, path)
        if kind == "nm":  # exactly 2 kept in every 4 along the last contracting axis
            groups = np.moveaxis(keep, contracting[-1], -1)
            groups = groups.reshape(*groups.shape[:-1], -1, 4)
            assert (groups.sum(-1) == 2).all(), path
        elif kind == "structured":  # whole output channels, half of them
            assert np.shape(m) == tuple(w.shape[a] if a in output else 1 for a in range(w.ndim))
            n_out = math.prod(w.shape[a] for a in output)
            assert int(np.size(m) - np.count_nonzero(m)) == k_of(0.5, n_out), path
        else:  # unstructured, per layer: exact count, the lowest scores removed
            assert int(keep.size - keep.sum()) == k_of(0.5, w.size), path
            if kind != "random":
                score = np.abs(w * f32(grads[path])) if grads else np.abs(w)
                assert score[~keep].max() <= score[keep].min(), path
    if kind == "random":  # deterministic
        again = form.leaves(make_masks(form, kind, **form.kw))
        for path in form.weights:
            np.testing.assert_array_equal(again[path], mask_leaves[path])
    if kind == "nm":  # jit == eager (the others run one cached jitted program eagerly too)
        again = form.jit(lambda p: make_masks(form, kind, p=p, **form.kw))(form.params)
        for path in form.weights:
            np.testing.assert_array_equal(form.leaves(again)[path], mask_leaves[path])


@pytest.mark.parametrize("name", FORMS)
def test_masks_where_without_roles(name):
    """where= picks leaves on any layout (unstructured masks need no axes)."""
    form = get_form(name)
    where = ".*(kernel|weight|0/0|1/0)"
    masks = P.magnitude_masks(form.params, 0.5, where=where)
    zeros = {p: int(np.size(m) - np.count_nonzero(m)) for p, m in form.leaves(masks).items()}
    w = form.leaves(form.params)
    assert zeros == {p: k_of(0.5, w[p].size) if p in form.weights else 0 for p in w}


def test_apply_masks(form):
    masks = form.cached("mag", lambda: make_masks(form, "magnitude", **form.kw))
    with strict():
        out = P.apply_masks(form.params, masks)
    assert jax.tree.structure(out) == jax.tree.structure(form.params)
    w, m = form.leaves(form.params), form.leaves(masks)
    for path, o in form.leaves(out).items():
        if not eqx.is_array(o):
            assert o is w[path]
            continue
        assert o.dtype == w[path].dtype
        ref = np.where(full(m[path], w[path].shape), f32(w[path]), 0)
        np.testing.assert_array_equal(f32(o), ref)
    assert_trees_equal(form.jit(P.apply_masks)(form.params, masks), out)
    assert P.sparsity(out, **form.kw) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# prune (optax)
# ----------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}
# float32: adam computes its masks inside the jitted step (a schedule), sgd and adamw fine-tune
# with fixed masks= (a smaller program to compile: the mask machinery does not depend on the
# optimizer). bfloat16: adamw with fixed masks (its weight decay reads the bfloat16 params; the
# schedule's scores are read as exact float32 keys whatever the dtype).
SCHEDULED = "adam"
BF16_OPTIMIZER = "adamw"


def scheduled(opt, dtype):
    return opt == SCHEDULED and dtype == jnp.float32


PRUNE_STEPS = 3


def trained_weights(form):
    """The weight paths of the tree the optax loop trains (linen: the params collection)."""
    if form.name == "linen_variables":
        return [p.removeprefix("params/") for p in form.weights]
    return form.weights


def prune_kw(form):
    return {"roles": form.roles} if not form.flax else {}


def fixed_masks(name):
    """Fixed masks for the trained tree (from the float32 weights: shared by both dtypes)."""
    f = get_form(name)
    return f.cached("prune_masks", lambda: P.magnitude_masks(f.view(f.params), 0.5, **prune_kw(f)))


@functools.cache
def prune_step(opt, name, with_schedule):
    """``(tx, jitted step)`` per (optimizer, form, mask source), shared by both dtypes."""
    form = get_form(name)
    if with_schedule:
        tx = P.prune(OPTIMIZERS[opt](), schedule=P.constant_schedule(0.5), **prune_kw(form))
    else:
        tx = P.prune(OPTIMIZERS[opt](), masks=fixed_masks(name))
    fn, rebuild = form.fn, form.rebuild

    def step(trained, opt_state, x, rest):
        def loss(t):
            return jnp.mean(jnp.square(fn(rebuild(rest, t), x).astype(jnp.float32)))

        grads = jax.grad(loss)(trained)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state

    return tx, jax.jit(step)


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_prune(form, opt):
    if form.name == "eqx_module":
        # optax itself cannot init a tree holding functions: a clear error naming the fix
        tx = P.prune(OPTIMIZERS[opt](), schedule=P.constant_schedule(0.5), **form.kw)
        with pytest.raises(TypeError, match=r"(?s)Equinox.*eqx\.partition\(model"):
            tx.init(form.params)
        return
    if form.dtype != jnp.float32 and opt != BF16_OPTIMIZER:
        pytest.skip(f"bfloat16 runs {BF16_OPTIMIZER} (one compiled step per form and dtype)")
    tx, step = prune_step(opt, form.name, scheduled(opt, form.dtype))
    trained = form.view(form.params)
    structure = jax.tree.structure(trained)
    state = tx.init(trained)
    weights = trained_weights(form)
    for _ in range(PRUNE_STEPS):
        trained, state = step(trained, state, form.x, form.params)
        assert jax.tree.structure(trained) == structure  # Variables, None leaves kept
        leaves, masks = form.leaves(trained), form.leaves(P.masks_of(state))
        for path, leaf in leaves.items():
            assert leaf.dtype == form.dtype, path
            if path not in weights:
                assert masks[path] is True or bool(np.all(masks[path])), path
                continue
            keep = full(masks[path], leaf.shape)
            assert int(keep.size - keep.sum()) == k_of(0.5, leaf.size), path
            assert (f32(leaf)[~keep] == 0).all(), path  # pruned weights exactly zero
            assert (f32(leaf)[keep] != 0).all(), path
    assert not bool(P.nonfinite(state))
    if not scheduled(opt, form.dtype):
        given = form.leaves(fixed_masks(form.name))
        for path in weights:
            np.testing.assert_array_equal(
                full(masks[path], leaves[path].shape), full(given[path], leaves[path].shape)
            )


def _only_weights(tree):
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


@pytest.mark.parametrize("name", ["linen_params", "nnx_state", "eqx_partitioned"])
def test_prune_inside_optax_masked(name):
    """``optax.masked`` hands the inner transform ``MaskedNode`` s where its mask is False (what
    broke jaxpruner): prune sees only the weights, counts stay exact (one eager step; the
    forms whose containers differ: dicts, Variables, an Equinox module with ``None`` leaves)."""
    form = get_form(name)
    trained = form.view(form.params)
    inner = P.prune(optax.adam(1e-2), schedule=P.constant_schedule(0.5), **prune_kw(form))
    tx = optax.masked(inner, _only_weights(trained))
    state = tx.init(trained)
    grads = jax.grad(lambda t: form.loss(form.rebuild(form.params, t)))(trained)
    updates, state = tx.update(grads, state, trained)
    out = optax.apply_updates(trained, updates)
    assert jax.tree.structure(out) == jax.tree.structure(trained)
    weights = trained_weights(form)
    masks = form.leaves(P.masks_of(state))
    assert sorted(masks) == sorted(weights)  # the masked-out biases are not there at all
    for path, leaf in form.leaves(out).items():
        if path in weights:
            keep = full(masks[path], leaf.shape)
            assert int(keep.size - keep.sum()) == k_of(0.5, leaf.size), path
            assert (f32(leaf)[~keep] == 0).all() and (f32(leaf)[keep] != 0).all(), path


def test_prune_fixed_masks_inside_optax_masked():
    form = get_form("linen_params")
    masks = P.magnitude_masks(form.params, 0.5)  # every path: True for the biases
    tx = optax.masked(P.prune(optax.sgd(0.1), masks=masks), _only_weights(form.params))
    state = tx.init(form.params)
    updates, state = tx.update(form.grads, state, form.params)
    out = optax.apply_updates(form.params, updates)
    assert n_zeros(out["Dense_0"]["kernel"]) == k_of(0.5, 128)
    # a mask that prunes a leaf optax.masked hides from prune is an error naming it
    masks["Dense_0"]["bias"] = np.zeros(np.shape(form.params["Dense_0"]["bias"]), bool)
    with pytest.raises(ValueError, match=r"Dense_0/bias: masks prune this leaf.*optax\.masked"):
        optax.masked(P.prune(optax.sgd(0.1), masks=masks), _only_weights(form.params)).init(
            form.params
        )


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------


def test_quantize_dequantize(form):
    q = form.quantized
    assert same_structure(q, form.params)
    w, ql = form.leaves(form.params), form.leaves(q)
    assert [p for p, x in ql.items() if jc.is_compressed(x)] == form.weights
    with strict():
        deq = Q.dequantize(q)
    assert jax.tree.structure(deq) == jax.tree.structure(form.params)
    dl = form.leaves(deq)
    for path, x in ql.items():
        if path not in form.weights:
            assert x is w[path]
            continue
        contracting, output = role_axes(form, path)
        wf = f32(w[path])
        # per output channel: scale = absmax over the contracting axes / 127
        assert x.scale.shape == tuple(wf.shape[a] if a in output else 1 for a in range(wf.ndim))
        ref_scale = np.abs(wf).max(axis=contracting, keepdims=True) / 127
        np.testing.assert_allclose(f32(x.scale), ref_scale, rtol=1e-2)
        assert np.abs(np.asarray(x.values, np.int32)).max() <= 127
        d = dl[path]
        assert d.dtype == form.dtype
        err = np.abs(f32(d) - wf)
        tol = f32(x.scale) / 2 + np.abs(wf) * float(jnp.finfo(form.dtype).eps)
        assert (err <= tol + 1e-7).all(), path
    assert_trees_equal(form.jit(lambda p: Q.quantize(p, SPEC8, **form.kw))(form.params), q)


def test_fake_quantize(form):
    with strict():
        fq = Q.fake_quantize(form.params, SPEC8, **form.kw)
    assert jax.tree.structure(fq) == jax.tree.structure(form.params)
    deq = Q.dequantize(form.quantized)
    for a, b in zip(jax.tree.leaves(fq), jax.tree.leaves(deq)):  # forward: the dequantized model
        if eqx.is_array(a):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(f32(a), f32(b))

    def loss(p):  # a straight-through gradient: the identity inside the clipping range (abs-max:
        out = Q.fake_quantize(p, SPEC8, **form.kw)  # everywhere), under jit
        leaves = [a for a in jax.tree.leaves(out) if eqx.is_array(a)]
        return sum(jnp.sum(a.astype(jnp.float32)) for a in leaves) / 2

    grads = form.jit(form.grad(loss))(form.params)
    # eqx.filter_grad: None for the whole module's functions
    trainable = eqx.filter(form.params, eqx.is_inexact_array)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for g in jax.tree.leaves(grads):
        if eqx.is_array(g):
            assert g.dtype == form.dtype
            np.testing.assert_array_equal(f32(g), 0.5)


# ----------------------------------------------------------------------------------------------
# Calibrated methods (GPTQ, SparseGPT) and statistics
# ----------------------------------------------------------------------------------------------


def _output_error(form, params):
    return float(np.mean((form.out(params) - form.out(form.params)) ** 2))


def test_gptq(form):
    """No roles= on any layout: GPTQ reads them from fn's jaxpr."""
    q = Q.gptq(form.fn, form.params, [(form.x,)], SPEC4, quiet=True)
    assert same_structure(q, form.params)
    assert [p for p, x in form.leaves(q).items() if jc.is_compressed(x)] == form.weights
    for path in form.weights:
        assert form.leaves(q)[path].dtype == form.dtype
    rtn = Q.quantize(form.params, SPEC4, **form.kw)
    assert _output_error(form, Q.dequantize(q)) < _output_error(form, Q.dequantize(rtn))


def test_sparsegpt(form):
    """No roles= on any layout; exact counts; the OBS updates beat zeroing the same weights."""
    pruned, masks = P.sparsegpt(form.fn, form.params, [(form.x,)], 0.5, quiet=True)
    assert jax.tree.structure(pruned) == jax.tree.structure(form.params)
    w, ml = form.leaves(pruned), form.leaves(masks)
    for path in form.weights:
        keep = full(ml[path], w[path].shape)
        assert int(keep.size - keep.sum()) == k_of(0.5, w[path].size)
        assert (f32(w[path])[~keep] == 0).all()
        assert w[path].dtype == form.dtype
    zeroed = P.apply_masks(form.params, masks)
    assert _output_error(form, pruned) < _output_error(form, zeroed)


def _patches(x):
    """Every 3x3 SAME patch of NHWC ``x`` as rows ``(kh, kw, in)``, flattened."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = np.stack(
        [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-2
    )  # (n, h, w, 9, c)
    return rows.reshape(n * h * w, 9 * c)


FIRST = {  # the layer that reads the input
    "linen_params": "Dense_0/kernel",
    "linen_variables": "params/Conv_0/kernel",
    "nnx_state": "l1/kernel",
    "nnx_pure": "l1/kernel",
    "eqx_module": "layers/0/weight",
    "eqx_partitioned": "layers/0/weight",
    "list": "0/0",
}


def test_capture(form):
    with strict():
        stats = jc.capture(form.fn, form.params, form.x)
    assert sorted(stats) == sorted(form.weights)
    first = FIRST[form.name]
    x = f32(form.x)
    rows = _patches(x) if x.ndim == 4 else x  # what the first layer reads
    s = stats[first]
    np.testing.assert_allclose(f32(s.absmax), np.abs(rows).max(0), rtol=1e-6)
    np.testing.assert_allclose(f32(s.sumsq), (rows**2).sum(0), rtol=1e-4)
    for path, st in stats.items():
        assert int(st.count) == (rows.shape[0] if path == first else x.shape[0]), path


# ----------------------------------------------------------------------------------------------
# Runtime: jc.compressed
# ----------------------------------------------------------------------------------------------


def assert_close(form, actual, desired):
    """Equal up to float rounding: a few ulps in float32; in bfloat16 (8-bit mantissa), two
    roundings of a hidden layer in another association order, relative to the output's scale."""
    actual, desired = f32(actual), f32(desired)
    if form.dtype == jnp.float32:
        np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(actual, desired, rtol=0, atol=2e-2 * np.abs(desired).max())


def test_compressed(form):
    q = form.quantized
    out = f32(form.compressed(q, form.x))
    assert out.shape == form.out(form.params).shape
    assert_close(form, out, form.out(Q.dequantize(q)))


# ----------------------------------------------------------------------------------------------
# Structure: dependencies + shrink, low rank
# ----------------------------------------------------------------------------------------------


def n_params(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree) if eqx.is_array(x))


def test_dependencies_shrink(form):
    groups = jc.structure.dependencies(form.fn, form.params, form.x)
    free = [g for g in groups if g.blocked is None]
    assert [g.size for g in free] == [16 if form.name != "linen_variables" else 8]
    assert all("output" in g.blocked for g in groups if g.blocked is not None)
    with strict():
        masks = P.structured_masks(form.params, 0.5, groups=groups, **form.kw)
    masked = P.apply_masks(form.params, masks)
    if form.name == "eqx_module":
        with pytest.raises(TypeError, match=r"(?s)Equinox.*eqx\.partition\(model"):
            jc.structure.shrink(form.fn, form.params, masks, form.x)
        return
    small_fn, small = jc.structure.shrink(form.fn, form.params, masks, form.x)
    assert type(small) is type(form.params)
    assert n_params(small) < n_params(form.params)
    for member in free[0].members:  # every member lost half its channels
        before = np.shape(form.leaves(form.params)[member.path])[member.axis]
        assert np.shape(form.leaves(small)[member.path])[member.axis] == before // 2
    assert_close(form, small_fn(small, form.x), form.out(masked))


def test_low_rank(form):
    with strict():
        lr = jc.structure.low_rank(form.params, rank=2, **form.kw)
    assert same_structure(lr, form.params)
    factored = {p: x for p, x in form.leaves(lr).items() if jc.is_compressed(x)}
    # every matmul leaf where rank 2 saves memory (convs stay dense, with a reason)
    assert sorted(factored) == sorted(p for p in form.weights if form.roles[p].kind == "matmul")
    w = form.leaves(form.params)
    for path, x in factored.items():
        wf = f32(w[path])
        contracting, output = role_axes(form, path)
        mat = np.transpose(wf, contracting + output).reshape(
            math.prod(wf.shape[a] for a in contracting), -1
        )
        u, s, vt = np.linalg.svd(mat, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        best = best.reshape([wf.shape[a] for a in contracting + output])
        best = np.transpose(best, np.argsort(contracting + output))
        assert x.dtype == form.dtype
        tol = 1e-4 if form.dtype == jnp.float32 else 5e-2
        np.testing.assert_allclose(f32(x.dequantize()), best, atol=tol * np.abs(wf).max())
    out = f32(form.compressed(lr, form.x))
    assert_close(form, out, form.out(Q.dequantize(lr)))


# ----------------------------------------------------------------------------------------------
# The default selection (no roles=)
# ----------------------------------------------------------------------------------------------

DEFAULTS = {  # the transforms that take roles= and select by default
    **{f"{kind}_masks": functools.partial(make_masks, kind=kind) for kind in MASKS},
    "quantize": lambda form, **kw: Q.quantize(form.params, SPEC8, **kw),
    "fake_quantize": lambda form, **kw: Q.fake_quantize(form.params, SPEC8, **kw),
    "low_rank": lambda form, **kw: jc.structure.low_rank(form.params, rank=2, **kw),
}


@pytest.mark.parametrize("transform", DEFAULTS)
def test_default_selection(form, transform):
    """Flax forms need no roles= (the same result); other layouts get a clear error naming
    roles=jc.roles(...), never scales or groups on the wrong axes."""
    run = DEFAULTS[transform]
    if form.flax:
        assert_trees_equal(run(form), run(form, roles=form.roles))
    else:
        with no_roles_error(form):
            run(form)


# ----------------------------------------------------------------------------------------------
# Checkpoints and export
# ----------------------------------------------------------------------------------------------

EQX_CHECKPOINT = r"(?s)Equinox module.*jc\.tree\.leaves_with_paths"


@pytest.mark.parametrize("which", ["float", "quantized"])
def test_checkpoint_round_trip(form, which, tmp_path):
    tree = form.params if which == "float" else form.quantized
    if form.name.startswith("eqx"):
        with pytest.raises(TypeError, match=EQX_CHECKPOINT):
            jc.checkpoint.save(tmp_path / "ckpt", tree)
        # the fix the message gives: save the arrays by path, rebuild into the module
        arrays = eqx.filter(tree, eqx.is_array)
        jc.checkpoint.save(tmp_path / "by_path", dict(jtree.leaves_with_paths(arrays)))
        loaded = jc.checkpoint.load(tmp_path / "by_path")
        loaded = eqx.combine(
            jtree.map_with_paths(lambda p, x, saved: saved, arrays, loaded),
            tree,
        )
    else:
        jc.checkpoint.save(tmp_path / "ckpt", tree)
        loaded = jc.checkpoint.load(tmp_path / "ckpt")
    assert_trees_equal(loaded, tree)


def test_export(form):
    """Every form exports as it is (the artifact's argument is the flat {path: leaf} dict)."""
    q, fn, x = form.quantized, form.fn, form.x
    exported = jc.load_exported(jc.export(fn, q, x))
    out = exported.call(q, x)
    np.testing.assert_array_equal(f32(out), f32(form.compressed(q, x)))
