"""A small character-level transformer LM on Python's own standard library sources.

The model (:class:`CharLM`) is a 2-layer pre-LN causal transformer over bytes (vocabulary 256,
``d_model`` 128, 4 heads, MLP 512, context 64) whose q/k/v/o projections, MLP and output head are
plain ``nn.Dense`` layers, so every matmul kernel has an input dimension of 128 or 512 (groups of
64 fit). It was trained once (:func:`train_charlm`, 1200 AdamW steps of 32 windows) on a fixed
list of standard-library modules; the weights ship with the package as ``charlm_weights.npz``
(float16, under 1 MB) and :func:`load_charlm` restores them as float32, so tests and CI never
train it.

Held-out text is a disjoint fixed list of modules (:data:`HELDOUT_MODULES`). The standard library
changes a little between Python versions, so perplexities differ slightly between interpreters;
within one interpreter everything is deterministic.

Parameter layout (linen dict, ``params`` collection)::

    tok/embedding            (256, 128)
    pos                      (64, 128)
    block_i/ln1/{scale,bias} (128,)
    block_i/{q,k,v,o}/kernel (128, 128)   (+ bias (128,))
    block_i/ln2/{scale,bias} (128,)
    block_i/up/kernel        (128, 512)   block_i/down/kernel (512, 128)
    ln_f/{scale,bias}        (128,)
    head/kernel              (128, 256)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CONTEXT",
    "HELDOUT_MODULES",
    "TRAIN_MODULES",
    "VOCAB",
    "CharLM",
    "charlm_nll",
    "charlm_perplexity",
    "calibration_windows",
    "calibrated_variants",
    "charlm_text",
    "heldout_windows",
    "load_charlm",
    "train_charlm",
]

VOCAB = 256
CONTEXT = 64
WEIGHTS = os.path.join(os.path.dirname(__file__), "charlm_weights.npz")

TRAIN_MODULES: tuple[str, ...] = (
    "argparse", "ast", "calendar", "collections/__init__", "configparser", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "functools", "gettext", "heapq", "inspect",
    "ipaddress", "locale", "logging/__init__", "ntpath", "numbers", "optparse", "pathlib",
    "pickle", "pprint", "random", "shutil", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "threading", "tokenize", "traceback", "typing", "uuid", "zipfile",
)  # fmt: skip
"""Training modules (paths under ``os.path.dirname(os.__file__)``, without ``.py``)."""

HELDOUT_MODULES: tuple[str, ...] = ("textwrap", "fractions", "shlex", "bisect", "colorsys")
"""Held-out standard-library modules (never seen in training)."""


def charlm_text(modules: Sequence[str]) -> bytes:
    """Concatenated source bytes of standard-library modules, in the given order.

    Args:
        modules: module paths relative to the standard library directory, without ``.py``;
            missing ones (a different Python version) are skipped, but at least one must exist.

    Returns:
        The sources joined with a blank line.

    Raises:
        ValueError: if none of the modules exists in this interpreter's standard library.
    """
    root = os.path.dirname(os.__file__)
    parts = []
    for name in modules:
        path = os.path.join(root, name + ".py")
        if os.path.exists(path):
            with open(path, "rb") as f:
                parts.append(f.read())
    if not parts:
        raise ValueError(f"none of {list(modules)} exists under {root}; pass modules that exist")
    return b"\n\n".join(parts)


class _Block(nn.Module):
    d_model: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.heads
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(d, name=n)(h).reshape(b, t, self.heads, hd) for n in "qkv")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd)).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, d)
        x = x + nn.Dense(d, name="o")(att)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(d, name="down")(nn.gelu(nn.Dense(self.mlp, name="up")(h)))


class CharLM(nn.Module):
    """A pre-LN causal byte transformer: ``tokens (batch, t <= 64) -> logits (batch, t, 256)``."""

    d_model: int = 128
    heads: int = 4
    layers: int = 2
    mlp: int = 512

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        x = nn.Embed(VOCAB, self.d_model, name="tok")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (CONTEXT, self.d_model))
        x = x + pos[:t]
        for i in range(self.layers):
            x = _Block(self.d_model, self.heads, self.mlp, name=f"block_{i}")(x)
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


def heldout_windows(max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping held-out windows ``(n, CONTEXT + 1) int32``.

    Inputs are ``w[:, :-1]``, next-byte targets ``w[:, 1:]``.

    Args:
        max_windows: keep only the first this many windows (``None``: all).
    """
    data = np.frombuffer(charlm_text(HELDOUT_MODULES), np.uint8).astype(np.int32)
    n = (data.size - 1) // CONTEXT
    w = np.stack([data[i * CONTEXT : i * CONTEXT + CONTEXT + 1] for i in range(n)])
    return w if max_windows is None else w[:max_windows]


