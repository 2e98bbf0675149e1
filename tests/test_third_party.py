"""jcompress end to end on Flax model code that nobody on the project wrote.

The models come from libraries users already run, used exactly as those libraries ship them:

* Hugging Face ``transformers`` **4.57.6** (``pip install "jcompress[thirdparty]"``, which the
  ``test`` extra includes). transformers removed its Flax models in version 5, so 4.57.6, the
  last 4.x release, is pinned. Tiny configurations, random parameters drawn from a seed in the
  shapes the library's own init gives (``_do_init=False`` + ``jax.eval_shape``): no weights are
  downloaded.

  - ``FlaxLlamaForCausalLM``: grouped-query attention (``num_key_value_heads`` <
    ``num_attention_heads``), rotary embeddings, RMSNorm, SwiGLU MLP; Dense kernels ``(in, out)``.
  - ``FlaxGPT2LMHeadModel``: its ``Conv1D`` kernels are stored **``(out, in)``** and transposed
    in the forward pass; ``c_attn`` is one ``(3 * d, d)`` kernel split into q, k, v; the output
    head is the **tied** token embedding (``wte.T``), so there is no ``lm_head`` leaf.
  - ``FlaxBertModel`` (no pooler): post-LayerNorm encoder, heads split out of Dense outputs.
  - ``FlaxResNetForImageClassification``: convolutions, BatchNorm in inference mode with
    ``batch_stats``, projection shortcuts.

* A model written in Flax **nnx** by a maintained JAX library: ``Llama3`` from Google's
  ``tunix`` (``pip install --no-deps -r tests/requirements-nnx.txt``, as ``.ci/run`` does: the
  pinned packages its model code imports, not its ~50-package dependency set; that set also
  resolves next to transformers 4.57.6 without changing jax or flax): attention kernels are
  ``(embed, heads, head_dim)`` / ``(heads, head_dim, embed)`` einsum weights named ``w``, the MLP is
  ``nnx.Linear``, the output head is the tied embedding; the parameters are an ``nnx.State`` from
  ``nnx.split`` (its own init sets the MLP kernels to zero: the parameters are drawn here as for
  the others). Other nnx candidates tried on jax 0.10.2 / flax 0.12.8 / Python 3.11:

  - ``jax-bonsai`` 0.0.1 (PyPI): an empty placeholder package (its ``__init__.py`` is empty, no
    models);
  - ``easydel`` 0.3.0: requires ``flax==0.12.3`` and, through ``eformer``, jax 0.9.2: installing
    it would downgrade jax and flax;
  - ``gemma``: 4.x requires Python >= 3.12; 3.3.0 installs but its models (``gemma.gm.nn``) are
    linen modules, not nnx;
  - ``penzai``: not a Flax library (its own ``pz.nn``), so not a candidate.

Each model is wrapped as ``fn(params, *args) -> array`` (for linen:
``lambda p, ids: model.module.apply({"params": p}, ids, ...).logits``) and run through: roles
against the layout each library documents; ``quantize`` + ``jc.compressed`` against the
dequantized model; GPTQ against round-to-nearest and SparseGPT against magnitude pruning on
held-out inputs; ``dependencies`` + ``shrink`` against the masked model (and the blocked reasons
where a group cannot shrink); ``prune`` training steps at exact sparsity; distillation between two
Llamas; checkpoint round trip from a relative path; ``jc.export``.

Data is made here: token ids with Zipf-distributed frequencies (as in text, so the inputs of
every layer are anisotropic, which is what calibrated methods exploit; uniform random tokens make
every input covariance nearly isotropic) and random images constant on 4 x 4 blocks.

What is not supported is marked ``xfail(strict=True)`` with the reason, and listed in README's
"Third-party models".
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jcompress as jc
from jcompress.pruning import (
    apply_masks,
    constant_schedule,
    magnitude_masks,
    masks_of,
    prune,
    sparsegpt,
    structured_masks,
)
from jcompress.quantization import QuantSpec, dequantize, gptq, quantize
from jcompress.structure import dependencies, shrink
from jcompress.tree import Role, leaves_with_paths

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxLlamaForCausalLM"):  # pragma: no cover - transformers >= 5
    pytest.skip(
        f"transformers {transformers.__version__} has no Flax models (removed in version 5); "
        'install "jcompress[thirdparty]" (transformers==4.57.6)',
        allow_module_level=True,
    )

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning:transformers"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:tunix"),
    pytest.mark.filterwarnings("ignore:.sharding. is deprecated:DeprecationWarning"),
]

VOCAB, SEQ, BATCH = 128, 8, 8

DENSE = Role("matmul", contracting=(0,), output=(1,))  # Flax Dense (in, out)
OUT_IN = Role("matmul", contracting=(1,), output=(0,))  # GPT-2 Conv1D (out, in)
EMBED = Role("gather", contracting=(1,), output=(0,))  # (vocab, features), tied or not
CONV = Role("conv", contracting=(0, 1, 2), output=(3,))  # (kh, kw, in, out)
OTHER = Role("other")


def tokens(seed: int, batch: int = BATCH) -> jax.Array:
    """``(batch, SEQ)`` int32 token ids with Zipf frequencies (``p(i) ∝ 1 / (i + 1)``)."""
    p = 1.0 / np.arange(1, VOCAB + 1)
    ids = np.random.default_rng(seed).choice(VOCAB, size=(batch, SEQ), p=p / p.sum())
    return jnp.asarray(ids, jnp.int32)


def images(seed: int, batch: int = BATCH) -> jax.Array:
    """``(batch, 32, 32, 3)`` random images, constant on 4 x 4 blocks (correlated pixels)."""
    noise = np.random.default_rng(seed).standard_normal((batch, 8, 8, 3), np.float32)
    return jnp.asarray(noise.repeat(4, axis=1).repeat(4, axis=2))


def positions(ids: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)


def n_params(tree: Any) -> int:
    return sum(int(np.size(x)) for _, x in leaves_with_paths(tree))


def mse(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.mean(jnp.square(a - b)))


@dataclasses.dataclass(eq=False)
class Case:
    """One third-party model: ``fn(params, *args)``, its data and the layout it documents."""

    name: str
    fn: Callable[..., jax.Array]
    params: Any
    data: Callable[[int], tuple]  # seed -> argument tuple
    expected_role: Callable[[str], Role]
    # the part optax trains and the function of it (ResNet: params with batch_stats bound)
    train: Callable[[Any], tuple[Callable[..., jax.Array], Any]] = lambda fn, p: (fn, p)

    @functools.cached_property
    def held(self) -> tuple:
        return self.data(1000)

    @functools.cached_property
    def calib(self) -> list[tuple]:
        return [self.data(i) for i in range(4)]

    @functools.cached_property
    def roles(self) -> dict[str, Role]:
        return jc.roles(self.fn, self.params, *self.held)

    @functools.cached_property
    def jfn(self) -> Callable[..., jax.Array]:
        return jax.jit(self.fn)

    @functools.cached_property
    def cfn(self) -> Callable[..., jax.Array]:
        return jc.compressed(self.fn)

    @functools.cached_property
    def reference(self) -> jax.Array:
        return self.jfn(self.params, *self.held)

    def error(self, tree: Any) -> float:
        """Mean squared output error of ``tree`` (dequantized) on the held-out inputs."""
        return mse(self.jfn(dequantize(tree), *self.held), self.reference)

    def weights(self, path: str, _leaf: Any = None) -> bool:
        """The default selection of calibrated methods: matmul and conv leaves."""
        return self.roles[path].kind in ("matmul", "conv")

    @functools.cached_property
    def gptq(self) -> Any:
        return run_gptq(self, self.roles)

    @functools.cached_property
    def sparsegpt(self) -> tuple[Any, Any]:
        return run_sparsegpt(self, self.roles)


# ----------------------------------------------------------------------------------------------
# The models (module scope: built, traced and compiled once)
# ----------------------------------------------------------------------------------------------


def draw(shapes: Any, seed: int) -> Any:
    """Random parameters of the shapes a library's own init gives (``jax.eval_shape`` of it).

    Weights and embeddings ``N(0, 0.1²)``; norm scales (``scale``, ``weight``, ``w``) and running
    variances ``U(0.5, 1.5)``; biases and running means ``N(0, 0.1²)``, so every BatchNorm and
    norm parameter matters. Drawn with NumPy: the libraries' own initialisers take 3-11 s per
    model to compile on CPU (XLA compiles each 4-D ``jax.random.normal`` for ~2 s).
    """
    rng = np.random.default_rng(seed)

    def one(path, s):
        name = jc.tree.path_str(path).rsplit("/", 1)[-1]
        if len(s.shape) == 1 and name in ("scale", "weight", "w", "var"):
            x = rng.uniform(0.5, 1.5, s.shape)
        else:
            x = 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def _hf(cls, config, input_shape, seed, **kwargs):
    """A transformers Flax model without its own init, and random parameters for it."""
    model = cls(config, input_shape=input_shape, _do_init=False, **kwargs)
    init = functools.partial(model.init_weights, input_shape=input_shape)
    return model, draw(jax.eval_shape(init, jax.random.key(0)), seed)


def _hf_lm(model) -> Callable[..., jax.Array]:
    def fn(p, ids):
        return model.module.apply({"params": p}, ids, jnp.ones_like(ids), positions(ids)).logits

    return fn


def _llama(layers: int, seed: int):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * SEQ,
    )  # fmt: skip
    return _hf(transformers.FlaxLlamaForCausalLM, config, (1, SEQ), seed)


def _flax_role(path: str) -> Role:
    return DENSE if path.endswith("kernel") else EMBED if path.endswith("embedding") else OTHER


@pytest.fixture(scope="module")
def llama() -> Case:
    model, params = _llama(2, seed=0)
    return Case("llama", _hf_lm(model), params, lambda s: (tokens(s),), _flax_role)


@pytest.fixture(scope="module")
def gpt2() -> Case:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=2 * SEQ
    )
    model, params = _hf(transformers.FlaxGPT2LMHeadModel, config, (1, SEQ), seed=0)

    def role(path):
        return OUT_IN if path.endswith("kernel") else _flax_role(path)

    return Case("gpt2", _hf_lm(model), params, lambda s: (tokens(s),), role)


@pytest.fixture(scope="module")
def bert() -> Case:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=2 * SEQ,
    )  # fmt: skip
    cls = transformers.FlaxBertModel
    model, params = _hf(cls, config, (1, SEQ), seed=0, add_pooling_layer=False)

    def fn(p, ids):
        mask, types = jnp.ones_like(ids), jnp.zeros_like(ids)
        return model.module.apply({"params": p}, ids, mask, types, positions(ids), None)[0]

    return Case("bert", fn, params, lambda s: (tokens(s),), _flax_role)


@pytest.fixture(scope="module")
def resnet() -> Case:
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=10,
    )  # fmt: skip
    cls = transformers.FlaxResNetForImageClassification
    model, variables = _hf(cls, config, (1, 32, 32, 3), seed=0)
    assert set(variables) == {"params", "batch_stats"}

    def fn(v, x):  # inference mode: BatchNorm reads the running statistics
        return model.module.apply(v, x, deterministic=True).logits

    def role(path):
        if path.startswith("params/") and path.endswith("kernel"):
            return CONV if "convolution" in path else DENSE
        return OTHER

    def train(fn, v):
        stats = v["batch_stats"]
        return (lambda p, x: fn({"params": p, "batch_stats": stats}, x)), v["params"]

    return Case("resnet", fn, variables, lambda s: (images(s),), role, train)


@pytest.fixture(scope="module")
def tunix_llama3() -> Case:
    llama3 = pytest.importorskip("tunix.models.llama3.model")
    config = llama3.ModelConfig(
        num_layers=2, vocab_size=VOCAB, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
        num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5, weight_tying=True,
    )  # fmt: skip
    graph, shapes = nnx.split(nnx.eval_shape(lambda: llama3.Llama3(config, rngs=nnx.Rngs(0))))
    state = draw(shapes, seed=0)  # an nnx.State of Param variables

    def fn(st, ids):
        causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))
        mask = jnp.broadcast_to(causal, (ids.shape[0], SEQ, SEQ))
        return nnx.merge(graph, st)(ids, positions(ids), None, mask)[0]

    def role(path):
        if re.fullmatch(r".*/(q|k|v)_proj/w", path):
            return Role("matmul", contracting=(0,), output=(1, 2))  # (embed, heads, head_dim)
        if path.endswith("o_proj/w"):
            return Role("matmul", contracting=(0, 1), output=(2,))  # (heads, head_dim, embed)
        return EMBED if path.endswith("input_embedding") else _flax_role(path)

    return Case("tunix_llama3", fn, state, lambda s: (tokens(s),), role)


MODELS = ["llama", "gpt2", "bert", "resnet", "tunix_llama3"]


@pytest.fixture(params=MODELS)
def case(request) -> Case:
    return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------------------------


def test_roles_match_each_library_layout(case):
    expected = {path: case.expected_role(path) for path, _ in leaves_with_paths(case.params)}
    assert case.roles == expected


def test_gpt2_tied_head_reads_the_embedding_rows(gpt2):
    """The only output projection is ``wte.T``: the embedding is consumed by the gather and by
    the head's matmul with the same axes (rows = vocabulary = the head's output channels)."""
    assert "lm_head" not in gpt2.params
    wte = "transformer/wte/embedding"
    head = jc.roles(lambda p, h: h @ p["transformer"]["wte"]["embedding"].T, gpt2.params,
                    jnp.ones((2, 32)))  # fmt: skip
    assert head[wte] == Role("matmul", contracting=(1,), output=(0,))
    assert gpt2.roles[wte] == EMBED


# ----------------------------------------------------------------------------------------------
# Quantization: compressed == dequantized; GPTQ < RTN
# ----------------------------------------------------------------------------------------------

SPEC8 = QuantSpec(bits=8)
SPEC3 = QuantSpec(bits=3)


def scale_shape(leaf_shape: tuple[int, ...], role: Role) -> tuple[int, ...]:
    """Per-channel scales: the role's output axes kept, every other axis reduced to 1."""
    return tuple(n if a in role.output else 1 for a, n in enumerate(leaf_shape))


