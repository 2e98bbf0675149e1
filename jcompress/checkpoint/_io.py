"""``save`` / ``load`` / ``disk_bytes``: the on-disk format and its atomic writes.

A checkpoint is a directory::

    jcompress.json   the schema: format name, version, the tree's structure (JSON nodes, see
                     _schema.py) and one entry per array (dtype, shape, encoding, CRC-32, sharding)
    arrays/          an orbax PyTree checkpoint (OCDBT, zarr3, zstd) of a flat dict:
                       "blob"  one uint8 array: the payloads of every small array, back to back
                       "pN"    the uint8 payload of a large packed or sparse array
                       "rN"    a large dense array stored as-is (its shards written by orbax)

Arrays are encoded by _encode.py (sub-byte values packed, sparse arrays as bitmask + values when
that is smaller); small payloads are grouped into the blob because orbax spends ~150 bytes of
metadata and a file entry on every array.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import _fs
from jcompress._version import __version__
from jcompress.checkpoint import _encode, _schema

SCHEMA_FILE = "jcompress.json"
ARRAYS_DIR = "arrays"
FORMAT = "jcompress-checkpoint"
VERSION = 2
"""Schema version written. 2: a compressed leaf's child may be a compressed leaf (wrappers such as
``AWQArray``); version 1 files load unchanged (each kind reads its own older layouts)."""
SMALL_BYTES = 64 * 1024
"""Payloads up to this size go into the shared blob."""

Shardings = Mapping[str, jax.sharding.Sharding] | Callable[..., jax.sharding.Sharding] | None


# ----------------------------------------------------------------------------------------------
# Sharding descriptions
# ----------------------------------------------------------------------------------------------


def _describe_sharding(x: Any) -> dict | None:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    spec = [list(s) if isinstance(s, tuple) else s for s in sharding.spec]
    return {"axes": list(mesh.axis_names), "sizes": [int(s) for s in mesh.axis_sizes], "spec": spec}


def _rebuild_sharding(desc: dict | None) -> jax.sharding.Sharding | None:
    """The saved NamedSharding on this process's devices, when their number matches."""
    if not desc:
        return None
    sizes = tuple(desc["sizes"])
    devices = jax.devices()
    if int(np.prod(sizes)) != len(devices):
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(sizes), tuple(desc["axes"]))
    spec = jax.sharding.PartitionSpec(
        *[tuple(s) if isinstance(s, list) else s for s in desc["spec"]]
    )
    return jax.sharding.NamedSharding(mesh, spec)


