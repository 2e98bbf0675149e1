"""The studies (``studies/*.py``): their building blocks, and their ``--quick`` runs.

``deep_compression.py``: the canonical Huffman coder and the gap coding of survivor positions
round-trip (property test), and the quick run decodes the saved model to identical logits.
``distill.py``: the gap arithmetic, the shifted images, and the quick run's table.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

STUDIES = pathlib.Path(__file__).resolve().parents[1] / "studies"
TEST_IMAGES = 539


def _load(name: str):
    """Import ``studies/<name>.py`` as a module (registered: flax dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(f"study_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def deep_compression():
    yield from _load("deep_compression")


@pytest.fixture(scope="module")
def distill():
    yield from _load("distill")


def test_every_study_is_tested():
    assert sorted(p.stem for p in STUDIES.glob("*.py")) == ["deep_compression", "distill"]


# ---- deep_compression.py ---------------------------------------------------------------------


@given(
    symbols=st.lists(st.integers(0, 40), min_size=1, max_size=300),
    positions=st.sets(st.integers(0, 3000), min_size=1, max_size=300),
)
def test_huffman_and_gap_coding_round_trip(deep_compression, symbols, positions):
    dc = deep_compression
    sym = np.asarray(symbols)
    lengths = dc.huffman_lengths(np.bincount(sym))
    packed, nbits = dc.huffman_encode(sym, lengths)
    np.testing.assert_array_equal(dc.huffman_decode(packed, nbits, lengths), sym)
    # a Huffman code is never longer than a fixed-length code over the used symbols
    used = np.count_nonzero(np.bincount(sym))
    assert nbits <= len(sym) * max(1, int(np.ceil(np.log2(used))))
    pos = np.asarray(sorted(positions))
    gaps = dc.gap_symbols(pos)
    assert gaps.max() <= dc.MAX_GAP
    np.testing.assert_array_equal(dc.positions(gaps), pos)


@pytest.mark.slow
def test_deep_compression_quick_decodes_exactly(deep_compression, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh working directory; --out is the user's path
    result = deep_compression.main(["--quick", "--out", "results.json"])
    (row,) = result["seeds"]
    assert row["decoded_identical"] is True
    assert row["sparsity"] == pytest.approx(0.95, abs=1e-3)
    assert row["payload_ratio"] > 40 and row["disk_ratio"] > 20
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# ---- distill.py --------------------------------------------------------------------------------


def test_gap_line_arithmetic(distill):
    teacher, alone = np.array([10, 12]), np.array([30, 32])
    line = distill.gap_line(teacher, alone, np.array([20, 17]))
    # (31 - 18.5) / (31 - 11) = 62.5%; per seed 50% and 75%.
    assert line.startswith("gap closed: 62% of 20.0 errors"), line
    assert "per seed 62 ± 18%: 50%, 75%" in line, line
    assert "no gap" in distill.gap_line(alone, teacher, teacher)


def test_shifted_images(distill):
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    views = distill.shifted(x)
    assert views.shape == (9, 2, 64)
    np.testing.assert_array_equal(views[distill.UNSHIFTED], x)
    img, right = x.reshape(2, 8, 8), views[5].reshape(2, 8, 8)  # dy=0, dx=+1
    np.testing.assert_array_equal(right[:, :, :7], img[:, :, 1:])
    np.testing.assert_array_equal(right[:, :, 7], 0)


@pytest.mark.slow
def test_distill_quick(distill, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["distill.py", "--quick"])
    distill.main()
    out = capsys.readouterr().out
    table = out[out.index("test errors out of") :]
    rows = {
        "teacher": r"teacher 64-1200-1200-10",
        "1a alone": r"1a\. student .* alone",
        "1b alone": r"1b\. student .* alone",
        "1c alone": r"1c\. student .* alone",
        "2 alone": r"2\. \d+ labels alone",
        "2 distilled": r"labels \+ soft targets",
        "3 alone": r"90% pruned \+ int4 QAT, no teacher",
        "3 distilled": r"90% pruned \+ int4 QAT, distilled",
    }
    means = {}
    for name, pattern in rows.items():
        match = re.search(pattern + r".*?(\d+\.\d) ±", table)
        assert match, (name, table)
        means[name] = float(match.group(1))
    distilled = [float(v) for v in re.findall(r"distilled \(T=.*?(\d+\.\d) ±", table)]
    assert len(distilled) == 4, table  # 1a, 1b, 1c and 3
    # Every distilled row reports the fraction of the gap it closes (or that there is none).
    assert table.count("gap closed: ") == 5, table
    # A random student errs on ~90% of the 539 images: a few dozen steps already do far better.
    for value in [*means.values(), *distilled]:
        assert 0 <= value < 0.5 * TEST_IMAGES, table
    assert re.search(r"sparsity >= 0\.9\d*\)", table), table  # the schedule reached 90%
    assert list(tmp_path.iterdir()) == []
