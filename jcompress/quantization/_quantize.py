"""Post-training quantization of parameter trees: ``calibrate``, ``quantize``, ``dequantize``."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.quantization._float8 import Float8Array, float8_leaf
from jcompress.quantization._lookup import LookupArray
from jcompress.quantization._qarray import QArray, storage_dtype
from jcompress.quantization._scales import ScaleBlocks, Scales, compute_scales, scale_blocks, to_int
from jcompress.quantization._spec import (
    E4M3,
    E5M2,
    Codebook,
    Int,
    QuantSpec,
    SpecOrRules,
    require_int,
    resolve_specs,
)
from jcompress.quantization._tables import leaf_key, lookup_leaf

__all__ = ["calibrate", "dequantize", "nonfinite", "quantize"]


class Quantized(NamedTuple):
    """A leaf to quantize: its spec, the blocks that share a scale, and the leaf itself."""

    spec: QuantSpec
    blocks: ScaleBlocks
    leaf: Any


def resolve_quantized(params, spec_or_rules, where, roles, what) -> dict[str, Quantized]:
    """``{path: Quantized}`` for the leaves to quantize, with eager value checks."""
    chosen, specs = resolve_specs(params, spec_or_rules, where=where, roles=roles, what=what)
    resolved = chosen.roles
    chosen.check_finite()
    out = {}
    for path, role in resolved.items():
        leaf, spec = chosen.leaves[path], specs[path]
        out[path] = Quantized(spec, scale_blocks(path, tuple(leaf.shape), spec, role), leaf)
    return out


def _checked_scales(path, given, spec: QuantSpec, blocks: ScaleBlocks) -> Scales:
    require_int(spec, "scales= (frozen calibration)", path)
    if not isinstance(given, Scales):
        raise TypeError(
            f"{path}: scales= entries must be Scales (from jc.quantization.calibrate), got "
            f"{type(given).__name__}"
        )
    if tuple(given.scale.shape) != blocks.scale_shape:
        raise ValueError(
            f"{path}: the given scale has shape {tuple(given.scale.shape)}, but this spec and "
            f"role need {blocks.scale_shape}; calibrate with the same spec_or_rules/roles"
        )
    if (given.zero_point is None) != spec.symmetric or (
        given.zero_point is not None
        and np.dtype(given.zero_point.dtype) != storage_dtype(spec.bits)
    ):
        raise ValueError(
            f"{path}: the given scales do not fit QuantSpec(bits={spec.bits}, "
            f"symmetric={spec.symmetric}); calibrate with the same spec_or_rules"
        )
    return given


def scales_for(quantized: dict[str, Quantized], scales) -> dict[str, Scales] | None:
    """The given ``scales`` for the leaves to quantize, checked by path and shape."""
    if scales is None:
        return None
    if not isinstance(scales, Mapping):
        raise TypeError(
            "scales= must be the {path: Scales} dict returned by jc.quantization.calibrate, got "
            f"{type(scales).__name__}"
        )
    reference = {p: 0 for p in quantized}
    matched = jtree.match_by_path(
        reference, scales, name="scales", is_leaf=lambda x: isinstance(x, Scales)
    )
    return {
        p: _checked_scales(p, s, quantized[p].spec, quantized[p].blocks) for p, s in matched.items()
    }


def _check_key(quantized: dict[str, Quantized], key, what: str) -> None:
    for path, q in quantized.items():
        fmt = q.spec.format
        if key is None and isinstance(fmt, Codebook) and fmt.init == "kmeans++":
            raise ValueError(
                f"{path}: QuantSpec(format={fmt!r}) needs a random key: {what}(..., "
                "key=jax.random.key(0)); or use init='linear' / 'density' (deterministic)"
            )


def map_quantized(leaf_fn, params, spec_or_rules, where, roles, scales, what, key=None):
    """``leaf_fn(w, scales | None, spec=, blocks=, key=)`` on every leaf to quantize (``key``:
    the leaf's own, from ``key`` and its path); other leaves unchanged."""
    quantized = resolve_quantized(params, spec_or_rules, where, roles, what)
    given = scales_for(quantized, scales)
    _check_key(quantized, key, what)

    def leaf(path, x):
        if path not in quantized:
            return x
        q = quantized[path]
        frozen = None if given is None else given[path]
        k = leaf_key(key, path)
        return leaf_fn(jnp.asarray(x), frozen, spec=q.spec, blocks=q.blocks, key=k)

    return jtree.map_with_paths(leaf, params)


@functools.partial(jax.jit, static_argnames=("spec", "blocks"))
def _quantize_leaf(w, scales, *, spec: QuantSpec, blocks) -> QArray:
    if scales is None:
        scales = compute_scales(w, spec=spec, blocks=blocks)
    values, _ = to_int(w, scales, spec)
    return QArray(values, scales.scale, scales.zero_point, bits=spec.bits, dtype=w.dtype)


def format_leaf(w, key, *, spec: QuantSpec, blocks) -> LookupArray | Float8Array:
    """The leaf of a non-integer format: a ``Float8Array`` (``E4M3`` / ``E5M2``) or a
    ``LookupArray`` (``NF4`` / ``Codebook``); never the integer kernels."""
    if isinstance(spec.format, E4M3 | E5M2):
        return float8_leaf(w, spec=spec, blocks=blocks)
    return lookup_leaf(w, key, spec=spec, blocks=blocks)


def _leaf(w, scales, *, spec: QuantSpec, blocks, key) -> QArray | LookupArray | Float8Array:
    if isinstance(spec.format, Int):
        return _quantize_leaf(w, scales, spec=spec, blocks=blocks)
    return format_leaf(w, key, spec=spec, blocks=blocks)


def calibrate(
    params: jtree.Params,
    spec_or_rules: SpecOrRules,
    *,
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
) -> dict[str, Scales]:
    """Frozen calibration: ``{path: Scales(scale, zero_point)}`` for every leaf to quantize.

    Pass the result as ``scales=`` to :func:`quantize` or :func:`fake_quantize` (QAT): no MSE
    search is re-run there. The dict is a pytree of arrays (jit it, pass it to a jitted loss).

    Args:
      params: the parameter tree (linen dict, ``nnx.State``, Equinox arrays, nested containers).
      spec_or_rules: a :class:`QuantSpec`, or ordered ``[(regex, QuantSpec | None), ...]`` rules
        (the first ``re.fullmatch`` on the path wins; ``None`` leaves the leaf in float).
      where: selection (:func:`jcompress.tree.select`); intersected with the rules.
      roles: ``{path: Role}`` (``jc.roles``); defaults to Flax's layouts.

    Returns:
      ``{path: Scales}`` in tree order; ``scale`` has the ``QArray.scale`` shape.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> s = calibrate({"Dense_0": {"kernel": jnp.ones((4, 3))}}, QuantSpec(bits=8))
    >>> s["Dense_0/kernel"].scale.shape
    (1, 3)
    """
    quantized = resolve_quantized(params, spec_or_rules, where, roles, "calibrate")
    for p, q in quantized.items():
        require_int(q.spec, "calibrate", p)
    return {
        p: compute_scales(jnp.asarray(q.leaf), spec=q.spec, blocks=q.blocks)
        for p, q in quantized.items()
    }


def quantize(
    params: jtree.Params,
    spec_or_rules: SpecOrRules,
    *,
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
    scales: Mapping[str, Scales] | None = None,
    key: jax.Array | None = None,
) -> jtree.Params:
    """Replace the selected float leaves by :class:`QArray` s (round to nearest, calibrated clip)
    or, for ``NF4`` / ``Codebook`` specs, :class:`LookupArray` s (table lookups) and for
    ``E4M3`` / ``E5M2`` specs :class:`Float8Array` s (8-bit floats times abs-max scales).

    Only the quantized leaves change; every other leaf, the tree structure and nnx ``Variable``
    wrappers are kept. Works eagerly and inside ``jit`` (sharded inputs give values and scales
    sharded along the same output axes, no gathering).

    Args:
      params: the parameter tree.
      spec_or_rules: a :class:`QuantSpec`, or ordered ``[(regex, QuantSpec | None), ...]`` rules
        (first ``re.fullmatch`` wins, ``None`` keeps float). Every rule must win at least one
        selected leaf.
      where: selection (default: ``kernel``/``embedding`` leaves, or matmul/conv/gather roles);
        intersected with the rules.
      roles: ``{path: Role}``; decides output axes (per-channel scales), the group axis (the last
        contracting axis) and stacked layers (separate scales per layer). **Without it, Flax
        layouts are assumed** (``kernel (..., in, out)``, ``embedding (vocab, features)``):
        ``quantize`` sees no function, so on another layout (GPT-2's ``(out, in)`` kernels,
        Equinox ``weight``, attention ``DenseGeneral``, ``nn.scan`` stacks) it would put
        per-channel scales and groups on the wrong axes without any error. Pass
        ``roles=jc.roles(fn, params, *args)`` there. (``gptq``, ``awq`` and ``sparsegpt`` trace
        ``fn`` and read the roles themselves.)
      scales: frozen calibration from :func:`calibrate` (skips the calibration search;
        ``Int()`` formats only).
      key: a ``jax.random`` key for ``Codebook(init="kmeans++")`` specs (each leaf uses
        ``key`` folded with a hash of its path); unused by the other formats.

    Returns:
      The tree with :class:`QArray` leaves (``Int()`` specs), :class:`LookupArray` leaves
      (``NF4()``: the 16 QLoRA levels times an abs-max scale per block of the granularity;
      ``Codebook()``: k-means tables per tensor or output channel, exact zeros kept) and
      :class:`Float8Array` leaves (``E4M3()`` / ``E5M2()``: ``scale * float8(w / scale)``,
      ``scale = absmax / fmax`` per block, saturating).

    Raises:
      ValueError: a rule or ``where`` selecting nothing; a non-float leaf selected; a
        ``PerGroup`` size not dividing the group axis; NaN/Inf in concrete weights (inside
        ``jit``: such blocks get NaN scales or tables, see :func:`nonfinite`); ``scales`` not
        matching; a ``kmeans++`` codebook without ``key``.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec, PerGroup
    >>> params = {"Dense_0": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)}}
    >>> q = quantize(params, QuantSpec(bits=4, granularity=PerGroup(32)))
    >>> q["Dense_0"]["kernel"]
    QArray(shape=(64, 8), bits=4, dtype=float32, values=int4[64,8], scale=float32[2,8])
    >>> q["Dense_0"]["kernel"].nbytes   # 512 int4 values + 16 float32 scales
    320
    >>> from jcompress.quantization import NF4, Codebook
    >>> quantize(params, QuantSpec(format=NF4(), granularity=PerGroup(64)))["Dense_0"]["kernel"]
    LookupArray(shape=(64, 8), bits=4, dtype=float32, format='NF4', indices=uint4[64,8],
                table=float32[1,1,16], scale=float32[1,8])
    >>> quantize(params, QuantSpec(format=Codebook(), bits=3))["Dense_0"]["kernel"].table.shape
    (1, 8, 8)
    """
    return map_quantized(_leaf, params, spec_or_rules, where, roles, scales, "quantize", key)


def dequantize(tree: jtree.Params) -> jtree.Params:
    """Every compressed leaf to its float array (``.dequantize()``); other leaves untouched.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> q = quantize({"kernel": jnp.eye(2)}, QuantSpec())
    >>> dequantize(q)["kernel"]
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
    """
    return jax.tree.map(
        lambda x: x.dequantize() if jtree.is_compressed(x) else x,
        tree,
        is_leaf=jtree.is_compressed,
    )


def nonfinite(tree: Any) -> jax.Array:
    """Whether any ``QArray``, ``LookupArray``, ``Float8Array`` (or :class:`Scales`) in ``tree``
    came from NaN/Inf weights.

    Eagerly, :func:`quantize` raises on NaN/Inf; inside ``jit`` it cannot, so a block holding them
    gets a NaN scale (a lookup table: a NaN table; it dequantizes to NaN). This reads that flag: a
    scalar bool array, usable under ``jit``.

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> q = jax.jit(lambda p: quantize(p, QuantSpec()))({"kernel": jnp.array([[1.0, jnp.nan]])})
    >>> bool(nonfinite(q))
    True
    """
    kinds = QArray | Scales | LookupArray | Float8Array
    flags = [
        jnp.any(~jnp.isfinite(a))
        for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kinds))
        if isinstance(x, kinds)
        for a in (x.scale, getattr(x, "table", None))
        if a is not None
    ]
    return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)