def _child_sharding(given: jax.sharding.Sharding, shape: tuple, leaf_shape: tuple | None):
    """A leaf's sharding applied to one of its compressed children (``values``: as is)."""
    if leaf_shape is None or tuple(shape) == tuple(leaf_shape):
        return given
    if isinstance(given, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(given.mesh, jax.sharding.PartitionSpec())
    return given


def _lookup_sharding(shardings: Shardings, entry: dict) -> jax.sharding.Sharding | None:
    path, shape, dtype = entry["path"], tuple(entry["shape"]), jnp.dtype(entry["dtype"])
    if shardings is None:
        return None
    if callable(shardings) and not isinstance(shardings, Mapping):
        return shardings(path, shape, dtype)
    if path in shardings:
        return shardings[path]
    leaf = entry.get("leaf")
    if leaf is not None and leaf in shardings:
        return _child_sharding(shardings[leaf], shape, entry.get("leaf_shape"))
    return None


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def _host(x: Any) -> np.ndarray | None:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def encode_arrays(refs: list[_schema.ArrayRef]) -> tuple[list[dict], dict[str, Any], np.ndarray]:
    """Entries for the schema, arrays for orbax, and the blob."""
    entries, stored, blob_parts, offset = [], {}, [], 0
    for i, ref in enumerate(refs):
        x = ref.value
        kind = "jax" if isinstance(x, jax.Array) else "numpy"
        if kind == "numpy" and isinstance(x, np.generic):
            kind = "numpy_scalar"
        entry: dict[str, Any] = {"path": ref.path, "kind": kind}
        if ref.leaf is not None:  # a compressed leaf's child: for shardings={leaf: ...}
            entry.update(leaf=ref.leaf, leaf_shape=ref.leaf_shape)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            entry["impl"] = str(jax.random.key_impl(x))
            x = jax.random.key_data(x)
        entry["dtype"] = np.dtype(x.dtype).name
        entry["shape"] = [int(s) for s in x.shape]
        sharding = _describe_sharding(x)
        if sharding is not None:
            entry["sharding"] = sharding
        host = _host(x)
        bits = _encode.element_bits(np.dtype(x.dtype))
        if host is None:  # not addressable from this process: orbax writes the shards
            entry.update(encoding="raw", store="orbax", key=f"r{i}")
            stored[f"r{i}"] = x
        else:
            dense, sparse, _ = _encode.sizes(host)
            small = min(dense, sparse if sparse is not None else dense) <= SMALL_BYTES
            if bits >= 8 and not small and (sparse is None or sparse >= dense):
                entry.update(encoding="raw", store="orbax", key=f"r{i}", nbytes=dense)
                entry["crc32"] = _encode.crc32(_encode.dense_bytes(host.reshape(-1)))
                stored[f"r{i}"] = x if kind == "jax" else host
            else:
                enc = _encode.encode(host)
                entry.update(encoding=enc.encoding, nbytes=int(enc.payload.size))
                if enc.nnz is not None:
                    entry["nnz"] = enc.nnz
                entry["crc32"] = _encode.crc32(enc.payload)
                if enc.payload.size <= SMALL_BYTES:
                    entry.update(store="blob", offset=offset)
                    blob_parts.append(enc.payload)
                    offset += int(enc.payload.size)
                else:
                    entry.update(store="orbax", key=f"p{i}")
                    stored[f"p{i}"] = enc.payload
        entries.append(entry)
    blob = np.concatenate(blob_parts) if blob_parts else np.zeros(0, np.uint8)
    return entries, stored, blob


def write(directory: Path, tree: Any, walked: tuple | None = None) -> None:
    """Write a checkpoint into ``directory`` (created; not atomic: see :func:`save`)."""
    node, refs = walked if walked is not None else _schema.to_node(tree)
    entries, stored, blob = encode_arrays(refs)
    directory.mkdir(parents=True, exist_ok=True)
    if blob.size:
        stored["blob"] = blob
    if stored:
        ocp = _orbax()
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(directory / ARRAYS_DIR, stored)
    schema = {
        "format": FORMAT,
        "version": VERSION,
        "jcompress_version": __version__,
        "blob_bytes": int(blob.size),
        "tree": node,
        "arrays": entries,
    }
    with open(directory / SCHEMA_FILE, "w") as f:
        json.dump(schema, f, separators=(",", ":"))


def _check_target(directory: Path) -> None:
    if directory.exists() and not (directory / SCHEMA_FILE).is_file():
        if not directory.is_dir() or any(directory.iterdir()):
            raise ValueError(
                f"{directory}: exists and is not a jcompress checkpoint; refusing to overwrite "
                "it (remove it or choose another directory)"
            )


def save(directory: str | os.PathLike, tree: Any) -> None:
    """Save a parameter tree (compressed leaves included) as a self-describing checkpoint.

    The write is atomic: the checkpoint is written into a temporary sibling directory and
    renamed into place, so an interrupted save leaves the previous checkpoint at ``directory``
    loadable (a crash between the two renames of an overwrite leaves it in a sibling
    ``.<name>.old-*`` directory, which :func:`load` names).

    Arrays are stored exactly (dtype, shape, bits): sub-byte values packed, sparse arrays as
    bitmask + non-zero values when smaller, small arrays grouped into one blob, everything
    zstd-compressed by orbax.

    Args:
      directory: where to write (``str``, relative, ``~`` or ``os.PathLike``); an existing
        jcompress checkpoint there is replaced.
      tree: dicts (``str``/``int`` keys), lists, tuples, ``None``, Python scalars, arrays
        (``jax.Array`` with its sharding, NumPy), ``nnx.State``/``nnx.Variable``, ``FrozenDict``
        and registered compressed leaves (``QArray``).

    Raises:
      TypeError: an unsupported object, naming its path.
      ValueError: ``directory`` exists and is not a jcompress checkpoint.

    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> save(d, {"w": np.zeros((3, 4), np.float32), "step": 7})
    >>> load(d)["step"]
    7
    """
    directory = _fs.resolve(directory, what="save: directory")
    walked = _schema.to_node(tree)  # fail on unsupported objects before touching the disk
    _check_target(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = parent / f".{directory.name}.tmp-{tag}"
    try:
        write(tmp, tree, walked)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        old = parent / f".{directory.name}.old-{tag}"
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, directory)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _corrupt(directory: Path, what: str) -> ValueError:
    return ValueError(
        f"{directory}: corrupted or truncated jcompress checkpoint ({what}); restore it from a "
        "copy or save it again"
    )


# tensorstore status codes and orbax messages that mean the stored bytes are damaged or missing
_DAMAGE_MARKS = (
    "DATA_LOSS",
    "OUT_OF_RANGE",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "No structure could be identified",
    "corrupt",
    "truncat",
)


def _read_error(directory: Path, e: BaseException) -> Exception:
    """An honest error for a failed orbax read of ``arrays/``: damage, permission or library."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    what = f"{type(e).__name__}: {first}"
    if isinstance(e, PermissionError) or "PERMISSION_DENIED" in first:
        return PermissionError(
            f"{directory}: permission denied while reading {ARRAYS_DIR}/ ({what}); make the "
            "checkpoint's files readable by this user"
        )
    if isinstance(e, json.JSONDecodeError | UnicodeDecodeError) or any(
        mark in first for mark in _DAMAGE_MARKS
    ):
        return _corrupt(directory, f"cannot read {ARRAYS_DIR}/: {what}")
    if isinstance(e, OSError):
        return OSError(e.errno, f"{directory}: cannot read {ARRAYS_DIR}/ ({what})")
    import orbax.checkpoint as ocp

    return RuntimeError(
        f"{directory}: orbax failed to read {ARRAYS_DIR}/ ({what}). The checkpoint's own "
        "schema checks passed and orbax reported no damage, so this looks like a library or "
        f"environment problem, not a broken file (jax {jax.__version__}, orbax-checkpoint "
        f"{getattr(ocp, '__version__', '?')}); the cause is attached"
    )


def read_schema(directory: str | os.PathLike) -> dict:
    """The checkpoint's JSON schema, checked for format and version."""
    directory = _fs.resolve(directory, what="checkpoint directory")
    if not directory.exists():
        backups = sorted(directory.parent.glob(f".{directory.name}.old-*"))
        hint = (
            f"; an interrupted save left the previous checkpoint at {backups[-1]}: rename it back"
            if backups
            else ""
        )
        raise FileNotFoundError(f"{directory}: no such checkpoint directory{hint}")
    path = directory / SCHEMA_FILE
    if not path.is_file():
        raise ValueError(
            f"{directory}: not a jcompress checkpoint (no {SCHEMA_FILE}); plain orbax "
            "checkpoints load with orbax.checkpoint (the jcompress CLI reads both)"
        )
    try:
        with open(path) as f:
            schema = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(directory, f"{SCHEMA_FILE} is not valid JSON: {e}") from None
    if not isinstance(schema, dict) or schema.get("format") != FORMAT:
        raise _corrupt(directory, f"{SCHEMA_FILE} does not describe a {FORMAT}")
    version = schema.get("version")
    if not isinstance(version, int) or version < 1:
        raise _corrupt(directory, f"bad schema version {version!r}")
    if version > VERSION:
        raise ValueError(
            f"{directory}: written by a newer jcompress ({schema.get('jcompress_version')}, "
            f"schema version {version}); this jcompress reads schema version <= {VERSION}: "
            "upgrade jcompress"
        )
    for key in ("tree", "arrays", "blob_bytes"):
        if key not in schema:
            raise _corrupt(directory, f"{SCHEMA_FILE} lacks {key!r}")
    return schema


def _restore_stored(directory: Path, entries: list[dict], blob_bytes: int, placements) -> dict:
    keys = [e["key"] for e in entries if e["store"] == "orbax"]
    if blob_bytes:
        keys.append("blob")
    if not keys:
        return {}
    ocp = _orbax()
    args = {}
    for e, s in zip(entries, placements):
        if e["store"] != "orbax":
            continue
        if e["encoding"] == "raw" and s is not None:
            args[e["key"]] = ocp.ArrayRestoreArgs(sharding=s)
        else:
            args[e["key"]] = ocp.RestoreArgs(restore_type=np.ndarray)
    if blob_bytes:
        args["blob"] = ocp.RestoreArgs(restore_type=np.ndarray)
    if not (directory / ARRAYS_DIR).is_dir():
        raise _corrupt(directory, f"the {ARRAYS_DIR}/ directory is missing")
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(
                directory / ARRAYS_DIR, args=ocp.args.PyTreeRestore(restore_args=args)
            )
    except Exception as e:  # orbax/tensorstore raise many types: say which kind this is
        raise _read_error(directory, e) from e
    missing = [k for k in keys if k not in restored]
    if missing:
        raise _corrupt(directory, f"arrays {missing[:3]} are missing")
    return restored


def load(directory: str | os.PathLike, *, shardings: Shardings = None) -> Any:
    """Load a checkpoint written by :func:`save`; no target tree is needed.

    Args:
      directory: the checkpoint directory (``str``, relative, ``~`` or ``os.PathLike``).
      shardings: where to place arrays: ``None`` (arrays saved with a ``NamedSharding`` get the
        same mesh axes and partition spec when this process has as many devices as that mesh,
        others go to the default device), a ``{path: Sharding}`` dict (paths as
        :func:`jcompress.tree.leaves_with_paths` names them; a compressed leaf's sharding
        applies to its ``values`` and replicates its smaller children over the same mesh;
        ``"<leaf>/scale"`` names one child), or a callable ``(path, shape, dtype) -> Sharding``
        (called for each stored array, compressed children as ``"<leaf>/<child>"``).

    Returns:
      The tree, with the saved containers, dtypes, array types (``jax.Array`` / NumPy) and
      compressed leaves.

    Raises:
      FileNotFoundError: no such directory.
      PermissionError: a file of the checkpoint cannot be read (its cause kept).
      ValueError: not a jcompress checkpoint, corrupted or truncated (a failed CRC-32, schema
        or size check, or storage damage reported by orbax/tensorstore), written by a newer
        schema version, or holding a compressed kind that is not registered.
      RuntimeError: orbax failed for another reason (a library or environment error, not known
        damage); its cause is kept.

    Loading never imports or runs code named by the file (no pickle).
    """
    directory = _fs.resolve(directory, what="load: directory")
    schema = read_schema(directory)
    entries = schema["arrays"]
    blob_bytes = int(schema["blob_bytes"])
    try:
        placements = []
        for e in entries:
            s = _lookup_sharding(shardings, e)
            if s is None and shardings is None and e["kind"] == "jax":
                s = _rebuild_sharding(e.get("sharding"))
            placements.append(s)
    except (KeyError, TypeError) as e:
        raise _corrupt(directory, f"bad array entry: {e!r}") from None
    restored = _restore_stored(directory, entries, blob_bytes, placements)
    blob = restored.get("blob")
    if blob_bytes and (blob is None or blob.size != blob_bytes):
        raise _corrupt(directory, "the blob has the wrong size")
    arrays = []
    for e, s in zip(entries, placements):
        try:
            arrays.append(_materialize(e, s, restored, blob))
        except (KeyError, TypeError, ValueError) as err:
            raise _corrupt(directory, f"{e.get('path', '?')}: {err}") from None
    try:
        return _schema.from_node(schema["tree"], arrays)
    except (KeyError, TypeError, IndexError) as err:
        raise _corrupt(directory, f"bad tree node: {err!r}") from None


def _materialize(e: dict, sharding, restored: dict, blob) -> Any:
    dtype, shape = jnp.dtype(e["dtype"]), tuple(e["shape"])
    if e["encoding"] == "raw":
        value = restored[e["key"]]
        if tuple(value.shape) != shape or np.dtype(value.dtype) != dtype:
            raise ValueError(
                f"stored {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}"
            )
        if isinstance(value, np.ndarray) and "crc32" in e:
            if _encode.crc32(_encode.dense_bytes(value.reshape(-1))) != e["crc32"]:
                raise ValueError("CRC-32 mismatch")
        host = value
    else:
        if e["store"] == "blob":
            start = int(e["offset"])
            payload = blob[start : start + int(e["nbytes"])]
        else:
            payload = restored[e["key"]]
        if payload.size != int(e["nbytes"]) or _encode.crc32(payload) != e["crc32"]:
            raise ValueError("CRC-32 mismatch")
        host = _encode.decode(e["encoding"], payload, dtype, shape, e.get("nnz"))
    if e["kind"] == "numpy":
        return host if sharding is None else jax.device_put(host, sharding)
    if e["kind"] == "numpy_scalar":
        return host[()]
    if isinstance(host, np.ndarray):
        value = jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
    else:
        value = host
    if "impl" in e:
        value = jax.random.wrap_key_data(value, impl=e["impl"])
    return value


def disk_bytes(directory: str | os.PathLike) -> int:
    """Bytes of every file under ``directory`` (the checkpoint's size on disk).

    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> save(d, {"w": np.zeros(1000, np.float32)})
    >>> disk_bytes(d) < 4000
    True
    """
    directory = _fs.resolve(directory, what="disk_bytes: directory")
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such directory")
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def encoded_nbytes(value: Any) -> int:
    """Payload bytes :func:`save` writes for one array (before orbax's zstd and metadata)."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    host = _host(value)
    if host is None:
        return int(value.size) * _encode.element_bits(np.dtype(value.dtype)) // 8
    dense, sparse, _ = _encode.sizes(host)
    return min(dense, sparse) if sparse is not None else dense
