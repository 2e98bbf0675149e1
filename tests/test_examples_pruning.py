"""Smoke tests: the pruning examples run end to end in their ``--quick`` mode (in-process).

The examples assert their own invariants (exact 90% kernel sparsity, the 2:4 pattern, pruned
weights exactly zero, no NaN/Inf flag), so running them checks those too.
"""

import pathlib
import runpy
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_prune_mlp.py", "07_nm_nnx_cnn.py"])
def test_example_quick(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--quick"])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    assert "accuracy gap" in out
    assert "seed 0:" in out
