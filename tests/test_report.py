"""jc.report.summarize against hand computation; plots write images."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress.quantization
from jcompress import checkpoint, plots, report

QArray = jcompress.quantization.QArray


@pytest.fixture(scope="module")
def tree():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    w.reshape(-1)[rng.permutation(32)[:30]] = 0.0  # 30 of 32 zeros
    values = rng.integers(1, 8, (16, 8))
    values.reshape(-1)[rng.permutation(128)[:96]] = 0  # 96 of 128 zeros
    q = QArray(jnp.asarray(values, jnp.int4), jnp.full((1, 8), 0.5), bits=4, dtype=jnp.float32)
    zp = jnp.full((1, 8), 3, jnp.int8)
    vals8 = np.full((16, 8), 3, np.int8)
    vals8[:4] = 7  # 32 values differ from the zero point; 96 dequantize to 0.0
    qa = QArray(jnp.asarray(vals8), jnp.full((1, 8), 0.5), zp, bits=8, dtype=jnp.bfloat16)
    return {
        "w": jnp.asarray(w),
        "b": jnp.asarray(rng.random(10) + 1.0, jnp.bfloat16),
        "m": np.ones(16, bool),
        "q": q,
        "qa": qa,
        "step": 3,
    }


def test_rows_match_hand_computation(tree):
    s = report.summarize(tree)
    rows = {r.path: r for r in s.leaves}
    assert list(rows) == ["b", "m", "q", "qa", "w"]  # the scalar "step" is skipped
    w, b, m, q, qa = rows["w"], rows["b"], rows["m"], rows["q"], rows["qa"]
    assert (w.bits, w.sparsity, w.memory_bytes) == (32, 30 / 32, 128)
    assert w.encoded_bytes == 4 + 2 * 4  # 32-bit mask + two float32
    assert (b.bits, b.sparsity, b.memory_bytes, b.encoded_bytes) == (16, 0.0, 20, 20)
    assert (m.bits, m.memory_bytes, m.encoded_bytes) == (1, 2, 2)
    assert (q.kind, q.bits, q.sparsity, q.shape) == ("QArray", 4, 0.75, (16, 8))
    assert q.memory_bytes == 16 * 8 // 2 + 8 * 4 == tree["q"].nbytes  # packed int4 + scales
    assert q.encoded_bytes == (16 + 32 * 4 // 8) + 8 * 4  # sparse values + dense scale
    assert (qa.bits, qa.sparsity, qa.dtype) == (8, 0.75, "bfloat16")
    assert qa.memory_bytes == 128 + 32 + 8 == tree["qa"].nbytes
    assert qa.encoded_bytes == 128 + 32 + 8  # no value is 0 in storage: dense
    assert s.memory_bytes == 128 + 20 + 2 + 96 + 168
    assert s.encoded_bytes == 12 + 20 + 2 + 64 + 168
    assert s.size == 32 + 10 + 16 + 128 + 128
    assert s.sparsity == pytest.approx((30 + 0 + 0 + 96 + 96) / s.size)
    assert s.reference_bytes is None and s.ratio is None


def test_ratios_against_a_reference(tree):
    reference = dict(tree)
    reference["q"] = jnp.zeros((16, 8), jnp.float32)
    reference["qa"] = jnp.zeros((16, 8), jnp.bfloat16)
    s = report.summarize(tree, reference=reference)
    rows = {r.path: r for r in s.leaves}
    assert rows["q"].reference_bytes == 512 and rows["q"].ratio == 512 / 96
    assert rows["qa"].ratio == 256 / 168
    assert rows["w"].ratio == 1.0
    ref_total = 128 + 20 + 2 + 512 + 256
    assert s.reference_bytes == ref_total
    assert s.ratio == ref_total / s.memory_bytes
    assert s.encoded_ratio == ref_total / s.encoded_bytes


def test_reference_with_other_paths_is_an_error(tree):
    with pytest.raises(ValueError, match=r"(?s)reference does not match.*missing 'w'"):
        report.summarize(tree, reference={k: v for k, v in tree.items() if k != "w"})


def test_encoded_bytes_equal_what_save_writes(tree, tmp_path):
    s = report.summarize(tree)
    checkpoint.save(tmp_path / "c", tree)
    meta = json.loads((tmp_path / "c" / "jcompress.json").read_text())
    assert sum(e["nbytes"] for e in meta["arrays"]) == s.encoded_bytes


def test_to_dict_json_and_rendering(tree):
    s = report.summarize(tree, reference=tree)
    d = json.loads(s.to_json())
    assert d["total"]["memory_bytes"] == s.memory_bytes
    assert d["total"]["ratio"] == 1.0
    assert [r["path"] for r in d["leaves"]] == [r.path for r in s.leaves]
    assert d["leaves"][0]["shape"] == [10]
    text = str(s)
    for r in s.leaves:
        assert r.path in text
    assert "total" in text and "1.0x" in text


def test_plots_write_png(tmp_path, tree):
    plots.tradeoff([("a", 1000, 0.9), ("b", 100, 0.8)], tmp_path / "t.png")
    plots.layers(report.summarize(tree), tmp_path / "l.png")
    for name in ("t.png", "l.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no points"):
        plots.tradeoff([], tmp_path / "x.png")


def test_sharded_leaves_are_counted_without_gathering(devices):
    mesh = jax.make_mesh((8,), ("x",))
    w = np.zeros((64, 8), np.float32)
    w[:8] = 1.0
    x = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    (row,) = report.summarize({"w": x}).leaves
    assert row.sparsity == 56 / 64 and row.memory_bytes == 64 * 8 * 4
    assert row.encoded_bytes == 64 + 64 * 4  # bitmask + the 64 ones
