"""A tree <-> a JSON node (structure and leaf metadata) plus a list of arrays.

JSON nodes (schema version 2; version 1 had no nested compressed nodes), ``{"t": ...}``:

* ``dict`` / ``frozendict`` / ``state`` (``nnx.State``): ``"items": [[key, node], ...]`` in the
  container's order; keys are ``str`` or ``int``;
* ``list`` / ``tuple``: ``"items": [node, ...]``;
* ``none``; ``scalar``: ``"v"`` a bool, int, float or str;
* ``array``: ``"a"``, an index into the checkpoint's array entries;
* ``variable``: an ``nnx.Variable`` (``"type"`` one of flax.nnx's variable classes, by name),
  ``"metadata"`` and the ``"value"`` node;
* ``compressed``: ``"kind"`` (a registered name), ``"arrays"`` ``{field: node}`` (each node an
  ``array``, ``none`` or, for a wrapper leaf, another ``compressed`` node; schema version 2) and
  ``"static"`` ``{field: value}``.

Nothing here names code to import or run: types are looked up in fixed tables and the
compressed-leaf registry.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

from jcompress.checkpoint import _registry
from jcompress.tree import Compressed, describe_form, is_equinox_module, path_str
from jcompress.tree._kinds import static_type

_SCALARS = (bool, int, float, str)


class ArrayRef:
    """An array found while walking: its path and value; for a compressed leaf's child, the
    leaf's path and (float) shape too."""

    __slots__ = ("leaf", "leaf_shape", "path", "value")

    def __init__(self, path: str, value: Any, leaf: str | None = None, leaf_shape=None):
        self.path, self.value, self.leaf, self.leaf_shape = path, value, leaf, leaf_shape


def _unsupported(path: str, x: Any, why: str = "") -> TypeError:
    if is_equinox_module(x):
        return TypeError(
            f"{path or '<root>'}: cannot save {describe_form(x)}: an Equinox module is code "
            "(its class and static fields), and a jcompress checkpoint stores data only, so "
            "that loading runs no code. Save its arrays by path, "
            "`arrays = eqx.filter(model, eqx.is_array)`, "
            "`jc.checkpoint.save(directory, dict(jc.tree.leaves_with_paths(arrays)))`, and put "
            "them back into a model of the same structure: `eqx.combine(jc.tree.map_with_paths("
            "lambda path, x, saved: saved, arrays, jc.checkpoint.load(directory)), model)`"
        )
    return TypeError(
        f"{path or '<root>'}: cannot save a {type(x).__module__}.{type(x).__qualname__}"
        f"{why}; a jcompress checkpoint holds dict, list, tuple, None, bool/int/float/str, "
        "arrays, nnx.State/nnx.Variable, FrozenDict and registered compressed leaves "
        "(jcompress.checkpoint.register_compressed); convert it to one of these"
    )


def _nnx():
    return sys.modules.get("flax.nnx")


def _frozendict_type():
    mod = sys.modules.get("flax.core.frozen_dict")
    return getattr(mod, "FrozenDict", None)


def _variable_types() -> dict[str, type]:
    from flax import nnx

    out = {}
    for name in dir(nnx):
        obj = getattr(nnx, name)
        if isinstance(obj, type) and issubclass(obj, nnx.Variable):
            out.setdefault(obj.__name__, obj)
    return out


def encode_static(path: str, field: str, value: Any) -> Any:
    """JSON form of a static field: JSON scalars, dtypes and tuples/lists of them; a registered
    ``NamedTuple`` (``register_static``: a runtime layout such as ``OutMajor``, which exported
    programs carry and checkpoints reset) keeps its type name."""
    if value is None or isinstance(value, _SCALARS):
        return value
    name = type(value).__name__
    if isinstance(value, tuple) and static_type(name) is type(value):
        return {"namedtuple": name, "items": [encode_static(path, field, v) for v in value]}
    if isinstance(value, tuple | list):
        items = [encode_static(path, field, v) for v in value]
        return {"tuple": items} if isinstance(value, tuple) else {"list": items}
    try:
        is_dtype = isinstance(value, np.dtype) or (
            isinstance(value, type) and issubclass(value, np.generic)
        )
    except TypeError:
        is_dtype = False
    if is_dtype or type(value).__module__.startswith(("jax", "ml_dtypes")):
        try:
            return {"dtype": np.dtype(value).name}
        except TypeError:
            pass
    raise TypeError(
        f"{path}: the static field {field!r} holds a {type(value).__name__} ({value!r}), which "
        "a checkpoint cannot store; static fields must be JSON scalars, dtypes or tuples of them"
    )


def decode_static(value: Any) -> Any:
    if isinstance(value, dict):
        if "dtype" in value:
            import jax.numpy as jnp

            return jnp.dtype(value["dtype"])
        if "tuple" in value:
            return tuple(decode_static(v) for v in value["tuple"])
        if "list" in value:
            return [decode_static(v) for v in value["list"]]
        if "namedtuple" in value and static_type(value["namedtuple"]) is not None:
            items = (decode_static(v) for v in value["items"])
            return static_type(value["namedtuple"])(*items)
        raise ValueError(f"unknown static value {value!r}")
    return value


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | np.generic | jax.Array)


