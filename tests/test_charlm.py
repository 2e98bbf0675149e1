"""The committed character-level LM: weights load, held-out perplexity, GPTQ vs RTN at 3 bits."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress.demo._charlm import (
    CONTEXT,
    HELDOUT_MODULES,
    TRAIN_MODULES,
    VOCAB,
    WEIGHTS,
    calibration_windows,
    charlm_perplexity,
    charlm_text,
    heldout_windows,
    load_charlm,
)
from jcompress.quantization import PerGroup, QuantSpec, dequantize, gptq, quantize


@pytest.fixture(scope="module")
def lm():
    model, params = load_charlm()

    def fn(p, x):
        return model.apply({"params": p}, x)

    return fn, jax.jit(fn), params, heldout_windows(64)


def test_committed_weights_small_and_complete(lm):
    _, _, params, _ = lm
    assert os.path.getsize(WEIGHTS) <= 2 * 1024 * 1024
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert all(x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x))) for _, x in leaves)
    assert params["tok"]["embedding"].shape == (VOCAB, 128)
    assert params["block_1"]["down"]["kernel"].shape == (512, 128)
    assert params["head"]["kernel"].shape == (128, VOCAB)
    n = sum(x.size for _, x in leaves)
    assert 400_000 < n < 600_000


def test_heldout_is_disjoint_and_deterministic():
    assert not set(HELDOUT_MODULES) & set(TRAIN_MODULES)
    w = heldout_windows(8)
    assert w.shape == (8, CONTEXT + 1) and w.dtype == np.int32
    np.testing.assert_array_equal(w, heldout_windows(8))
    np.testing.assert_array_equal(
        w[0, :-1], np.frombuffer(charlm_text(HELDOUT_MODULES)[:64], np.uint8)
    )
    a, b = calibration_windows(32), calibration_windows(32)
    assert len(a) == 2 and a[0][0].shape == (16, CONTEXT)
    np.testing.assert_array_equal(a[1][0], b[1][0])
    with pytest.raises(ValueError, match="none of"):
        charlm_text(["no_such_module_xyz"])


def test_heldout_perplexity_well_below_uniform(lm):
    _, apply, params, windows = lm
    ppl = charlm_perplexity(apply, params, windows)
    assert np.isfinite(ppl)
    assert ppl < VOCAB / 20  # uniform over bytes is 256; the trained model is far below


@pytest.mark.slow
def test_gptq_3bit_increase_at_most_rtn(lm):
    fn, apply, params, windows = lm
    spec = QuantSpec(bits=3, granularity=PerGroup(64))
    calib = calibration_windows(64)
    base = charlm_perplexity(apply, params, windows)
    rtn = charlm_perplexity(apply, dequantize(quantize(params, spec, where=r".*kernel")), windows)
    g = gptq(fn, params, calib, spec, where=r".*kernel", quiet=True)
    ours = charlm_perplexity(apply, dequantize(g), windows)
    assert rtn > base  # 3 bits really costs something on this model
    assert ours - base <= rtn - base
