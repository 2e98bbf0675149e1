"""Every example's ``--quick`` mode, run as a user runs it, and the invariants its output shows.

One parameterised test: each script runs in-process (``runpy``, so compiled JAX programs and
imports are shared across examples) as ``__main__`` with ``sys.argv = [script, "--quick"]``,
from an empty working directory, so no example can depend on where it is started. The examples
assert their own invariants (exact sparsity, the 2:4 pattern, pruned weights exactly zero, no
NaN/Inf flag, shrunken outputs equal to the rebuilt model's); the checks below read the printed
tables. The longer studies are in ``tests/test_studies.py``.
"""

from __future__ import annotations

import math
import pathlib
import re
import runpy
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _check_pruning(out: str, _globals: dict) -> None:
    # 01 and 07 assert exact per-layer counts and the 2:4 pattern themselves.
    assert re.search(r"^seed 0: ", out, re.M), out
    assert "accuracy gap" in out, out


def _check_prune_mlp(out: str, g: dict) -> None:
    _check_pruning(out, g)
    assert "kernel sparsity 0.9000" in out, out
    rows = dict(re.findall(r"^\| (dense|pruned) .*\| +([\d.]+) \|$", out, re.M))
    assert rows == {"dense": "0.0000", "pruned": "0.9000"}, out


def _check_quantize_mlp(out: str, g: dict) -> None:
    rows = {
        m.group(1).strip(): (float(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^\| ([^|]+?) +\| +([\d.]+) ± [\d.]+ +\|[^|]+\| +(\d+) \|", out, re.M)
    }
    assert list(rows) == ["float32", *g["CONFIGS"], g["QAT"]], out
    # Exact true bytes: kernels 64x256, 256x128, 128x10 (float32 scales per output channel or
    # per group of 32 inputs); biases 394 float32 values stay float.
    kernels = 64 * 256 + 256 * 128 + 128 * 10
    groups, biases = kernels // 32, 4 * (256 + 128 + 10)
    assert rows["float32"][1] == 4 * kernels + biases
    assert rows["int8 per-channel absmax"][1] == kernels + 4 * (256 + 128 + 10) + biases
    assert rows["int4 PerGroup(32) absmax"][1] == kernels // 2 + 4 * groups + biases
    assert rows["int3 PerGroup(32) MSE"][1] == rows["int4 PerGroup(32) MSE"][1]  # 4-bit storage
    int2 = kernels // 4 + 4 * groups + -(-groups // 4) + biases  # + int2 zero points
    assert rows["int2 PerGroup(32) MSE asym"][1] == int2 == rows[g["QAT"]][1]
    assert all(0 <= acc <= 100 for acc, _ in rows.values())
    assert rows["int8 per-channel absmax"][0] > 50, out  # even 60 steps learn digits
    assert re.search(r"int2 PTQ loses -?[\d.]+ points; QAT recovers -?[\d.]+", out), out


def _check_shrink_cnn(out: str, _globals: dict) -> None:
    assert "new widths: {'Conv_0': 8, 'Conv_1': 16, 'Dense_0': 32}" in out, out
    rows = {m[0]: int(m[1]) for m in re.findall(r"^\| (\w+)[^|]*\|[^|]*\|\s+(\d+) \|$", out, re.M)}
    assert rows["masked"] == rows["dense"] and rows["shrunk"] * 3 < rows["dense"], rows
    assert re.search(r"speedup \d+\.\d+x", out), out


def _check_llm(out: str, _globals: dict) -> None:
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


def _check_budget(out: str, _globals: dict) -> None:
    rows = {
        m.group(1): (int(m.group(2)), m.group(3), float(m.group(4)))
        for m in re.finditer(
            r"^\| (\w[^|]*?) +\| +(\d+) \| +[\d.]+x \| +(yes|no) \| +([\d.]+) \|", out, re.M
        )
    }
    assert list(rows) == [
        "float32",
        "allocated",
        "uniform int8",
        "uniform int4",
        "uniform int2",
        "uniform int4 g64",
        "uniform int2 g64",
    ], out
    budget = rows["float32"][0] // 8
    assert rows["allocated"][0] <= budget and rows["allocated"][1] == "yes", out
    fitting = [v[2] for k, v in rows.items() if k.startswith("uniform") and v[1] == "yes"]
    # lower perplexity than every uniform setting that fits the same bytes
    assert fitting and rows["allocated"][2] < min(fitting), out
    assert re.search(r"^  block_0/q/kernel +int\d( g64)? +\d+ bytes$", out, re.M), out


def _check_deep_compression(out: str, _globals: dict) -> None:
    # the example asserts exact zeros and at most 2**5 values per kernel itself
    rows = {
        m.group(1): (float(m.group(2)), int(m.group(3)), int(m.group(4)))
        for m in re.finditer(r"^\| ([^|]+?) \| +([\d.]+) ± [\d.]+ \| (\d+) \| (\d+) \|$", out, re.M)
    }
    assert list(rows) == [
        "float, pruned",
        "codebook, before fine-tuning",
        "codebook, centroids fine-tuned",
        "int5 per channel, RTN",
        "int5, scales fine-tuned",
    ], out
    float_bytes = rows["float, pruned"][1]
    # 5-bit indices in bytes plus 32-entry tables: about a quarter of float32
    assert rows["codebook, centroids fine-tuned"][1] < float_bytes / 3.9, rows
    assert rows["int5 per channel, RTN"][1] < float_bytes / 3.8, rows
    assert all(0.0 < acc <= 100.0 for acc, _, _ in rows.values()), rows
    # 92% of the weights are zero: the checkpoint encodes far less than memory holds
    assert all(encoded < memory / 3 for _, memory, encoded in rows.values()), rows


CHECKS = {
    "01_prune_mlp.py": _check_prune_mlp,
    "02_quantize_mlp.py": _check_quantize_mlp,
    "05_shrink_cnn.py": _check_shrink_cnn,
    "06_llm_compression.py": _check_llm,
    "07_nm_nnx_cnn.py": _check_pruning,
    "08_budget.py": _check_budget,
    "09_deep_compression.py": _check_deep_compression,
}


def test_every_example_is_checked():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_quick(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh working directory, as a user's
    monkeypatch.setattr(sys, "argv", [name, "--quick"])
    module_globals = runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    CHECKS[name](out, module_globals)
    assert list(tmp_path.iterdir()) == [], "an example wrote into the working directory"