def test_quantize_compressed_equals_dequantized(case):
    q = quantize(case.params, SPEC8, roles=case.roles)
    for path, leaf in leaves_with_paths(q):
        role = case.roles[path]
        assert jc.is_compressed(leaf) == (role.kind != "other"), path
        if role.kind != "other":
            assert leaf.scale.shape == scale_shape(leaf.shape, role), path
    out = case.cfn(q, *case.held)
    ref = case.jfn(dequantize(q), *case.held)
    assert out.shape == ref.shape == case.reference.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))


def test_gpt2_quantize_without_roles_puts_scales_on_flax_axes(gpt2):
    """Without ``roles=``, ``quantize`` assumes Flax layouts: a GPT-2 ``(out, in)`` kernel gets
    per-*input* scales and groups along its output axis. ``roles=jc.roles(fn, ...)`` fixes both."""
    path = "transformer/h/0/attn/c_attn/kernel"  # (out, in) = (96, 32)

    def leaf(tree):
        return dict(leaves_with_paths(tree))[path]

    assert leaf(gpt2.params).shape == (96, 32)
    per_channel, per_group = SPEC8, QuantSpec(bits=4, granularity=jc.quantization.PerGroup(16))
    assert leaf(quantize(gpt2.params, per_channel)).scale.shape == (1, 32)  # wrong: per input
    assert leaf(quantize(gpt2.params, per_channel, roles=gpt2.roles)).scale.shape == (96, 1)
    assert leaf(quantize(gpt2.params, per_group)).scale.shape == (6, 32)  # groups across outputs
    assert leaf(quantize(gpt2.params, per_group, roles=gpt2.roles)).scale.shape == (96, 2)
    # the tied embedding is named like Flax's Embed, so its default role is already right
    wte = dict(leaves_with_paths(quantize(gpt2.params, per_channel)))["transformer/wte/embedding"]
    assert wte.scale.shape == (VOCAB, 1)


