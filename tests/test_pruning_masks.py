"""Tests for jc.pruning masks: exact counts, structures, scopes, layouts, errors."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress.pruning as P
from jcompress.pruning._masks import masks_from_scores, plan


def ref_count(s, size):
    return round(Fraction(float(np.float32(s))) * size)


def test_masks_from_scores_traced_sparsity_no_recompile():
    params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)))}}
    p = plan(params)
    f = jax.jit(lambda s: masks_from_scores(params, params, s, p))
    for s in (0.3, 0.6):
        m = f(jnp.float32(s))
        assert int((~m["a"]["kernel"]).sum()) == ref_count(s, 64 * 32)
    assert f._cache_size() == 1
