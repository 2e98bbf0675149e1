"""Hypothesis properties of jc.pruning masks: exact counts, top scores kept, N:M, jit == eager.

Shapes are bucketed (every new shape is a new XLA compilation); ``HYPOTHESIS_PROFILE=deep``
runs >= 1000 examples per property.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jcompress.pruning as P
from jcompress.tree import leaves_with_paths

SHAPES = [(8, 4), (16, 12), (40, 8), (3, 3, 8, 4)]  # (..., in, out); `in` divisible by 8
PAIRS = [(SHAPES[0], SHAPES[1]), (SHAPES[2], SHAPES[3]), (SHAPES[1], SHAPES[1])]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
FILLS = ["normal", "zeros", "tiny", "huge", "signed_zeros", "few_values"]

sparsities = st.one_of(
    st.sampled_from([0.0, 0.5, 0.999, float(np.nextafter(np.float32(1), np.float32(0)))]),
    st.floats(0.0, 1.0, exclude_max=True, width=32),
)


def ref_count(s, size):
    return round(Fraction(float(np.float32(s))) * size)


def make_leaf(seed, shape, dtype, fill):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    if fill == "zeros":
        x = np.zeros(shape)
    elif fill == "tiny":
        x = x * 1e-30  # underflows to zero (ties) in float16
    elif fill == "huge":
        x = x * (6e4 / 4 if dtype == jnp.float16 else 1e30) / np.abs(x).max()
    elif fill == "signed_zeros":
        x = np.where(rng.random(shape) < 0.5, -0.0, 0.0) + (rng.random(shape) < 0.2) * x
    elif fill == "few_values":
        x = rng.integers(-2, 3, shape).astype(np.float64)
    return jnp.asarray(x, dtype)


@st.composite
def trees(draw, leaves=1, pairs=PAIRS):
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from(FILLS))
    seed = draw(st.integers(0, 2**31 - 1))
    shapes = [draw(st.sampled_from(SHAPES))] if leaves == 1 else draw(st.sampled_from(pairs))
    return {
        f"Layer_{i}": {"kernel": make_leaf(seed + i, shape, dtype, fill)}
        for i, shape in enumerate(shapes)
    }


def abs32(x):
    return np.abs(np.asarray(x, np.float32))


@functools.cache
def jitted(structure, scope):
    return jax.jit(lambda p, s: P.magnitude_masks(p, s, scope=scope, structure=structure))


@given(trees(leaves=2), sparsities, st.sampled_from(["layer", "global"]))
@settings()
def test_exact_count_and_top_scores_kept(params, s, scope):
    masks = dict(leaves_with_paths(P.magnitude_masks(params, s, scope=scope)))
    weights = dict(leaves_with_paths(params))
    if scope == "layer":
        pools = [[p] for p in weights]
    else:
        pools = [list(weights)]
    for pool in pools:
        kept = np.concatenate([abs32(weights[p])[masks[p]] for p in pool])
        gone = np.concatenate([abs32(weights[p])[~masks[p]] for p in pool])
        assert gone.size == ref_count(s, kept.size + gone.size)
        if kept.size and gone.size:
            assert kept.min() >= gone.max()


@given(trees(), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (7, 8)]))
@settings()
def test_nm_pattern_top_n_per_group(params, nm):
    n, m = nm
    [(_, w)] = leaves_with_paths(params)
    mask = np.asarray(P.nm_masks(params, n=n, m=m)["Layer_0"]["kernel"])
    axis = w.ndim - 2
    groups_m = np.moveaxis(mask, axis, -1).reshape(-1, m)
    groups_w = np.moveaxis(abs32(w), axis, -1).reshape(-1, m)
    assert (groups_m.sum(-1) == n).all()
    kept = np.where(groups_m, groups_w, np.inf).min(-1)
    gone = np.where(groups_m, -np.inf, groups_w).max(-1)
    assert (kept >= gone).all()


STRUCTURES = [
    (P.Unstructured(), "layer"),
    (P.Unstructured(), "global"),
    (P.NM(n=2, m=4), "layer"),
    (P.Channels(), "layer"),
    (P.Channels(norm="l1"), "global"),
]


@given(trees(leaves=2, pairs=PAIRS[:2]), sparsities, st.sampled_from(range(len(STRUCTURES))))
@settings()
def test_jit_equals_eager(params, s, which):
    structure, scope = STRUCTURES[which]
    s = None if isinstance(structure, P.NM) else s
    eager = P.magnitude_masks(params, s, scope=scope, structure=structure)
    compiled = jitted(structure, scope)(params, s)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if isinstance(structure, P.Channels):
        for path, m in leaves_with_paths(eager):
            channels = m.shape[-1]
            assert m.shape == (1,) * (m.ndim - 1) + (channels,)
            if scope == "layer":
                assert int(channels - m.sum()) == ref_count(s, channels), path


@given(trees(), st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 10**6))
@settings()
def test_nonfinite_raises_eagerly(params, bad, position):
    w = params["Layer_0"]["kernel"]
    flat = w.reshape(-1).at[position % w.size].set(bad)
    params = {"Layer_0": {"kernel": flat.reshape(w.shape)}}
    with pytest.raises(ValueError, match="Layer_0/kernel: magnitude pruning found 1 NaN/Inf"):
        P.magnitude_masks(params, 0.5)
