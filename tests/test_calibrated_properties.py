"""Hypothesis properties of GPTQ, SparseGPT and Wanda on random layers.

Shapes, group sizes and block sizes are bucketed (every new static configuration is a new XLA
compilation). ``HYPOTHESIS_PROFILE=deep`` runs 1000 examples per property.
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from jcompress.pruning import NM, sparsegpt_layer, wanda_masks
from jcompress.quantization import PerGroup, PerTensor, QuantSpec, gptq_layer, quantize
from jcompress.runtime import InputStats

# (shape, spec, act_order, block): a few static configurations (each is one compilation, the
# first three shared with test_calibrated.py) covering 2..8 bits, every granularity, both
# symmetries, activation order and block sizes; the data varies freely.
GPTQ_CONFIGS = [
    ((64, 16), QuantSpec(bits=4), False, 32),
    ((64, 16), QuantSpec(bits=3, granularity=PerGroup(32)), True, 32),
    ((64, 16), QuantSpec(bits=3, granularity=PerGroup(16), symmetric=False), False, 32),
    ((32, 8), QuantSpec(bits=2, granularity=PerGroup(8)), False, 8),
    ((32, 8), QuantSpec(bits=5, symmetric=False), True, 128),
    ((32, 8), QuantSpec(bits=6, granularity=PerTensor()), False, 8),
    ((32, 8), QuantSpec(bits=7, granularity=PerGroup(8), symmetric=False), True, 8),
    ((32, 8), QuantSpec(bits=8, granularity=PerGroup(16)), False, 128),
]
# (shape, structure or None for a float sparsity, block)
SPARSEGPT_CONFIGS = [
    ((64, 16), None, 16),
    ((64, 16), NM(2, 4), 16),
    ((32, 8), None, 128),
    ((32, 8), NM(4, 8), 8),
]
SPARSITY = st.floats(0.0, 0.949999988079071, width=32)
SCALES = st.sampled_from([1e-3, 1.0, 1e3])


def correlated(seed, n_in, samples=128):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, n_in // 2)) @ rng.normal(size=(n_in // 2, n_in))
    return x + 0.05 * rng.normal(size=x.shape)


def weights(seed, shape, scale, zeros):
    w = np.random.default_rng(seed + 1).normal(size=shape) * scale
    if zeros:
        w[:, 0] = 0.0  # an all-zero output channel
        w[1] = 0.0  # an all-zero input row
    return w.astype(np.float32)


def out_err(x, w, w_hat):
    return float(np.linalg.norm(x @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))))


def per_output_magnitude(w, k):
    keep = np.ones(w.shape, bool)
    order = np.argsort(np.abs(w), axis=0, kind="stable")[:k]
    np.put_along_axis(keep, order, False, axis=0)
    return keep


@given(
    config=st.sampled_from(GPTQ_CONFIGS),
    scale=SCALES,
    zeros=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gptq_identity_is_rtn_and_never_worse_than_rtn(config, scale, zeros, seed):
    shape, spec, act_order, block = config
    w = weights(seed, shape, scale, zeros)
    ref = quantize({"kernel": jnp.asarray(w)}, spec)["kernel"]
    eye = np.eye(shape[0], dtype=np.float32)
    qa, stats = gptq_layer(w, eye, spec, block_size=block, act_order=act_order)
    np.testing.assert_array_equal(np.asarray(qa.values, np.int32), np.asarray(ref.values, np.int32))
    assert bool(stats.ok)
    x = correlated(seed, shape[0])
    h = (2 * x.T @ x / len(x)).astype(np.float32)
    qa, stats = gptq_layer(w, h, spec, block_size=block, act_order=act_order)
    assert bool(stats.ok)
    qmin, qmax = spec.levels
    values = np.asarray(qa.values, np.int32)
    assert values.min() >= qmin and values.max() <= qmax
    assert out_err(x, w, qa.dequantize()) <= out_err(x, w, ref.dequantize()) * (1 + 1e-4) + 1e-30


@given(
    config=st.sampled_from(SPARSEGPT_CONFIGS),
    sparsity=SPARSITY,
    scale=SCALES,
    zeros=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sparsegpt_exact_counts_and_identity_is_magnitude(config, sparsity, scale, zeros, seed):
    shape, structure, block = config
    structure = sparsity if structure is None else structure
    n_in, n_out = shape
    w = weights(seed, shape, scale, zeros)
    x = correlated(seed, n_in)
    h = (2 * x.T @ x / len(x)).astype(np.float32)
    out = sparsegpt_layer(w, h, structure, block_size=block)
    keep = np.asarray(out.mask)
    assert bool(out.stats.ok)
    assert (np.asarray(out.weights)[~keep] == 0).all()
    if isinstance(structure, NM):
        assert (keep.reshape(n_in // structure.m, structure.m, n_out).sum(1) == structure.n).all()
        k = structure.m - structure.n
    else:
        k = round(np.float32(structure) * n_in)
        assert (np.sum(~keep, axis=0) == k).all()
    if block >= n_in and not isinstance(structure, NM):
        # identity Hessian, one block: no reconstruction, the per-output magnitude mask
        ident = sparsegpt_layer(w, np.eye(n_in, dtype=np.float32), structure, block_size=block)
        np.testing.assert_array_equal(np.asarray(ident.mask), per_output_magnitude(w, k))
        np.testing.assert_array_equal(np.asarray(ident.weights), np.where(ident.mask, w, 0))


@given(
    shape=st.sampled_from([(16, 4), (32, 8)]),
    structure=st.one_of(SPARSITY, st.sampled_from([NM(2, 4), NM(1, 8)])),
    scale=SCALES,
    zeros=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_wanda_exact_counts_and_uniform_norms_are_magnitude(shape, structure, scale, zeros, seed):
    n_in, n_out = shape
    w = weights(seed, shape, scale, zeros)
    rng = np.random.default_rng(seed)
    sumsq = rng.uniform(0.0, 100.0, n_in).astype(np.float32)
    params = {"Dense_0": {"kernel": jnp.asarray(w)}}
    nm = isinstance(structure, NM)
    kw = {"structure": structure} if nm else {}
    s = None if nm else structure

    def masks(sq):
        stats = {"Dense_0/kernel": InputStats(jnp.ones(n_in), jnp.asarray(sq), jnp.array(1))}
        return np.asarray(wanda_masks(params, stats, s, **kw)["Dense_0"]["kernel"])

    keep = masks(sumsq)
    if nm:
        assert (keep.reshape(n_in // structure.m, structure.m, n_out).sum(1) == structure.n).all()
    else:
        k = round(np.float32(structure) * n_in)
        assert (np.sum(~keep, axis=0) == k).all()
        np.testing.assert_array_equal(
            masks(np.full(n_in, 4.0, np.float32)), per_output_magnitude(w, k)
        )
    np.testing.assert_array_equal(masks(sumsq * 16), keep)  # scale-free
