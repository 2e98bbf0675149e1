"""Smoke test: ``examples/06_llm_compression.py --quick`` runs and its table says what it should."""

import math
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "06_llm_compression.py"


@pytest.mark.slow
def test_llm_example_quick():
    # a fresh process, as a user runs it (the environment, e.g. XLA_FLAGS, is inherited)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rows = {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \| ([+-][\d.]+) \|", out, re.M)
    }
    assert list(rows) == [
        "float32",
        "RTN w3",
        "GPTQ w3",
        "W8A8 dynamic",
        "W8A8 static abs-max",
        "W8A8 static p99.99",
    ], out
    base = rows["float32"][0]
    assert 1.0 < base < 20.0 and all(math.isfinite(p) for p, _ in rows.values())
    for name, (ppl, increase) in rows.items():
        assert abs(ppl - base - increase) < 2e-3, name
    # GPTQ's 3-bit increase is well below round to nearest's (about a third on this model)
    assert 0 < rows["GPTQ w3"][1] < 0.6 * rows["RTN w3"][1]
    # int8 activations, dynamic or static, cost little on this model (no outlier channels)
    for name in ("W8A8 dynamic", "W8A8 static abs-max", "W8A8 static p99.99"):
        assert abs(rows[name][1]) < 0.1, name
