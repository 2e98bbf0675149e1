"""ruff is configured in pyproject.toml and the tree is clean (lint and format)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff():
    exe = shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed; it is part of the test extra: pip install -e '.[test]'")
    return exe


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "fmt"])
def test_ruff_clean(args):
    proc = subprocess.run([_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_deprecated_tree_api():
    """jaxpruner broke on `jax.tree_map`; we use jax.tree.* / jax.tree_util.* only."""
    bad = []
    for path in (ROOT / "jcompress").rglob("*.py"):
        text = path.read_text()
        for needle in ("jax.tree_map(", "jax.tree_leaves(", "jax.tree_flatten(", "tree_multimap"):
            if needle in text:
                bad.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not bad, bad
