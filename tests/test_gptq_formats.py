"""gptq with NF4, codebooks and FP8: rows rounded to the nearest stored value with GPTQ's error
feedback, against a NumPy reference; the leaf is quantize's except for its codes."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jcompress as jc
from jcompress.quantization import (
    E4M3,
    NF4,
    Codebook,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    dequantize,
    gptq,
    quantize,
)

SPECS = {
    "nf4 g16": QuantSpec(format=NF4(), granularity=PerGroup(16)),
    "codebook 3-bit per channel": QuantSpec(
        bits=3, format=Codebook(init="density"), granularity=PerChannel()
    ),
    "codebook 4-bit per tensor": QuantSpec(format=Codebook(init="linear"), granularity=PerTensor()),
    "e4m3 per channel": QuantSpec(format=E4M3()),
}
BLOCK = 16


def _np_upper_chol_inv(h, percdamp=0.01):
    h = h + np.eye(len(h)) * percdamp * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T


def np_gptq(w, h, snap, *, mask=None):
    """GPTQ (Frantar et al. 2022, Algorithm 1) with a row rounding ``snap(row, j) -> row``."""
    w = np.array(w, np.float64)
    if mask is not None:
        w = np.where(mask, w, 0)
    u = _np_upper_chol_inv(np.array(h, np.float64))
    out = np.zeros_like(w)
    for j in range(len(w)):
        q = snap(w[j], j)
        if mask is not None:
            q = np.where(mask[j], q, 0.0)
        w[j:] -= np.outer(u[j, j:], (w[j] - q) / u[j, j])
        out[j] = q
    return out


def np_snap(leaf):
    """The NumPy rounding of a leaf's format with its (round-to-nearest) tables and scales."""
    if isinstance(leaf, jc.quantization.Float8Array):
        dt = ml_dtypes.float8_e4m3fn
        fmax = float(ml_dtypes.finfo(dt).max)
        s = np.broadcast_to(np.asarray(leaf.scale), leaf.shape)
        return lambda row, j: np.clip(row / s[j], -fmax, fmax).astype(dt).astype(np.float64) * s[j]
    table = np.broadcast_to(
        np.asarray(leaf.table, np.float64)[0], (leaf.shape[1], leaf.table.shape[-1])
    )
    if leaf.scale is None:
        s = np.ones(leaf.shape)
    else:
        reps = leaf.shape[0] // leaf.scale.shape[0]
        s = np.repeat(
            np.broadcast_to(np.asarray(leaf.scale), (leaf.scale.shape[0], leaf.shape[1])), reps, 0
        )

    def snap(row, j):
        v = row / s[j]
        idx = np.argmin(np.abs(v[:, None] - table), axis=1)
        return table[np.arange(len(v)), idx] * s[j]

    return snap


def layer(seed, n_in=48, n_out=16, samples=256):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 12)) @ rng.normal(size=(12, n_in)) + 0.1 * rng.normal(
        size=(samples, n_in)
    )
    w = rng.normal(size=(n_in, n_out)).astype(np.float32) / 4
    return jnp.asarray(x, jnp.float32), jnp.asarray(w)


def fn(p, x):
    return x @ p["Dense_0"]["kernel"]


@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_formats_match_numpy_and_keep_quantize_layout(name):
    spec = SPECS[name]
    x, w = layer(0)
    params = {"Dense_0": {"kernel": w}}
    got = gptq(fn, params, [(x,)], spec, block_size=BLOCK, quiet=True)["Dense_0"]["kernel"]
    ref_leaf = quantize(params, spec)["Dense_0"]["kernel"]
    assert type(got) is type(ref_leaf)
    for child in ("table", "scale"):  # everything but the codes is quantize's
        a, b = getattr(got, child, None), getattr(ref_leaf, child, None)
        assert (a is None) == (b is None) and (a is None or np.array_equal(a, b)), child
    h = np.asarray(2 * x.T @ x / x.shape[0], np.float64)
    want = np_gptq(np.asarray(w), h, np_snap(ref_leaf))
    deq = np.asarray(got.dequantize(), np.float64)
    xs = np.asarray(x, np.float64)
    err = lambda v: float(np.linalg.norm(xs @ (np.asarray(w, np.float64) - v)))
    # the same rows as the reference, up to a few float-rounding flips
    assert np.mean(~np.isclose(deq, want, rtol=1e-5, atol=1e-7)) <= 0.01
    assert err(deq) <= 1.01 * err(want) + 1e-6
    # and below round to nearest (the guard makes it never worse)
    assert err(deq) < err(np.asarray(ref_leaf.dequantize(), np.float64))


