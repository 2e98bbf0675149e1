"""Number formats beyond integers: ``QuantSpec(format=...)`` with ``Int`` (the default), ``NF4``
and ``Codebook`` (the ``LookupArray`` leaf), checked against NumPy references."""

import dataclasses

import jax
import pytest

from jcompress.quantization import (
    E4M3,
    E5M2,
    MSE,
    NF4,
    Codebook,
    Int,
    Percentile,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
)

# ---- the format configs ----------------------------------------------------------------------


def test_default_spec_is_unchanged_int8():
    spec = QuantSpec()
    assert spec.format == Int() and spec.bits == 8 and spec.levels == (-127, 127)
    assert spec == QuantSpec(bits=8, format=Int()) == QuantSpec(bits=None)
    assert repr(spec) == (
        "QuantSpec(bits=8, granularity=PerChannel(), calibration=AbsMax(), symmetric=True, "
        "format=Int())"
    )


@pytest.mark.parametrize(
    ("fmt", "width"), [(NF4(), 4), (Codebook(), 4), (E4M3(), 8), (E5M2(), 8), (Int(), 8)]
)
def test_bits_default_to_the_format_width_and_specs_hash(fmt, width):
    spec = QuantSpec(format=fmt)
    assert spec.bits == width
    assert spec == QuantSpec(bits=width, format=fmt) and hash(spec) == hash(
        QuantSpec(bits=width, format=fmt)
    )
    jax.jit(lambda x, s: x, static_argnums=1)(1.0, spec)  # usable as a static argument


def test_format_configs_are_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Codebook().iters = 3
    assert Codebook(init="kmeans++", iters=0) == Codebook(init="kmeans++", iters=0)
    with pytest.raises(ValueError, match=r"Codebook.init must be one of .*'density'"):
        Codebook(init="uniform")
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=r"Codebook\.iters must be an int >= 0"):
            Codebook(iters=bad)
    with pytest.raises(TypeError, match="positional"):
        Codebook("linear")  # keyword-only


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": NF4(), "bits": 8}, ValueError, r"NF4\(\)\) needs bits 4 \(or None\)"),
        ({"format": E4M3(), "bits": 4}, ValueError, "needs bits 8"),
        ({"format": E5M2(), "bits": 7}, ValueError, "needs bits 8"),
        ({"format": Codebook(), "bits": 9}, ValueError, r"needs bits in 1\.\.8"),
        ({"format": Codebook(), "bits": 0}, ValueError, r"needs bits in 1\.\.8"),
        ({"format": Int(), "bits": 1}, ValueError, r"bits must be an int in 2\.\.8"),
        ({"format": NF4(), "symmetric": False}, ValueError, "symmetric applies to Int"),
        ({"format": Codebook(), "symmetric": False}, ValueError, "drop symmetric=False"),
        ({"format": NF4(), "calibration": MSE()}, ValueError, "abs-max"),
        ({"format": Codebook(), "calibration": Percentile(99.0)}, ValueError, "calibration="),
        ({"format": Codebook(), "granularity": PerGroup(8)}, ValueError, "PerChannel"),
        ({"format": "nf4"}, TypeError, r"format must be Int\(\), NF4\(\)"),
        ({"format": NF4}, TypeError, "format must be"),
    ],
)
def test_spec_validation_names_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantSpec(**kwargs)


def test_valid_non_integer_specs():
    assert QuantSpec(format=NF4(), granularity=PerGroup(64)).bits == 4
    assert QuantSpec(format=Codebook(), bits=1, granularity=PerTensor()).bits == 1
    assert QuantSpec(format=Codebook(iters=3), bits=8, granularity=PerChannel()).bits == 8
    with pytest.raises(ValueError, match="levels"):
        _ = QuantSpec(format=NF4()).levels  # the integer grid of Int() only