def charlm_nll(apply_fn: Any, params: Any, windows: np.ndarray, *, batch: int = 64) -> float:
    """Mean next-byte negative log-likelihood (nats) of ``apply_fn(params, tokens)``."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = jnp.asarray(windows[i : i + batch])
        logits = apply_fn(params, w[:, :-1]).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), w[:, 1:, None], -1)
        total += float(jnp.sum(nll))
        count += nll.size
    return total / count


def charlm_perplexity(apply_fn: Any, params: Any, windows: np.ndarray, *, batch: int = 64) -> float:
    """Perplexity ``exp(mean NLL)``; ``apply_fn(params, tokens (b, t)) -> logits (b, t, 256)``."""
    return float(np.exp(charlm_nll(apply_fn, params, windows, batch=batch)))


def calibration_windows(n: int, *, batch: int = 16, seed: int = 0) -> list[tuple[jax.Array]]:
    """``n`` random training windows as a list of ``(tokens (batch, 64),)`` tuples."""
    data = np.frombuffer(charlm_text(TRAIN_MODULES), np.uint8).astype(np.int32)
    idx = np.random.default_rng(seed).integers(0, data.size - CONTEXT, n)
    w = np.stack([data[j : j + CONTEXT] for j in idx])
    return [(jnp.asarray(w[i : i + batch]),) for i in range(0, n, batch)]


def calibrated_variants(
    fn: Any,
    params: Any,
    calib: list,
    *,
    where: Any,
    quant: Sequence[tuple[int, Any]] = (),
    sparsity: Sequence[Any] = (),
    awq_too: bool = True,
) -> list[tuple[str, Any, float]]:
    """Float-equivalent compressed parameters for the calibrated-method comparison.

    For every ``(bits, granularity)`` in ``quant``: RTN (``quantize``), GPTQ and (if
    ``awq_too``) AWQ; for every sparsity (a float, or an ``NM``) in ``sparsity``: magnitude,
    Wanda and SparseGPT masks. Calibration runs on ``calib`` (a list of argument tuples).

    Returns:
        ``[(name, params, seconds)]``: ``params`` are float (dequantized / masked), ``seconds``
        the wall-clock time of the method (calibration included).
    """
    from jcompress.pruning import NM, apply_masks, magnitude_masks, sparsegpt, wanda_masks
    from jcompress.quantization import QuantSpec, awq, dequantize, gptq, quantize
    from jcompress.runtime import capture

    def timed(name, make, *args, **kwargs):
        start = time.perf_counter()
        out = jax.block_until_ready(make(*args, **kwargs))
        rows.append((name, out, time.perf_counter() - start))

    def wanda(s, structure):
        stats = None
        for args in calib:
            st = capture(fn, params, *args)
            stats = st if stats is None else {k: stats[k].merge(v) for k, v in st.items()}
        return apply_masks(params, wanda_masks(params, stats, s, structure=structure, where=where))

    def calibrated(method, arg, **kwargs):
        out = method(fn, params, calib, arg, where=where, quiet=True, **kwargs)
        return out[0] if isinstance(out, tuple) else dequantize(out)

    def magnitude(s, structure):
        return apply_masks(params, magnitude_masks(params, s, structure=structure, where=where))

    rows: list[tuple[str, Any, float]] = []
    for bits, gran in quant:
        spec = QuantSpec(bits=bits, granularity=gran)
        timed(f"RTN w{bits}", lambda s: dequantize(quantize(params, s, where=where)), spec)
        timed(f"GPTQ w{bits}", calibrated, gptq, spec)
        if awq_too:
            timed(f"AWQ w{bits}", calibrated, awq, spec)
    for s in sparsity:
        nm = isinstance(s, NM)
        structure, s_arg = (s, None) if nm else (None, s)
        label = f"{s.n}:{s.m}" if nm else f"{round(100 * s)}%"
        timed(f"magnitude {label}", magnitude, s_arg, structure)
        timed(f"Wanda {label}", wanda, s_arg, structure)
        timed(f"SparseGPT {label}", calibrated, sparsegpt, s_arg, structure=structure)
    return rows


def load_charlm() -> tuple[CharLM, dict]:
    """The committed model and its float32 parameters ``{"tok": ..., "block_0": ..., ...}``.

    Example:
        >>> model, params = load_charlm()
        >>> params["block_0"]["q"]["kernel"].shape
        (128, 128)
    """
    params: dict = {}
    with np.load(WEIGHTS) as f:
        for key in sorted(f.files):
            node = params
            *parents, last = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = jnp.asarray(f[key], jnp.float32)
    return CharLM(), params


def _flat(tree: Any) -> dict[str, np.ndarray]:
    out = {}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out["/".join(str(k.key) for k in kp)] = np.asarray(leaf)
    return out


def train_charlm(
    *,
    steps: int = 1200,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    seconds: float | None = None,
) -> dict:
    """Train :class:`CharLM` on :data:`TRAIN_MODULES` with AdamW and a cosine schedule.

    Only used to produce the committed weights (``python -m jcompress.demo._charlm``).

    Args:
        steps: optimizer steps.
        batch: random windows per step.
        lr: peak learning rate.
        seed: PRNG seed for the initialisation and the window sampling.
        seconds: stop early after this much wall-clock time (``None``: run all steps).

    Returns:
        The trained float32 parameters.
    """
    import optax

    data = np.frombuffer(charlm_text(TRAIN_MODULES), np.uint8).astype(np.int32)
    model = CharLM()
    params = model.init(jax.random.key(seed), jnp.zeros((1, CONTEXT), jnp.int32))["params"]
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    state = opt.init(params)

    def loss_fn(p, w):
        logits = model.apply({"params": p}, w[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()

    @jax.jit
    def step(p, s, w):
        loss, g = jax.value_and_grad(loss_fn)(p, w)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, data.size - CONTEXT - 1, batch)
        w = np.stack([data[j : j + CONTEXT + 1] for j in idx])
        params, state, loss = step(params, state, w)
        if i % 100 == 0:
            took = time.perf_counter() - start
            print(f"step {i} loss {float(loss):.3f} ({took:.0f} s)", flush=True)
        if seconds is not None and time.perf_counter() - start > seconds:
            break
    return params


if __name__ == "__main__":  # pragma: no cover - produces the committed weights
    import sys

    trained = train_charlm(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 1200)
    np.savez_compressed(WEIGHTS, **{k: v.astype(np.float16) for k, v in _flat(trained).items()})
    model, loaded = load_charlm()
    ppl = charlm_perplexity(lambda p, x: model.apply({"params": p}, x), loaded, heldout_windows())
    print(f"held-out perplexity {ppl:.3f}")