def run_gptq(case: Case, roles: dict[str, Role] | None) -> Any:
    return gptq(case.fn, case.params, case.calib, SPEC3, roles=roles, layers_per_pass=None,
                quiet=True)  # fmt: skip


def run_sparsegpt(case: Case, roles: dict[str, Role] | None) -> tuple[Any, Any]:
    return sparsegpt(case.fn, case.params, case.calib, 0.5, roles=roles, layers_per_pass=None,
                     quiet=True)  # fmt: skip


@pytest.mark.slow
def test_gptq_beats_round_to_nearest(case):
    q = case.gptq
    rtn = quantize(case.params, SPEC3, where=case.weights, roles=case.roles)
    for path, leaf in leaves_with_paths(q):  # the same layout quantize gives
        assert jc.is_compressed(leaf) == case.weights(path), path
        if case.weights(path):
            assert leaf.scale.shape == dict(leaves_with_paths(rtn))[path].scale.shape
    assert case.error(q) < case.error(rtn)


# ----------------------------------------------------------------------------------------------
# Pruning: SparseGPT < magnitude; training at exact sparsity
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sparsegpt_beats_magnitude(case):
    pruned, masks = case.sparsegpt
    for path, mask in leaves_with_paths(masks):
        if case.weights(path):  # every output channel loses exactly half its inputs
            role = case.roles[path]
            removed = np.sum(~np.asarray(mask), axis=role.contracting)
            inputs = int(np.prod([np.shape(mask)[a] for a in role.contracting]))
            assert (removed == round(0.5 * inputs)).all(), path
        else:
            assert np.all(mask), path
    magnitude = magnitude_masks(case.params, 0.5, where=case.weights, roles=case.roles)
    assert case.error(pruned) < case.error(apply_masks(case.params, magnitude))