def to_node(tree: Any) -> tuple[Any, list[ArrayRef]]:
    """Walk ``tree``; raise ``TypeError`` naming the path of anything unsupported."""
    refs: list[ArrayRef] = []
    nnx = _nnx()
    frozen = _frozendict_type()
    variable_types = _variable_types() if nnx is not None else {}

    def array(path: str, x: Any, leaf: tuple[str, Any] | None = None) -> dict:
        """``x`` at ``path``; ``leaf``: the ``(path, shape)`` of the compressed leaf it is in."""
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"{path}: cannot save a traced value (inside jit/grad/vmap); save concrete "
                "arrays outside the transformation"
            )
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) and (
            np.dtype(x.dtype).kind in "OUSMm" or np.dtype(x.dtype).fields is not None
        ):
            raise TypeError(
                f"{path}: cannot save an array of dtype {x.dtype}; checkpoints hold numeric, "
                "bool and PRNG-key arrays (store strings as Python str leaves)"
            )
        if leaf is None:
            refs.append(ArrayRef(path, x))
        else:
            refs.append(ArrayRef(path, x, leaf[0], [int(d) for d in leaf[1].shape]))
        return {"t": "array", "a": len(refs) - 1}

    def compressed(path: str, x: Compressed, leaf: tuple[str, Any]) -> dict:
        """A compressed leaf (or a wrapper's compressed child) in its stored form."""
        kind = _registry.kind_of(x)
        if kind is None:
            raise _unsupported(
                path,
                x,
                " (a compressed leaf whose class is not registered: declare its fields with "
                "jcompress.tree.field() and kind=, or call "
                "jcompress.checkpoint.register_compressed)",
            )
        arrays = {}
        for a in kind.arrays:
            v = getattr(x, a)
            if v is None:
                arrays[a] = None
            elif isinstance(v, Compressed):
                arrays[a] = compressed(f"{path}/{a}", v, leaf)
            elif _is_array(v):
                arrays[a] = array(f"{path}/{a}", v, leaf)
            else:
                raise _unsupported(f"{path}/{a}", v)
        static = {s: encode_static(path, s, getattr(x, s)) for s in kind.static}
        return {"t": "compressed", "kind": kind.name, "arrays": arrays, "static": static}

    def items(keys: list, mapping: Any, kind: str) -> dict:
        out = []
        for k, v in mapping.items():
            if not (isinstance(k, str | int) and not isinstance(k, bool)):
                raise TypeError(
                    f"{path_str(keys) or '<root>'}: cannot save the {kind} key {k!r} of type "
                    f"{type(k).__name__}; keys must be str or int"
                )
            out.append([k, walk([*keys, jax.tree_util.DictKey(k)], v)])
        return {"t": kind, "items": out}

    def walk(keys: list, x: Any) -> Any:
        if isinstance(x, Compressed):
            path = path_str(keys)
            # runtime layouts (QArray.widen) are saved in their packed form
            return compressed(path, x.stored(), (path, x))
        if nnx is not None and isinstance(x, nnx.Variable):
            name = type(x).__name__
            if variable_types.get(name) is not type(x):
                raise _unsupported(
                    path_str(keys), x, " (only flax.nnx's own Variable classes are stored by name)"
                )
            meta = x.get_metadata()
            metadata = {k: encode_static(path_str(keys), k, v) for k, v in meta.items()}
            value = walk([*keys, jax.tree_util.GetAttrKey("value")], x.get_raw_value())
            return {"t": "variable", "type": name, "metadata": metadata, "value": value}
        if nnx is not None and type(x) is nnx.State:
            return items(keys, x.raw_mapping, "state")  # nested levels are plain dicts
        if frozen is not None and type(x) is frozen:
            return items(keys, x, "frozendict")
        if type(x) is dict:
            return items(keys, x, "dict")
        if type(x) in (list, tuple):
            return {
                "t": type(x).__name__,
                "items": [walk([*keys, jax.tree_util.SequenceKey(i)], v) for i, v in enumerate(x)],
            }
        if x is None:
            return {"t": "none"}
        if type(x) in _SCALARS:
            return {"t": "scalar", "v": x}
        if _is_array(x):
            return array(path_str(keys), x)
        raise _unsupported(path_str(keys), x)

    return walk([], tree), refs


def from_node(node: Any, arrays: list[Any]) -> Any:
    """Rebuild a tree from its node and the loaded arrays; ``ValueError`` on a bad node."""

    def items(n: dict) -> list:
        return [(k, walk(v)) for k, v in n["items"]]

    def walk(n: Any) -> Any:
        t = n["t"]
        if t == "dict":
            return dict(items(n))
        if t == "list":
            return [walk(v) for v in n["items"]]
        if t == "tuple":
            return tuple(walk(v) for v in n["items"])
        if t == "none":
            return None
        if t == "scalar":
            return n["v"]
        if t == "array":
            return arrays[n["a"]]
        if t == "frozendict":
            from flax.core import FrozenDict

            return FrozenDict(items(n))
        if t == "state":
            from flax import nnx

            return nnx.State(dict(items(n)), _copy=False)
        if t == "variable":
            cls = _variable_types().get(n["type"])
            if cls is None:
                raise ValueError(f"unknown nnx Variable type {n['type']!r}")
            meta = {k: decode_static(v) for k, v in n["metadata"].items()}
            return cls(walk(n["value"]), **meta)
        if t == "compressed":
            kind = _registry.kind_named(n["kind"])
            if kind is None:
                raise ValueError(
                    f"the checkpoint holds compressed leaves of kind {n['kind']!r}, which is not "
                    f"registered here (registered: {_registry.registered()}); import the module "
                    "that registers it"
                )
            kwargs: dict[str, Any] = {
                a: None if v is None else walk(v) for a, v in n["arrays"].items()
            }
            kwargs.update({s: decode_static(v) for s, v in n["static"].items()})
            return kind.build(**kwargs)
        raise ValueError(f"unknown node type {t!r}")

    return walk(node)
