"""The jcompress command: help, inspect, quantize, prune, one-line errors, and the demo."""

import json
import re
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import jcompress.pruning
import jcompress.quantization
from jcompress import checkpoint
from jcompress.cli import main

QArray = jcompress.quantization.QArray


@pytest.fixture(scope="module")
def flax_ckpt(tmp_path_factory):
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((64, 32)).astype(np.float32),
                "bias": rng.standard_normal(32).astype(np.float32),
            },
            "Dense_1": {"kernel": rng.standard_normal((32, 8)).astype(np.float32)},
        }
    }
    d = tmp_path_factory.mktemp("in") / "flax"
    checkpoint.save(d, params)
    return d, params


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --help of every command: tests/test_readme.py, from an empty working directory


def test_inspect_table_and_json(capsys, flax_ckpt):
    d, _ = flax_ckpt
    code, out, _ = run(capsys, "inspect", d)
    assert code == 0
    assert "params/Dense_0/kernel" in out and "on disk" in out
    code, out, _ = run(capsys, "inspect", d, "--json")
    data = json.loads(out)
    assert data["total"]["disk_bytes"] == checkpoint.disk_bytes(d)
    assert data["total"]["memory_bytes"] == (64 * 32 + 32 + 32 * 8) * 4


def test_quantize_flax_layout_groups_along_the_input_axis(capsys, flax_ckpt, tmp_path):
    d, params = flax_ckpt
    out_dir = tmp_path / "q"
    code, out, err = run(
        capsys, "quantize", d, out_dir, "--bits", 4, "--group-size", 32, "--calibration", "absmax"
    )
    assert code == 0, err
    assert "QArray" in out
    q = checkpoint.load(out_dir)["params"]
    k = q["Dense_0"]["kernel"]
    assert isinstance(k, QArray) and k.bits == 4 and k.scale.shape == (2, 32)  # 64 / 32 groups
    w = params["params"]["Dense_0"]["kernel"]
    err_abs = np.abs(np.asarray(k.dequantize()) - w)
    scale = np.repeat(np.asarray(k.scale), 32, axis=0)
    assert np.all(err_abs <= scale / 2 * (1 + 1e-6))  # absmax: round to nearest, no clipping
    assert isinstance(q["Dense_0"]["bias"], np.ndarray)  # biases stay float


def test_quantize_torch_layout_and_plain_orbax_input(capsys, tmp_path):
    rng = np.random.default_rng(1)
    state = {
        "fc": {
            "weight": rng.standard_normal((16, 64)).astype(np.float32),
            "bias": np.zeros(16, np.float32),
        }
    }
    with ocp.PyTreeCheckpointer() as c:
        c.save(tmp_path / "orbax", state)
    code, _, err = run(
        capsys,
        "quantize",
        tmp_path / "orbax",
        tmp_path / "q",
        "--bits",
        8,
        "--layout",
        "torch",
        "--calibration",
        "mse",
    )
    assert code == 0, err
    w = checkpoint.load(tmp_path / "q")["fc"]["weight"]
    assert isinstance(w, QArray) and w.bits == 8
    assert w.scale.shape == (16, 1)  # one scale per output row of (out, in)


def test_prune_exact_count_and_nm(capsys, flax_ckpt, tmp_path):
    d, params = flax_ckpt
    code, _, err = run(capsys, "prune", d, tmp_path / "p", "--sparsity", 0.75)
    assert code == 0, err
    p = checkpoint.load(tmp_path / "p")["params"]
    assert np.count_nonzero(p["Dense_0"]["kernel"] == 0) == round(0.75 * 64 * 32)
    assert np.count_nonzero(p["Dense_1"]["kernel"] == 0) == round(0.75 * 32 * 8)
    np.testing.assert_array_equal(p["Dense_0"]["bias"], params["params"]["Dense_0"]["bias"])

    code, _, err = run(capsys, "prune", d, tmp_path / "nm", "--structure", "nm:2:4")
    assert code == 0, err
    k = np.asarray(checkpoint.load(tmp_path / "nm")["params"]["Dense_0"]["kernel"])
    groups = (k != 0).reshape(16, 4, 32)  # groups of 4 along the contracting axis (in)
    assert np.all(groups.sum(axis=1) == 2)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["quantize", "{tmp}/missing", "{tmp}/out"], ["missing", "no such checkpoint"]),
        (["inspect", "{tmp}/missing"], ["no such checkpoint"]),
        (["quantize", "{in}", "{tmp}/out", "--bits", "x"], ["invalid int value", "--bits"]),
        (["quantize", "{in}", "{tmp}/out", "--calibration", "best"], ["invalid choice"]),
        (["prune", "{in}", "{tmp}/out"], ["give --sparsity or --structure"]),
        (["prune", "{in}", "{tmp}/out", "--structure", "2:4"], ["expected nm:N:M"]),
        (["prune", "{in}", "{tmp}/out", "--sparsity", "1.5"], ["[0, 1)"]),
        (["frobnicate"], ["invalid choice"]),
        ([], ["required"]),
        (["inspect", "{tmp}"], ["neither a jcompress checkpoint nor an orbax"]),
    ],
)
def test_errors_are_one_line_exit_2(capsys, flax_ckpt, tmp_path, argv, needles):
    argv = [a.format(tmp=tmp_path, **{"in": flax_ckpt[0]}) for a in argv]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *needles)


def test_library_errors_are_one_line(capsys, flax_ckpt, tmp_path):
    d, _ = flax_ckpt
    code, _, err = run(capsys, "quantize", d, tmp_path / "o", "--where", "nothing")
    assert_one_line_error(code, err, "selects no leaf")
    code, _, err = run(capsys, "quantize", d, tmp_path / "o", "--bits", 12)
    assert_one_line_error(code, err, "bits")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "f.txt").write_text("x")
    code, _, err = run(capsys, "quantize", d, tmp_path / "foreign")
    assert_one_line_error(code, err, "refusing to overwrite")


def test_console_script_process_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jcompress.cli", "inspect", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such checkpoint" in proc.stderr


@pytest.mark.slow
def test_demo_quick(capsys, tmp_path, monkeypatch):
    """As a newcomer runs it: from an empty working directory, default (relative) output."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "demo", "--quick")
    assert code == 0, err
    code, report, err = run(capsys, "inspect", "jcompress-demo/checkpoints/pruned_int4")
    assert code == 0, err
    assert "Dense_0/kernel" in report and "QArray" in report and "on disk" in report
    tmp_path = tmp_path / "jcompress-demo"
    for name in ("results.json", "tradeoff.png", "layers.png"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    printed = dict(re.findall(r"accuracy (.+?): (\d\.\d{4})", out))
    assert set(printed) == {v["name"] for v in results["variants"]}
    assert "dense float32" in printed
    for name, acc in printed.items():
        assert 0.9 < float(acc) <= 1.0, (name, acc)
    for v in results["variants"]:
        assert v["reloaded_identical"] is True
        ckpt_dir = tmp_path / "checkpoints" / v["name"].replace(" ", "_").replace("%", "pct")
        assert checkpoint.disk_bytes(ckpt_dir) == v["disk_bytes"]
    dense = results["variants"][0]
    assert dense["memory_bytes"] == (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10) * 4
    for v in results["variants"][1:]:
        assert v["disk_bytes"] < dense["disk_bytes"]
        if "int" in v["name"]:  # quantized: smaller in memory too (pruning alone is not)
            assert v["memory_bytes"] < dense["memory_bytes"]
