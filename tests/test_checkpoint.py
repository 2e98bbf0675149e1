"""jc.checkpoint: exact round trips, encodings, atomicity, errors, sharding, CheckpointManager."""

import dataclasses
import json
import os
from collections import OrderedDict, namedtuple
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.core import FrozenDict
from hypothesis import given
from hypothesis import strategies as st

import jcompress.checkpoint as ckpt
import jcompress.quantization
import jcompress.structure
from jcompress.checkpoint import _encode, _io
from jcompress.tree import Compressed

QArray = jcompress.quantization.QArray

DTYPES = [
    "float32",
    "bfloat16",
    "float16",
    "int8",
    "int4",
    "int2",
    "uint4",
    "uint32",
    "bool",
    "float8_e4m3fn",
]
SHAPES = [(), (7,), (3, 5), (64, 129)]


def _random(rng, shape, dtype, zeros=0.0):
    dtype = np.dtype(jnp.dtype(dtype))
    if dtype == np.bool_:
        x = rng.random(shape) < 0.5
    elif np.issubdtype(dtype, np.integer) or dtype.name in ("int4", "int2", "uint4"):
        info = ml_dtypes.iinfo(dtype)
        x = rng.integers(int(info.min), int(info.max) + 1, size=shape).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    x = np.asarray(x)
    if zeros:
        x[rng.random(shape) < zeros] = 0
    return x


def _bits(x) -> bytes:
    x = np.asarray(x)
    if _encode.element_bits(x.dtype) < 8:
        return (x.view(np.uint8) & np.uint8((1 << _encode.element_bits(x.dtype)) - 1)).tobytes()
    return x.tobytes()


def assert_identical(a, b):
    """Same structure, same leaf types, dtypes, shapes and bits."""
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y), (type(x), type(y))
        if isinstance(x, np.ndarray | np.generic | jax.Array):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                assert jax.random.key_impl(x) == jax.random.key_impl(y)
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            assert np.dtype(x.dtype) == np.dtype(y.dtype)
            assert x.shape == y.shape
            assert _bits(x) == _bits(y)
        else:
            assert x == y or (x != x and y != y)


def roundtrip(tmp_path, tree, name="ckpt", **load_kwargs):
    d = tmp_path / name
    ckpt.save(d, tree)
    return ckpt.load(d, **load_kwargs)


def schema(d: Path) -> dict:
    return json.loads((d / "jcompress.json").read_text())


# ---- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tree = {f"s{i}": jnp.asarray(_random(rng, s, dtype)) for i, s in enumerate(SHAPES)}
    tree["sparse"] = jnp.asarray(_random(rng, (64, 129), dtype, zeros=0.9))
    tree["numpy"] = _random(rng, (3, 5), dtype)
    assert_identical(roundtrip(tmp_path, tree), tree)


