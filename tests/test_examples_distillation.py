"""Smoke test: ``examples/03_distill.py --quick`` runs and reports every part."""

import importlib.util
import pathlib
import re
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "03_distill.py"


@pytest.mark.slow
def test_distill_example_quick(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("example_03_distill", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses (flax modules) need it
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--quick"])
    module.main()
    out = capsys.readouterr().out
    for label in ("teacher", "64-16-10", "64-64-10", "5% labels alone", "90% pruned + int4"):
        assert label in out, out
    # Every reported error count is a count out of the 539 test images.
    counts = [float(v) for v in re.findall(r"(\d+\.\d) ±", out)]
    assert len(counts) == 9 and all(0 <= c <= 539 for c in counts), out
    sparsity = float(re.search(r"sparsity >= (\d\.\d+)\)", out.splitlines()[-1]).group(1))
    assert sparsity > 0  # the quick schedule has started pruning
