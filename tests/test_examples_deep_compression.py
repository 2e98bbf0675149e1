"""examples/04_deep_compression.py: Huffman coding round trips and the --quick smoke run."""

import runpy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

EXAMPLE = Path(__file__).parent.parent / "examples" / "04_deep_compression.py"


@pytest.fixture(scope="module")
def ex():
    return runpy.run_path(str(EXAMPLE))


@given(
    symbols=st.lists(st.integers(0, 40), min_size=1, max_size=300),
    positions=st.sets(st.integers(0, 3000), min_size=1, max_size=300),
)
def test_huffman_and_gap_coding_round_trip(ex, symbols, positions):
    sym = np.asarray(symbols)
    lengths = ex["huffman_lengths"](np.bincount(sym))
    packed, nbits = ex["huffman_encode"](sym, lengths)
    np.testing.assert_array_equal(ex["huffman_decode"](packed, nbits, lengths), sym)
    # a Huffman code is never longer than a fixed-length code over the used symbols
    used = np.count_nonzero(np.bincount(sym))
    assert nbits <= len(sym) * max(1, int(np.ceil(np.log2(used))))
    pos = np.asarray(sorted(positions))
    gaps = ex["gap_symbols"](pos)
    assert gaps.max() <= ex["MAX_GAP"]
    np.testing.assert_array_equal(ex["positions"](gaps), pos)


@pytest.mark.slow
def test_quick_run_decodes_exactly(ex):
    result = ex["main"](["--quick"])
    (row,) = result["seeds"]
    assert row["decoded_identical"] is True
    assert row["sparsity"] == pytest.approx(0.95, abs=1e-3)
    assert row["payload_ratio"] > 40 and row["disk_ratio"] > 20