@pytest.mark.slow
def test_prune_training_steps_keep_exact_sparsity(case):
    fn, params = case.train(case.fn, case.params)
    roles = jc.roles(fn, params, *case.held)
    tx = prune(optax.adam(1e-3), schedule=constant_schedule(0.5), roles=roles)
    targets = [jax.jit(fn)(params, *args) for args in case.calib]

    @jax.jit
    def step(p, state, args, target):  # recover the dense model's outputs while pruned
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.square(fn(p, *args) - target)))(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    p, state, losses = params, tx.init(params), []
    for args, target in zip(case.calib, targets):
        p, state, loss = step(p, state, args, target)
        losses.append(float(loss))
    masks = dict(leaves_with_paths(masks_of(state)))
    selected = {path for path, r in roles.items() if r.kind in ("matmul", "conv", "gather")}
    assert {path for path, m in masks.items() if np.ndim(m)} == selected
    for path, leaf in leaves_with_paths(p):
        zeros = int(np.sum(np.asarray(leaf) == 0))
        assert zeros == (round(0.5 * np.size(leaf)) if path in selected else 0), path
    # dense at the first step (pruned by its update), then recovering the dense outputs
    assert losses[0] < 1e-6 * losses[1] and 0 < losses[-1] < losses[1]


# ----------------------------------------------------------------------------------------------
# Structure: dependencies + shrink == masked model, or the blocked reason
# ----------------------------------------------------------------------------------------------

# shapes after pruning half of every group a kernel owns
SHRUNK = {
    "llama": {
        r".*mlp/(gate|up)_proj/kernel": (32, 32),
        r".*mlp/down_proj/kernel": (32, 32),
        r".*self_attn/q_proj/kernel": (32, 16),  # one of two kv heads, with its two q heads
        r".*self_attn/(k|v)_proj/kernel": (32, 8),
        r".*self_attn/o_proj/kernel": (16, 32),
        r"lm_head/kernel": (32, VOCAB),
        r"model/embed_tokens/embedding": (VOCAB, 32),
    },
    "gpt2": {
        r".*mlp/c_fc/kernel": (32, 32),  # (out, in): its output axis 0 shrinks
        r".*mlp/c_fc/bias": (32,),
        r".*mlp/c_proj/kernel": (32, 32),  # and the next kernel's input axis 1
        r".*attn/c_attn/kernel": (96, 32),  # q, k, v split out of one output: blocked
        r".*attn/c_proj/kernel": (32, 32),
    },
    "bert": {
        r".*intermediate/dense/kernel": (32, 32),
        r".*layer/\d/output/dense/kernel": (32, 32),
        r".*self/(query|key|value)/kernel": (32, 16),  # two of four heads
        r".*self/(query|key|value)/bias": (16,),
        r".*attention/output/dense/kernel": (16, 32),
    },
    "resnet": {
        r"params/resnet/embedder/embedder/convolution/kernel": (7, 7, 3, 4),
        r"params/.*stages/0/.*/convolution/kernel": (3, 3, 4, 4),
        r"params/.*stages/1/.*layer_0/convolution/kernel": (3, 3, 4, 8),
        r"params/.*stages/1/.*layer_1/convolution/kernel": (3, 3, 8, 8),
        r"params/.*shortcut/convolution/kernel": (1, 1, 4, 8),
        r"(params|batch_stats)/.*shortcut/normalization/(scale|bias|mean|var)": (8,),
        r"params/classifier/1/kernel": (8, 10),
    },
    "tunix_llama3": {
        r".*mlp/(gate|up)_proj/kernel": (32, 32),
        r".*mlp/down_proj/kernel": (32, 32),
        r".*attn/q_proj/w": (32, 2, 8),  # one kv head with its two q heads; rotary: head_dim kept
        r".*attn/k_proj/w": (32, 1, 8),
        r".*attn/v_proj/w": (32, 1, 4),  # v's head_dim meets only o_proj: it shrinks too
        r".*attn/o_proj/w": (2, 4, 32),
        r"embedder/input_embedding": (VOCAB, 32),
    },
}
# every blocked group, in order, by its reason (re.search)
LN = r"is reduced over by `reduce_sum` in .*{}"
BLOCKED = {
    "llama": [LN.format("layers/0/input_layernorm"), "reaches the model output"],
    "gpt2": [
        LN.format("h/0/ln_1"),
        "is split by `split` in .*h/0/attn",  # c_attn: q, k and v out of one kernel
        "is split by `split` in .*h/1/attn",
        "reaches the model output .*wte/embedding axis 0 is indexed by `gather`",
    ],
    "bert": [LN.format("embeddings/LayerNorm") + ".*reaches the model output"],
    "resnet": ["reaches the model output"],  # every conv channel, residual streams too, shrinks
    "tunix_llama3": [
        LN.format("rms_norm"),
        *["is split by `split` in attention"] * 4,  # rotary embedding: q/k head_dim
        "reaches the model output",
    ],
}


@pytest.mark.slow
def test_dependencies_and_shrink_equal_the_masked_model(case):
    groups = dependencies(case.fn, case.params, *case.held)
    blocked = [g.blocked for g in groups if g.blocked is not None]
    assert len(blocked) == len(BLOCKED[case.name]), blocked
    for reason, pattern in zip(blocked, BLOCKED[case.name]):
        assert re.search(pattern, reason), (reason, pattern)
    masks = structured_masks(case.params, 0.5, groups=groups, roles=case.roles)
    small_fn, small = shrink(case.fn, case.params, masks, *case.held)
    shapes = {path: np.shape(x) for path, x in leaves_with_paths(small)}
    for pattern, shape in SHRUNK[case.name].items():
        hits = [path for path in shapes if re.fullmatch(pattern, path)]
        assert hits and all(shapes[path] == shape for path in hits), (pattern, shape, hits)
    assert n_params(small) < n_params(case.params)
    masked = case.jfn(apply_masks(case.params, masks), *case.held)
    assert mse(masked, case.reference) > 0  # something was removed
    out = jax.jit(small_fn)(small, *case.held)
    np.testing.assert_allclose(out, masked, rtol=1e-4, atol=1e-5 * float(jnp.abs(masked).max()))


# ----------------------------------------------------------------------------------------------
# Calibrated methods and quantize, with roles= and without (GPT-2's (out, in) kernels)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["gptq", "sparsegpt"])
def test_calibrated_methods_read_roles_from_fn(request, model, method):
    """Without ``roles=`` a calibrated method reads the roles from ``fn``'s jaxpr, so it gives
    exactly the result of ``roles=jc.roles(fn, params, *args)`` on Flax layouts and on GPT-2's
    ``(out, in)`` kernels alike (issue 12, failure 5: it used to assume Flax layouts there)."""
    case = request.getfixturevalue(model)
    run = {"gptq": run_gptq, "sparsegpt": run_sparsegpt}[method]
    with_roles, without = getattr(case, method), run(case, None)
    assert jax.tree.structure(without) == jax.tree.structure(with_roles)
    for a, b in zip(jax.tree.leaves(with_roles), jax.tree.leaves(without)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Distillation between two Llamas
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_distill_two_layer_llama_into_one_layer(llama):
    student_model, student = _llama(1, seed=1)
    student_fn = _hf_lm(student_model)
    assert n_params(student) < n_params(llama.params)
    loss_fn = jc.distillation.distillation_loss(student_fn, llama.fn, temperature=2.0, alpha=1.0)
    held_out = jax.jit(lambda s, ids: loss_fn(s, llama.params, ids)[0])
    opt = optax.adam(1e-2)
    step = jc.distillation.make_train_step(loss_fn, opt)
    before, state = float(held_out(student, llama.held[0])), opt.init(student)
    for i in range(12):
        student, state, loss, _ = step(student, state, llama.params, tokens(100 + i))
        assert np.isfinite(float(loss))
    after = float(held_out(student, llama.held[0]))
    assert after < 0.6 * before  # the KD loss on held-out sequences


# ----------------------------------------------------------------------------------------------
# Checkpoints (relative paths) and export
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_round_trip_and_export(case, tmp_path, monkeypatch):
    q = quantize(case.params, SPEC8, roles=case.roles)
    monkeypatch.chdir(tmp_path)
    jc.checkpoint.save(f"checkpoints/{case.name}", q)
    loaded = jc.checkpoint.load(f"checkpoints/{case.name}")
    assert jax.tree.structure(loaded, is_leaf=jc.is_compressed) == jax.tree.structure(
        q, is_leaf=jc.is_compressed
    )
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(loaded)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    expected = case.cfn(q, *case.held)
    np.testing.assert_array_equal(case.cfn(loaded, *case.held), expected)
    # any tree form exports, nnx.State included (its arrays travel as a {path: leaf} dict)
    exported = jc.load_exported(jc.export(case.fn, loaded, *case.held))
    np.testing.assert_allclose(exported.call(loaded, *case.held), expected, rtol=1e-5, atol=1e-6)


def test_export_nnx_state_and_its_pure_dict(tunix_llama3):
    """A model holding a list of layers: its pure dict has integer keys; both forms export."""
    case = tunix_llama3
    q = quantize(case.params, SPEC8, roles=case.roles)
    expected = case.cfn(q, *case.held)
    for tree in (q, nnx.to_pure_dict(q)):
        exported = jc.load_exported(jc.export(case.fn, tree, *case.held))
        np.testing.assert_allclose(exported.call(tree, *case.held), expected, rtol=1e-5, atol=1e-6)
