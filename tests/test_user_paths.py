"""Paths as users write them: relative to the working directory, ``~``, ``pathlib.Path``.

Every API and CLI command that takes a path is called from a fresh temporary working directory
(``monkeypatch.chdir``), never with the absolute temporary paths the rest of the suite uses;
and errors that are not damage are not reported as damage.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jcompress as jc
from jcompress import checkpoint, plots
from jcompress.checkpoint import _io
from jcompress.cli import main
from jcompress.quantization import QArray

TREE = {
    "params": {
        "Dense_0": {"kernel": np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100},
        "Dense_1": {"kernel": np.ones((32, 8), np.float32), "bias": np.zeros(8, np.float32)},
    },
    "big": np.arange(100_000, dtype=np.float32),  # stored by orbax itself, not in the blob
}


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A fresh working directory, with ``~`` pointing at a fresh home inside it."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    return work, home


def assert_same(a, b):
    la, lb = jc.tree.leaves_with_paths(a), jc.tree.leaves_with_paths(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        if jc.is_compressed(x):
            x, y = x.dequantize(), y.dequantize()
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "spell", ["relative", "dot", "nested", "home", "pathlib", "pathlib_home", "bytes"]
)
def test_checkpoint_save_load_disk_bytes_accept_user_paths(cwd, spell):
    work, home = cwd
    path, where = {
        "relative": ("ckpt", work / "ckpt"),
        "dot": ("./out/../ckpt", work / "ckpt"),
        "nested": ("runs/0/ckpt", work / "runs/0/ckpt"),
        "home": ("~/ckpt", home / "ckpt"),
        "pathlib": (pathlib.Path("ckpt"), work / "ckpt"),
        "pathlib_home": (pathlib.Path("~/ckpt"), home / "ckpt"),
        "bytes": (b"ckpt", work / "ckpt"),
    }[spell]
    tree = dict(
        TREE, q=QArray(jnp.ones((4, 4), jnp.int8), jnp.ones((1, 4)), bits=8, dtype=jnp.float32)
    )
    checkpoint.save(path, tree)
    assert (where.resolve() / "jcompress.json").is_file()
    assert_same(checkpoint.load(path), tree)
    assert checkpoint.disk_bytes(path) == checkpoint.disk_bytes(where)
    checkpoint.save(path, {"again": 1})  # overwrite through the same spelling
    assert checkpoint.load(path) == {"again": 1}


def test_load_after_changing_directory(cwd, monkeypatch):
    work, _ = cwd
    checkpoint.save("a/ckpt", TREE)
    (work / "elsewhere").mkdir()
    monkeypatch.chdir(work / "elsewhere")
    assert_same(checkpoint.load("../a/ckpt"), TREE)


def test_checkpoint_manager_with_a_relative_directory(cwd):
    with ocp.CheckpointManager("manager") as mngr:  # orbax resolves it; we must too
        mngr.save(0, args=checkpoint.JCompressSave(TREE))
        mngr.wait_until_finished()
        assert_same(mngr.restore(0, args=checkpoint.JCompressRestore()), TREE)


def test_plots_accept_user_paths(cwd):
    work, home = cwd
    plots.tradeoff([("f32", 1e6, 0.9), ("int4", 1e5, 0.8)], "figs.png")
    plots.layers(jc.report.summarize(TREE), "~/layers.png")
    assert (work / "figs.png").is_file() and (home / "layers.png").is_file()


@pytest.mark.parametrize("bad, error", [(3, TypeError), (None, TypeError), ("", ValueError)])
def test_non_paths_are_clear_errors(cwd, bad, error):
    with pytest.raises(error, match="directory"):
        checkpoint.save(bad, TREE)
    with pytest.raises(error, match="directory"):
        checkpoint.load(bad)


# ---- the CLI, from an empty working directory ---------------------------------------------


def test_cli_relative_and_home_paths(cwd, capsys):
    work, home = cwd
    checkpoint.save("in", TREE)
    assert main(["quantize", "in", "out/q4", "--bits", "4", "--group-size", "32"]) == 0
    assert main(["prune", "in", "~/pruned", "--sparsity", "0.5"]) == 0
    assert main(["inspect", "out/q4"]) == 0
    assert main(["inspect", "~/pruned", "--json"]) == 0
    capsys.readouterr()
    q = checkpoint.load(work / "out/q4")["params"]["Dense_0"]["kernel"]
    assert isinstance(q, QArray) and q.bits == 4
    kernel = checkpoint.load(home / "pruned")["params"]["Dense_0"]["kernel"]
    assert np.count_nonzero(kernel == 0) == kernel.size // 2


# ---- honest error classes ------------------------------------------------------------------


def _failing_restore(exc):
    def restore(self, *args, **kwargs):
        raise exc

    return restore


@pytest.mark.parametrize(
    "exc, error, match",
    [
        # what the README's first command hit: an orbax requirement, not a damaged file
        (
            ValueError("Checkpoint path should be absolute. Got x/arrays"),
            RuntimeError,
            "not a broken",
        ),
        (PermissionError(13, "Permission denied"), PermissionError, "permission denied"),
        (ValueError("PERMISSION_DENIED: Error reading local file"), PermissionError, "permission"),
        (OSError(5, "Input/output error"), OSError, "Input/output error"),
        (ValueError("DATA_LOSS: Error decoding b-tree node"), ValueError, "corrupted or truncated"),
        (ValueError("OUT_OF_RANGE: byte range not valid"), ValueError, "corrupted or truncated"),
    ],
)
def test_read_errors_say_what_they_are_and_keep_the_cause(cwd, monkeypatch, exc, error, match):
    checkpoint.save("ckpt", TREE)
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", _failing_restore(exc))
    with pytest.raises(error, match=match) as info:
        checkpoint.load("ckpt")
    assert info.value.__cause__ is exc
    if error is not ValueError:
        assert "corrupted" not in str(info.value)
    assert str(cwd[0] / "ckpt") in str(info.value)  # names the checkpoint


def test_damage_is_still_reported_as_damage(cwd):
    checkpoint.save("ckpt", TREE)
    files = [p for p in pathlib.Path("ckpt/arrays").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:50])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        checkpoint.load("ckpt")
    assert _io.SCHEMA_FILE == "jcompress.json"