@pytest.mark.parametrize("name", ["nf4 g16", "e4m3 per channel"])
def test_identity_hessian_is_round_to_nearest(name):
    spec = SPECS[name]
    _, w = layer(1)
    x = jnp.eye(48, dtype=jnp.float32)  # X^T X = I: no error feedback
    params = {"Dense_0": {"kernel": w}}
    got = gptq(fn, params, [(x,)], spec, block_size=BLOCK, quiet=True)
    ref = quantize(params, spec)
    np.testing.assert_array_equal(
        dequantize(got)["Dense_0"]["kernel"], dequantize(ref)["Dense_0"]["kernel"]
    )


def test_masks_keep_pruned_zeros_and_codebook_tables_hold_them():
    x, w = layer(2)
    mask = np.asarray(np.abs(w) > np.quantile(np.abs(w), 0.5))
    params = {"Dense_0": {"kernel": w}}
    for spec in SPECS.values():
        q = gptq(
            fn,
            params,
            [(x,)],
            spec,
            masks={"Dense_0": {"kernel": jnp.asarray(mask)}},
            block_size=BLOCK,
            quiet=True,
        )
        deq = np.asarray(dequantize(q)["Dense_0"]["kernel"])
        assert np.all(deq[~mask] == 0), spec


def test_stacked_slices_equal_their_own_layers():
    x, w = layer(3)
    stack = jnp.stack([w, -0.5 * w])
    xb = jnp.stack([x, x[::-1] * 0.5])  # each layer its own inputs
    roles = {"kernel": jc.Role("matmul", contracting=(1,), output=(2,), stacked=(0,))}

    def stacked(p, x):
        return jnp.einsum("bri,bio->bro", x, p["kernel"])

    spec = SPECS["codebook 3-bit per channel"]
    options = {"block_size": BLOCK, "quiet": True}
    got = gptq(stacked, {"kernel": stack}, [(xb,)], spec, roles=roles, **options)
    for i in range(2):
        alone = gptq(fn, {"Dense_0": {"kernel": stack[i]}}, [(xb[i],)], spec, **options)
        np.testing.assert_array_equal(
            got["kernel"][i].dequantize(), alone["Dense_0"]["kernel"].dequantize()
        )


def test_kmeans_plus_plus_needs_a_key_gptq_does_not_take():
    x, w = layer(4)
    spec = QuantSpec(format=Codebook(init="kmeans++"))
    with pytest.raises(
        ValueError, match=r"Dense_0/kernel: gptq with Codebook\(init='kmeans\+\+'\)"
    ):
        gptq(fn, {"Dense_0": {"kernel": w}}, [(x,)], spec, quiet=True)


@st.composite
def gptq_problems(draw):
    seed = draw(st.integers(0, 2**16))
    name = draw(st.sampled_from(list(SPECS)))
    sparsity = draw(st.sampled_from([0.0, 0.5]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return seed, name, sparsity, scale


@given(gptq_problems())
def test_property_gptq_formats_never_lose_to_round_to_nearest(problem):
    seed, name, sparsity, scale = problem
    x, w = layer(seed)
    w = w * scale
    rng = np.random.default_rng(seed)
    mask = rng.random(w.shape) >= sparsity
    params = {"Dense_0": {"kernel": w}}
    masks = {"Dense_0": {"kernel": jnp.asarray(mask)}}
    got = gptq(fn, params, [(x,)], SPECS[name], masks=masks, block_size=BLOCK, quiet=True)
    masked = {"Dense_0": {"kernel": jnp.where(mask, w, 0)}}
    ref = quantize(masked, SPECS[name])
    xs, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)

    def err(q):
        return float(np.linalg.norm(xs @ (w64 - np.asarray(dequantize(q)["Dense_0"]["kernel"]))))

    assert err(got) <= err(ref) * (1 + 1e-5) + 1e-6
    deq = np.asarray(dequantize(got)["Dense_0"]["kernel"])
    assert np.all(np.isfinite(deq)) and np.all(deq[~mask] == 0)
