"""Smoke test: examples/05_shrink_cnn.py runs end to end in its ``--quick`` mode (in-process).

The example checks its own invariants (shrunken outputs equal the masked model's before
fine-tuning); here we also check that the report says the widths really shrank.
"""

import pathlib
import re
import runpy
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_shrink_cnn_quick(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["05_shrink_cnn.py", "--quick"])
    runpy.run_path(str(EXAMPLES / "05_shrink_cnn.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "new widths: {'Conv_0': 8, 'Conv_1': 16, 'Dense_0': 32}" in out
    rows = {m[0]: int(m[1]) for m in re.findall(r"^\| (\w+)[^|]*\|[^|]*\|\s+(\d+) \|$", out, re.M)}
    assert rows["shrunk"] * 3 < rows["dense"], rows
