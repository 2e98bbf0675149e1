"""Smoke test of ``examples/03_distill.py --quick`` and a check of its gap arithmetic."""

import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "03_distill.py"
TEST_IMAGES = 539


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("example_03_distill", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (flax modules) need it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_gap_line_arithmetic(example):
    teacher, alone = np.array([10, 12]), np.array([30, 32])
    line = example.gap_line(teacher, alone, np.array([20, 17]))
    # (31 - 18.5) / (31 - 11) = 62.5%; per seed 50% and 75%.
    assert line.startswith("gap closed: 62% of 20.0 errors"), line
    assert "per seed 62 ± 18%: 50%, 75%" in line, line
    assert "no gap" in example.gap_line(alone, teacher, teacher)


def test_shifted_images(example):
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    views = example.shifted(x)
    assert views.shape == (9, 2, 64)
    np.testing.assert_array_equal(views[example.UNSHIFTED], x)
    img, right = x.reshape(2, 8, 8), views[5].reshape(2, 8, 8)  # dy=0, dx=+1
    np.testing.assert_array_equal(right[:, :, :7], img[:, :, 1:])
    np.testing.assert_array_equal(right[:, :, 7], 0)


@pytest.mark.slow
def test_distill_example_quick(example, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--quick"])
    example.main()
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
