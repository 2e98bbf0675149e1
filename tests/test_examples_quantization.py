"""Smoke test: ``examples/02_quantize_mlp.py --quick`` runs and reports every configuration."""

import importlib.util
import pathlib
import re
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "02_quantize_mlp.py"


@pytest.mark.slow
def test_quantize_example_quick(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("example_02_quantize_mlp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--quick"])
    module.main()
    out = capsys.readouterr().out
    rows = {
        m.group(1).strip(): (float(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^\| ([^|]+?) +\| +([\d.]+) ± [\d.]+ +\|[^|]+\| +(\d+) \|", out, re.M)
    }
    assert list(rows) == ["float32", *module.CONFIGS, module.QAT], out
    # Exact true bytes: 50,826 parameters; kernels 64x256, 256x128, 128x10; biases 394 floats.
    kernels, biases = 64 * 256 + 256 * 128 + 128 * 10, 4 * (256 + 128 + 10)
    groups = (64 * 256 + 256 * 128 + 128 * 10) // 32
    assert rows["float32"][1] == 4 * (kernels + 394)
    assert rows["int8 per-channel absmax"][1] == kernels + 4 * (256 + 128 + 10) + biases
    assert rows["int4 PerGroup(32) absmax"][1] == kernels // 2 + 4 * groups + biases
    assert rows["int3 PerGroup(32) MSE"][1] == rows["int4 PerGroup(32) MSE"][1]
    int2 = kernels // 4 + 4 * groups + -(-groups // 4) + biases  # + int2 zero points
    assert rows["int2 PerGroup(32) MSE asym"][1] == int2 == rows[module.QAT][1]
    assert all(0 <= acc <= 100 for acc, _ in rows.values())
    assert rows["int8 per-channel absmax"][0] > 50  # even 60 steps learn digits