@given(
    shape=st.sampled_from([(1,), (9,), (4, 8), (33, 3)]),
    dtype=st.sampled_from(DTYPES),
    zeros=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    special=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_encoding_is_lossless_and_picks_the_smaller(shape, dtype, zeros, special, seed):
    rng = np.random.default_rng(seed)
    x = _random(rng, shape, dtype, zeros=zeros)
    if special and np.issubdtype(x.dtype, np.floating) and x.dtype.itemsize >= 2:
        flat = x.reshape(-1)
        flat[0] = -0.0  # a zero whose bits are not zero: must survive
        flat[-1] = np.nan
    enc = _encode.encode(x)
    back = _encode.decode(enc.encoding, enc.payload, x.dtype, x.shape, enc.nnz)
    assert back.dtype == x.dtype and back.shape == x.shape and _bits(back) == _bits(x)
    # Independent reference sizes: packed dense, and bitmask + packed non-zero values.
    bits = _encode.element_bits(x.dtype)
    dense = -(-x.size * bits // 8)
    nnz = int(np.count_nonzero(np.frombuffer(_bits(x), np.uint8).reshape(x.size, -1).any(1)))
    sparse = -(-x.size // 8) + -(-nnz * bits // 8)
    if x.dtype != np.bool_ and sparse < dense:
        assert enc.encoding == "sparse" and enc.payload.size == sparse and enc.nnz == nnz
    else:
        assert enc.encoding == "dense" and enc.payload.size == dense


def test_containers_scalars_and_order(tmp_path):
    tree = {
        "z": [1, 2.5, True, "text", None, float("inf")],
        "a": (np.float32(3.0), np.int64(-4), ()),
        "ints": {3: jnp.ones(2), 1: "one"},
        "empty": {},
        "frozen": FrozenDict({"k": jnp.arange(3)}),
        "nested": [{"x": (None, [jnp.zeros((2, 2), jnp.bfloat16)])}],
        "key": jax.random.key(3),
        "raw_key": jax.random.PRNGKey(4),
    }
    back = roundtrip(tmp_path, tree)
    assert_identical(back, tree)
    assert list(back) == list(tree)  # insertion order kept
    assert list(back["ints"]) == [3, 1]
    assert type(back["frozen"]) is FrozenDict
    assert type(back["a"][0]) is np.float32 and type(back["a"][1]) is np.int64
    assert ckpt.load(tmp_path / "ckpt")["z"][2] is True


def test_nnx_state_with_variables_and_rngs(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs)])
            self.rngs = rngs

    graphdef, state = nnx.split(Net(nnx.Rngs(0, dropout=1)))
    back = roundtrip(tmp_path, state)
    assert_identical(back, state)
    assert type(back) is nnx.State
    assert type(back["dense"]["kernel"]) is nnx.Param
    assert type(back["norm"]["mean"]) is nnx.BatchStat
    model = nnx.merge(graphdef, back)
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(model.dense(x), nnx.merge(graphdef, state).dense(x))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qarray_round_trip(tmp_path, bits, dtype):
    rng = np.random.default_rng(bits)
    store = {8: jnp.int8, 4: jnp.int4, 2: jnp.int2}[bits]
    lim = 2 ** (bits - 1)
    values = jnp.asarray(rng.integers(-lim, lim, (64, 48)), store)
    q_sym = QArray(
        values, jnp.asarray(rng.random((1, 48)) + 0.1, jnp.float32), bits=bits, dtype=dtype
    )
    zp = jnp.asarray(rng.integers(-lim, lim, (2, 48)), store)
    q_asym = QArray(values, jnp.full((2, 48), 0.5), zp, jnp.ones(64), bits=bits, dtype=dtype)
    tree = {"sym": q_sym, "asym": q_asym, "bias": jnp.zeros(48, dtype)}
    back = roundtrip(tmp_path, tree)
    assert_identical(back, tree)
    for k in ("sym", "asym"):
        assert isinstance(back[k], QArray) and back[k].bits == bits
        assert back[k].dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(back[k].dequantize(), tree[k].dequantize())
    assert back["sym"].zero_point is None and back["asym"].act_scale is not None


def test_quantized_model_round_trip_and_pruned_values_stored_sparse(tmp_path):
    from jcompress.quantization import QuantSpec, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0.0  # pruned
    params = {"Dense_0": {"kernel": jnp.asarray(w), "bias": jnp.zeros(128)}}
    q = quantize(params, QuantSpec(bits=4))
    back = roundtrip(tmp_path, q)
    assert_identical(back, q)
    entries = {e["path"]: e for e in schema(tmp_path / "ckpt")["arrays"]}
    values = entries["Dense_0/kernel/values"]
    assert values["encoding"] == "sparse" and values["dtype"] == "int4"
    nnz = int(np.count_nonzero(np.asarray(q["Dense_0"]["kernel"].values).astype(np.int8)))
    assert values["nnz"] == nnz
    assert values["nbytes"] == 256 * 128 // 8 + -(-nnz * 4 // 8)  # bitmask + packed nibbles


def test_sparse_encoding_shrinks_the_checkpoint_on_disk(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 512)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0.0
    tree = {"w": jnp.asarray(w)}
    ckpt.save(tmp_path / "enc", tree)
    assert schema(tmp_path / "enc")["arrays"][0]["encoding"] == "sparse"
    with ocp.PyTreeCheckpointer() as c:  # the same tree without our encoding
        c.save(tmp_path / "plain", tree)
    encoded, plain = ckpt.disk_bytes(tmp_path / "enc"), ckpt.disk_bytes(tmp_path / "plain")
    assert encoded < 0.85 * plain, (encoded, plain)


def test_small_arrays_share_one_blob(tmp_path):
    tree = {f"b{i}": jnp.full((16,), i, jnp.float32) for i in range(100)}
    ckpt.save(tmp_path / "c", tree)
    entries = schema(tmp_path / "c")["arrays"]
    assert all(e["store"] == "blob" for e in entries)
    with ocp.PyTreeCheckpointer() as c:
        c.save(tmp_path / "plain", tree)
    plain = ckpt.disk_bytes(tmp_path / "plain")
    assert ckpt.disk_bytes(tmp_path / "c" / "arrays") < plain / 10  # one array, not 100
    assert ckpt.disk_bytes(tmp_path / "c") < plain / 2
    assert_identical(ckpt.load(tmp_path / "c"), tree)


def test_large_dense_arrays_are_stored_raw_by_orbax(tmp_path):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)), jnp.float32)
    assert_identical(roundtrip(tmp_path, {"w": w}), {"w": w})
    assert schema(tmp_path / "ckpt")["arrays"][0]["encoding"] == "raw"


# ---- atomicity and corruption ---------------------------------------------------------------


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "c"
    old = {"w": jnp.arange(4.0), "big": jnp.ones((300, 300))}
    ckpt.save(d, old)

    def failing_dump(*args, **kwargs):  # arrays are already written when the schema is
        raise RuntimeError("disk full")

    monkeypatch.setattr(_io.json, "dump", failing_dump)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save(d, {"w": jnp.zeros(4), "big": jnp.zeros((300, 300))})
    monkeypatch.undo()
    assert_identical(ckpt.load(d), old)
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary directories left


def test_overwrite_replaces_and_interrupted_rename_is_named(tmp_path, monkeypatch):
    d = tmp_path / "c"
    ckpt.save(d, {"v": 1})
    ckpt.save(d, {"v": 2})
    assert ckpt.load(d) == {"v": 2} and sorted(os.listdir(tmp_path)) == ["c"]
    calls = []
    real_rename = os.rename

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(_io.os, "rename", crash_on_second)
    with pytest.raises(OSError, match="power cut"):
        ckpt.save(d, {"v": 3})
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"previous checkpoint at .*\.c\.old-"):
        ckpt.load(d)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a jcompress checkpoint; refusing"):
        ckpt.save(tmp_path / "x", {"a": 1})
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate_json", "corrupted or truncated.*not valid JSON"),
        ("newer_version", "newer jcompress.*upgrade"),
        ("bad_crc", "CRC-32 mismatch"),
        ("drop_arrays", "arrays/ directory is missing"),
        ("truncate_data", "corrupted or truncated"),
        ("unknown_kind", "not registered here"),
        ("code_in_type", "unknown nnx Variable type"),
    ],
)
def test_damaged_checkpoints_raise_clear_errors(tmp_path, damage, match):
    d = tmp_path / "c"
    state = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))[1]
    q = QArray(jnp.ones((4, 4), jnp.int8), jnp.ones((1, 4)), bits=8, dtype=jnp.float32)
    ckpt.save(d, {"small": jnp.arange(8.0), "big": jnp.ones((200, 200)), "q": q, "s": state})
    path = d / "jcompress.json"
    text = path.read_text()
    meta = json.loads(text)
    if damage == "truncate_json":
        path.write_text(text[: len(text) // 2])
    elif damage == "newer_version":
        meta["version"] = ckpt.VERSION + 1
        path.write_text(json.dumps(meta))
    elif damage == "bad_crc":
        meta["arrays"][0]["crc32"] ^= 1
        path.write_text(json.dumps(meta))
    elif damage == "drop_arrays":
        import shutil

        shutil.rmtree(d / "arrays")
    elif damage == "truncate_data":
        files = [p for p in (d / "arrays").rglob("*") if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[:100])
    elif damage == "unknown_kind":
        assert '"kind":"QArray"' in text
        path.write_text(text.replace('"kind":"QArray"', '"kind":"Mystery"'))
    elif damage == "code_in_type":
        assert '"type":"Param"' in text
        path.write_text(text.replace('"type":"Param"', '"type":"os.system"'))
    with pytest.raises(ValueError, match=match):
        ckpt.load(d)


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt.load(tmp_path / "nothing")
    with ocp.PyTreeCheckpointer() as c:
        c.save(tmp_path / "orbax", {"a": np.ones(2)})
    with pytest.raises(ValueError, match="not a jcompress checkpoint"):
        ckpt.load(tmp_path / "orbax")


# ---- what cannot be saved --------------------------------------------------------------------


class _Unregistered(Compressed):
    def dequantize(self):
        return jnp.zeros(1)

    shape = property(lambda self: (1,))
    dtype = property(lambda self: jnp.float32)
    nbytes = property(lambda self: 4)


@pytest.mark.parametrize(
    "leaf, match",
    [
        (object(), "a/b: cannot save a builtins.object"),
        (OrderedDict(x=1), "a/b: cannot save a collections.OrderedDict"),
        (namedtuple("P", "x")(1), "a/b: cannot save a"),
        ({1, 2}, "a/b: cannot save a builtins.set"),
        (np.array(["text"]), "a/b: cannot save an array of dtype <U4"),
        (np.array([object()]), "a/b: cannot save an array of dtype object"),
        ({(1, 2): 3}, "a/b: cannot save the dict key"),
        (_Unregistered(), "a/b: cannot save .*register_compressed"),
    ],
)
def test_unsupported_objects_name_their_path(tmp_path, leaf, match):
    with pytest.raises(TypeError, match=match):
        ckpt.save(tmp_path / "c", {"a": {"b": leaf}, "ok": jnp.ones(2)})
    assert not any(tmp_path.iterdir())


def test_traced_values_are_refused(tmp_path):
    @jax.jit
    def f(x):
        ckpt.save(tmp_path / "c", {"x": x})
        return x

    with pytest.raises(TypeError, match="x: cannot save a traced value"):
        f(jnp.ones(2))


def test_register_compressed_round_trip_and_errors(tmp_path):
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class LowRank(Compressed):
        u: jax.Array
        v: jax.Array
        rank: int = dataclasses.field(metadata={"static": True})

        def dequantize(self):
            return self.u @ self.v

        shape = property(lambda self: (self.u.shape[0], self.v.shape[1]))
        dtype = property(lambda self: self.u.dtype)
        nbytes = property(lambda self: self.u.nbytes + self.v.nbytes)

    with pytest.raises(TypeError, match="register_compressed"):
        ckpt.save(tmp_path / "c", {"w": LowRank(jnp.ones((4, 2)), jnp.ones((2, 3)), 2)})
    ckpt.register_compressed(LowRank, name="test.LowRank", arrays=("u", "v"), static=("rank",))
    tree = {"w": LowRank(jnp.ones((4, 2)), jnp.arange(6.0).reshape(2, 3), 2)}
    back = roundtrip(tmp_path, tree)
    assert isinstance(back["w"], LowRank) and back["w"].rank == 2
    np.testing.assert_array_equal(back["w"].dequantize(), tree["w"].dequantize())
    with pytest.raises(ValueError, match="already registered"):
        ckpt.register_compressed(QArray, name="test.LowRank", arrays=("values",))
    with pytest.raises(TypeError, match="Compressed subclass"):
        ckpt.register_compressed(dict, name="x", arrays=("a",))


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_checkpoint_of_schema_version_1_loads_as_the_wrapper(tmp_path, symmetric):
    """Before the wrapper, an AWQArray was a QArray holding ``Q(s W)`` with ``act_scale = s``,
    saved (schema version 1) as one compressed node with those four children. Written here by
    hand: the arrays by this writer, the tree node as version 1 wrote it."""
    rng = np.random.default_rng(0)
    values = rng.integers(-7, 8, (8, 4)).astype(ml_dtypes.int4)
    scale = rng.uniform(0.01, 0.1, (1, 4)).astype(np.float32)
    zero_point = rng.integers(-2, 3, (1, 4)).astype(ml_dtypes.int4)
    s = rng.uniform(0.5, 2.0, (8, 1)).astype(np.float32)
    arrays = {"values": values, "scale": scale, "act_scale": s}
    if not symmetric:
        arrays["zero_point"] = zero_point
    d = tmp_path / "old"
    ckpt.save(d, {k: jnp.asarray(v) for k, v in arrays.items()})
    meta = json.loads((d / "jcompress.json").read_text())
    index = {e["path"]: i for i, e in enumerate(meta["arrays"])}
    for e in meta["arrays"]:
        e.update(path=f"Dense_0/kernel/{e['path']}", leaf="Dense_0/kernel", leaf_shape=[8, 4])
    children = {
        k: {"t": "array", "a": index[k]} if k in index else None
        for k in ("values", "scale", "zero_point", "act_scale")
    }
    old = {
        "t": "compressed",
        "kind": "AWQArray",
        "arrays": children,
        "static": {"bits": 4, "dtype": {"dtype": "bfloat16"}},
    }
    meta["tree"] = {"t": "dict", "items": [["Dense_0", {"t": "dict", "items": [["kernel", old]]}]]}
    meta["version"] = 1
    (d / "jcompress.json").write_text(json.dumps(meta))

    leaf = ckpt.load(d)["Dense_0"]["kernel"]
    AWQArray = jcompress.quantization.AWQArray
    assert type(leaf) is AWQArray and type(leaf.inner) is QArray
    assert leaf.dtype == jnp.bfloat16 and leaf.bits == 4 and leaf.inner.act_scale is None
    np.testing.assert_array_equal(np.asarray(leaf.inner.values, np.int8), values.astype(np.int8))
    np.testing.assert_array_equal(leaf.input_scale, s)
    zp = np.float32(0) if symmetric else zero_point.astype(np.float32)
    want = (values.astype(np.float32) - zp) * scale / s  # Q(s W) / s in float32, then bfloat16
    np.testing.assert_array_equal(
        np.asarray(leaf.dequantize(), np.float32), want.astype(ml_dtypes.bfloat16)
    )
    # saved again, it is the wrapper: a nested compressed node, schema version 2
    ckpt.save(tmp_path / "new", {"k": leaf})
    meta = json.loads((tmp_path / "new" / "jcompress.json").read_text())
    node = meta["tree"]["items"][0][1]
    assert meta["version"] == ckpt.VERSION == 2 and node["arrays"]["inner"]["kind"] == "QArray"
    again = ckpt.load(tmp_path / "new")["k"]
    np.testing.assert_array_equal(again.dequantize(), leaf.dequantize())


def test_checkpoints_know_only_the_protocol_and_the_registry():
    """No checkpoint module imports a leaf module; leaf kinds register at class definition."""
    import ast
    import subprocess
    import sys

    root = Path(jcompress.checkpoint.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                assert name != "jcompress" and not name.startswith(
                    ("jcompress.quantization", "jcompress.structure", "jcompress.pruning")
                ), f"{path.name} imports {name}"
    code = (
        "import sys, jcompress; from jcompress.checkpoint import _registry; "
        "assert not any(m.startswith('orbax') for m in sys.modules), 'orbax imported'; "
        "print(_registry.registered())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['AWQArray', 'Float8Array', 'LookupArray', 'LowRank', 'QArray']"


# ---- sharding and CheckpointManager ----------------------------------------------------------


def test_sharded_save_and_load_restores_shardings(tmp_path, devices):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    rng = np.random.default_rng(0)
    big = jax.device_put(
        jnp.asarray(rng.standard_normal((256, 128)), jnp.float32), NS(mesh, P("data", "model"))
    )
    small = jax.device_put(jnp.arange(8.0), NS(mesh, P("data")))
    values = jax.device_put(
        jnp.asarray(rng.integers(-8, 8, (256, 128)), jnp.int4), NS(mesh, P(None, "model"))
    )
    q = QArray(values, jnp.ones((1, 128)), bits=4, dtype=jnp.float32)
    tree = {"big": big, "small": small, "q": q}
    d = tmp_path / "c"
    ckpt.save(d, tree)

    back = ckpt.load(d)  # saved NamedShardings rebuilt on this process's 8 devices
    assert_identical(back, tree)
    assert back["big"].sharding.spec == P("data", "model")
    assert back["small"].sharding.spec == P("data")
    assert back["q"].values.sharding.spec == P(None, "model")

    repl = NS(mesh, P())
    back = ckpt.load(d, shardings={"big": NS(mesh, P(None, "data")), "q": NS(mesh, P("model"))})
    assert back["big"].sharding.spec == P(None, "data")
    assert back["q"].values.sharding.spec == P("model")
    assert back["q"].scale.sharding == repl  # smaller children replicated on the same mesh
    np.testing.assert_array_equal(back["big"], big)

    seen = []

    def place(path, shape, dtype):
        seen.append((path, shape, np.dtype(dtype).name))
        return jax.sharding.SingleDeviceSharding(devices[1])

    back = ckpt.load(d, shardings=place)
    assert ("q/values", (256, 128), "int4") in seen and ("big", (256, 128), "float32") in seen
    assert back["big"].devices() == {devices[1]}
    np.testing.assert_array_equal(back["q"].dequantize(), q.dequantize())


def test_checkpoint_manager_items(tmp_path):
    tree = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "q": QArray(jnp.ones((2, 3), jnp.int4), jnp.ones((1, 3)), bits=4, dtype=jnp.bfloat16),
    }
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as m:
        for step in range(3):
            params = {"w": tree["w"] + step, "q": tree["q"]}
            meta = ocp.args.JsonSave({"step": step})
            m.save(step, args=ocp.args.Composite(params=ckpt.JCompressSave(params), meta=meta))
        m.wait_until_finished()
        assert m.all_steps() == [1, 2]
        out = m.restore(
            2, args=ocp.args.Composite(params=ckpt.JCompressRestore(), meta=ocp.args.JsonRestore())
        )
    assert out["meta"] == {"step": 2}
    np.testing.assert_array_equal(out["params"]["w"], tree["w"] + 2)
    assert_identical(out["params"]["q"], tree["q"])
    # each step's item is an ordinary jcompress checkpoint
    assert_identical(ckpt.load(tmp_path / "2" / "params")["q"], tree["q"])


def test_disk_bytes_counts_files(tmp_path):
    ckpt.save(tmp_path / "c", {"w": np.zeros(10, np.float32)})
    total = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert ckpt.disk_bytes(tmp_path / "c") == total
    with pytest.raises(FileNotFoundError):
        ckpt.disk_bytes(tmp_path / "none")


def test_low_rank_leaves_round_trip(tmp_path):
    from jcompress.structure import LowRank

    rng = np.random.default_rng(0)
    lr = LowRank(
        jnp.asarray(rng.standard_normal((6, 2)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
        dtype=jnp.bfloat16,
        layer_shape=(2, 3, 3),
        contracting=(0, 1),
        output=(2,),
    )
    back = roundtrip(tmp_path, {"attn": {"kernel": lr}})["attn"]["kernel"]
    assert isinstance(back, LowRank)
    assert (back.dtype, back.layer_shape, back.contracting, back.output) == (
        np.dtype(jnp.bfloat16),
        (2, 3, 3),
        (0, 1),
        (2,),
    )
    np.testing.assert_array_equal(back.dequantize(), lr.dequantize())


def _arrays():
    return st.builds(
        lambda shape, dtype, zeros, seed, kind: (
            jnp.asarray(_random(np.random.default_rng(seed), shape, dtype, zeros))
            if kind
            else _random(np.random.default_rng(seed), shape, dtype, zeros)
        ),
        st.sampled_from([(), (5,), (3, 4), (40, 40)]),
        st.sampled_from(DTYPES),
        st.sampled_from([0.0, 0.95]),
        st.integers(0, 1000),
        st.booleans(),
    )


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)
_trees = st.recursive(
    st.one_of(_scalars, _arrays()),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(
            st.text(min_size=1, max_size=4).filter(lambda k: "/" not in k), children, max_size=3
        ),
        st.dictionaries(st.integers(0, 9), children, max_size=2),
    ),
    max_leaves=8,
)


@given(tree=_trees)
def test_any_supported_tree_round_trips(tmp_path_factory, tree):
    d = tmp_path_factory.mktemp("prop") / "c"
    ckpt.save(d, tree)
    back = ckpt.load(d)
    assert_identical(back, tree)
    assert repr(jax.tree_util.tree_structure(back)) == repr(jax.tree_util.tree_structure(tree))
