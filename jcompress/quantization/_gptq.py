"""GPTQ: quantization with second-order error feedback (Frantar et al., 2022).

Each input row of a kernel is rounded in turn with the scales of ``jc.quantization.quantize``
(same :class:`QuantSpec`, same ``QArray`` layout, same rounding), and its rounding error is
spread over the rows not yet rounded so that the layer output on the calibration inputs moves
as little as possible. The Hessian machinery (dampening, Cholesky factor of ``H⁻¹``, lazy block
updates) is :mod:`jcompress.calibration`, shared with SparseGPT.

Scales:

* ``PerChannel`` / ``PerTensor``: computed once from the whole kernel before the sweep (as the
  reference implementation does), so with an identity Hessian GPTQ is round-to-nearest exactly.
* ``PerGroup(g)``: a group's scales are computed when the sweep reaches its first row, from the
  group's *current* rows (already corrected by the earlier rows' errors). Groups must start on
  block boundaries, so the block size is rounded to a multiple of ``g`` (at least ``g``). For a
  conv kernel ``(kh, kw, in, out)`` the rows are ``kh·kw·in`` (leaf order), so a group is ``g``
  consecutive input channels at one kernel position, the ``quantize`` layout
  ``(kh, kw, in/g, out)``.
* ``PerGroup(g)`` with ``act_order=True``: rows are processed out of order, so a group's rows
  are not processed together; its scales are then computed up front from the original kernel
  ("static groups"), which keeps the contiguous ``QArray`` group layout that ``dequantize``
  and the runtime expect.

Reference: Frantar, Ashkboos, Hoefler, Alistarh, 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", arXiv:2210.17323, Algorithm 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jcompress import calibration
from jcompress import tree as jtree
from jcompress.quantization._calibrated import resolve_calibrated
from jcompress.quantization._gptq_grid import gptq_format_leaf
from jcompress.quantization._qarray import QArray, dequantize_blocks, storage_dtype
from jcompress.quantization._scales import Scales, compute_scales, scale_blocks, to_int
from jcompress.quantization._spec import (
    Int,
    PerChannel,
    PerGroup,
    QuantSpec,
    SpecOrRules,
    require_int,
)

__all__ = ["gptq", "gptq_layer"]

_DENSE = jtree.Role("matmul", contracting=(0,), output=(1,))


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "percdamp", "act_order"))
def _gptq(w, h, mask, *, spec: QuantSpec, block_size: int, percdamp: float, act_order: bool):
    n, out = w.shape
    gran = spec.granularity
    group = gran.size if isinstance(gran, PerGroup) else None
    dynamic = group is not None and not act_order
    segment = group if dynamic else calibration.block_rows(n, block_size, 1)
    block = calibration.block_rows(n, block_size, segment)
    w0 = jnp.asarray(w).astype(jnp.float32)
    if mask is not None:
        w0 = jnp.where(mask, w0, jnp.float32(0))
    w0 = jnp.where((jnp.diagonal(h) == 0)[:, None], jnp.float32(0), w0)
    prep = calibration.prepare(w0, h, percdamp=percdamp, block=block, act_order=act_order)
    rows = prep.w.shape[0]
    perm = prep.perm
    pad = rows - n
    store = storage_dtype(spec.bits)

    if dynamic:
        ngroups = rows // group
        one_group = dataclasses.replace(spec, granularity=PerChannel())
        seg_blocks = scale_blocks("", (group, out), one_group, _DENSE)
        table = Scales(
            jnp.ones((ngroups, out), jnp.float32),
            None if spec.symmetric else jnp.zeros((ngroups, out), store),
        )
        index = jnp.arange(rows, dtype=jnp.int32) // group
    else:
        blocks = scale_blocks("", (n, out), spec, _DENSE)
        table = compute_scales(w0, spec=spec, blocks=blocks)
        if group is not None:  # static groups: the original group of each processed row
            index = jnp.concatenate([perm // group, jnp.zeros((pad,), jnp.int32)])
        else:
            index = jnp.zeros((rows,), jnp.int32)
    keep = None
    if mask is not None:
        keep = jnp.concatenate([jnp.asarray(mask, bool)[perm], jnp.ones((pad, out), bool)])

    def on_segment(carry, seg_rows, start, diag):
        if not dynamic:
            return carry
        values, table = carry
        fresh = compute_scales(seg_rows, spec=one_group, blocks=seg_blocks)
        g = start // group
        scale = lax.dynamic_update_slice_in_dim(table.scale, fresh.scale, g, 0)
        zp = table.zero_point
        if zp is not None:
            zp = lax.dynamic_update_slice_in_dim(zp, fresh.zero_point, g, 0)
        return values, Scales(scale, zp)

    def on_row(carry, row, r):
        values, table = carry
        g = index[r]
        scale = lax.dynamic_slice_in_dim(table.scale, g, 1, 0)
        zp = (
            None
            if table.zero_point is None
            else lax.dynamic_slice_in_dim(table.zero_point, g, 1, 0)
        )
        q, _ = to_int(row[None, :], Scales(scale, zp), spec)
        if keep is not None:
            q = jnp.where(keep[r][None, :], q, jnp.zeros_like(q) if zp is None else zp)
        target = dequantize_blocks(q, scale, zp, jnp.float32)[0]
        values = lax.dynamic_update_slice_in_dim(values, q, r, 0)
        return (values, table), target

    init = (jnp.zeros((rows, out), store), table)
    (values, table), loss = calibration.sweep(
        prep, init, block=block, segment=segment, on_segment=on_segment, on_row=on_row
    )
    values = values[:n][jnp.argsort(perm)]
    if dynamic:
        table = Scales(
            table.scale[: n // group],
            None if table.zero_point is None else table.zero_point[: n // group],
        )
    err = calibration.output_error(w, dequantize_blocks(values, *table, w.dtype), h)
    # the guard: round to nearest with the spec's own scales, kept if its output error is lower
    rtn = compute_scales(w0, spec=spec, blocks=scale_blocks("", (n, out), spec, _DENSE))
    rtn_values, _ = to_int(w0, rtn, spec)
    if mask is not None:
        zp = rtn.zero_point
        zero = jnp.zeros_like(rtn_values) if zp is None else jnp.repeat(zp, n // len(zp), 0)
        rtn_values = jnp.where(mask, rtn_values, zero)
    rtn_err = calibration.output_error(w, dequantize_blocks(rtn_values, *rtn, w.dtype), h)
    fallback = rtn_err < err
    values = jnp.where(fallback, rtn_values, values)
    table = jax.tree.map(lambda a, b: jnp.where(fallback, a, b), rtn, table)
    err = jnp.minimum(err, rtn_err)
    qa = QArray(values, table.scale, table.zero_point, bits=spec.bits, dtype=w.dtype)
    return qa, calibration.LayerStats(loss, err, prep.ok & jnp.isfinite(err), fallback)


def gptq_layer(
    w: ArrayLike,
    h: ArrayLike,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    mask: ArrayLike | None = None,
    path: str = "W",
) -> tuple[QArray, calibration.LayerStats]:
    """Quantize one kernel with GPTQ (Frantar et al., 2022, Algorithm 1); pure and jittable.

    Args:
      w: kernel ``(in, out)`` (Flax orientation: rows are the contracting axis), float32 or
        bfloat16.
      h: Hessian ``(in, in)``, ``2 XᵀX / n`` of the layer's inputs ``X`` (``(n, in)``), e.g.
        ``jcompress.calibration.hessian(stats.gram, stats.count)``. Inputs that never fire
        (``H[j, j] == 0``) get their weight row set to zero.
      spec: the :class:`QuantSpec` (bits, granularity, calibration of the clipping range,
        symmetric); the result has the layout and rounding of ``quantize`` with this spec.
      block_size: rows per lazy-update block (speed only; with ``PerGroup(g)`` rounded to a
        multiple of ``g``).
      percdamp: dampening ``λ = percdamp · mean(diag H)`` added to ``diag H``.
      act_order: process rows by descending ``diag H`` (largest inputs first); the result is
        un-permuted. With ``PerGroup`` the group scales are then computed up front (module
        docstring).
      mask: optional bool ``(in, out)``, ``False`` where the weight is pruned: those stay
        exactly zero (integer value = zero point) and their removal error is fed back like a
        rounding error, so the kept weights compensate for it.
      path: the leaf's name for error messages.

    Returns:
      ``(qarray, stats)``: a :class:`QArray` of ``w``'s shape and dtype, and
      :class:`jcompress.calibration.LayerStats` (``loss``, ``output_error``, ``ok``,
      ``fallback``). GPTQ's greedy sweep is not guaranteed to beat round-to-nearest (it can
      lose narrowly at 2 bits with small groups), so the round-to-nearest result with the same
      spec is computed too and returned instead when its output error ``tr(ΔWᵀ H ΔW)`` is
      lower (``stats.fallback``): the result is never worse than ``quantize`` on the
      calibration objective.

    Raises:
      ValueError: shapes that do not fit (naming both), bad options, a ``PerGroup`` size not
        dividing ``in``, NaN/Inf in a concrete ``w``, or (eagerly) a Hessian that is not
        positive definite after dampening. Inside ``jit``, read ``stats.ok`` instead.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> w = jnp.array([[0.9, -0.2], [0.4, 0.75], [-0.6, 0.1], [0.3, -0.35]])
    >>> qa, stats = gptq_layer(w, jnp.eye(4), QuantSpec(bits=4))
    >>> qa.values.astype(jnp.int32).tolist()   # identity Hessian: round to nearest
    [[7, -2], [3, 7], [-5, 1], [2, -3]]
    >>> bool(stats.ok)
    True
    """
    what = "GPTQ"
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{path}: {what} needs a QuantSpec, got {type(spec).__name__}")
    require_int(spec, what, path)
    w, h = calibration.check_layer(path, w, h, block_size=block_size, percdamp=percdamp, what=what)
    scale_blocks(path, tuple(w.shape), spec, _DENSE)  # PerGroup divisibility, with the path
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != bool or mask.shape != w.shape:
            raise ValueError(
                f"{path}: mask= must be a bool array of the kernel's shape {w.shape}, got "
                f"{mask.dtype}{mask.shape}"
            )
    qa, stats = _gptq(
        w,
        h,
        mask,
        spec=spec,
        block_size=block_size,
        percdamp=float(percdamp),
        act_order=bool(act_order),
    )
    calibration.raise_if_failed(path, stats, what, percdamp)
    return qa, stats


@functools.partial(jax.jit, static_argnames=("lay", "spec", "block_size", "percdamp", "act_order"))
def _gptq_stack(leaf, stats, mask, *, lay, spec, block_size, percdamp, act_order):
    """GPTQ on every stacked slice of one leaf (one program per shape, layout and spec)."""
    extra = () if mask is None else (lay.to_matrices(jnp.broadcast_to(mask, lay.shape)),)

    def one(w, h, m=None):
        qa, st = _gptq(
            w, h, m, spec=spec, block_size=block_size, percdamp=percdamp, act_order=act_order
        )
        return qa.values.astype(jnp.int8), qa.scale, qa.zero_point, st

    values, scale, zero_point, st = calibration.per_slice(one, lay, leaf, stats, *extra)
    group = spec.granularity.size if isinstance(spec.granularity, PerGroup) else None
    store = storage_dtype(spec.bits)
    if zero_point is not None:
        zero_point = lay.from_matrices(zero_point.astype(jnp.int8), group).astype(store)
    values = lay.from_matrices(values).astype(store)
    scale = lay.from_matrices(scale, group)
    return QArray(values, scale, zero_point, bits=spec.bits, dtype=leaf.dtype), st


def _gptq_leaf(path, leaf, stats, spec, role, mask, options):
    """GPTQ on every stacked slice of one leaf, reassembled into the leaf ``quantize`` makes
    (a ``QArray``; NF4 / codebooks / FP8: :func:`gptq_format_leaf`)."""
    if not isinstance(spec.format, Int):
        return gptq_format_leaf(path, leaf, stats, spec, role, mask, options)
    lay = calibration.LeafMatrices.of(path, leaf.shape, role)
    lay.check_gram(stats)
    shared = dataclasses.replace(lay, path="")  # the compiled program is shared across paths
    qa, st = _gptq_stack(leaf, stats, mask, lay=shared, spec=spec, **options)
    calibration.raise_if_any_failed(path, st, "GPTQ", options["percdamp"])
    return qa


def gptq(
    fn: Callable[..., Any],
    params: jtree.Params,
    batches: Iterable[Any],
    spec_or_rules: SpecOrRules,
    *,
    where: jtree.Where = None,
    masks: Any = None,
    roles: Mapping[str, jtree.Role] | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    sequential: bool = False,
    layers_per_pass: int | None = 1,
    quiet: bool = False,
) -> jtree.Params:
    """Calibrated post-training quantization with GPTQ (Frantar et al., 2022) over a model.

    The inputs of every selected matmul/conv leaf are captured on ``batches`` (``jc.capture``
    with Gram matrices), each leaf (each stacked slice on its own) is quantized by
    :func:`gptq_layer` with its spec, and comes back as a :class:`QArray` with exactly the
    layout ``quantize`` gives for the same spec and role. Specs of the other formats (``NF4``,
    ``Codebook(init="linear" | "density")``, ``E4M3``, ``E5M2``) give the ``LookupArray`` /
    ``Float8Array`` that ``quantize`` gives, with the same tables and scales, each row rounded
    to the nearest stored value (nearest table entry, or 8-bit float) under the same error
    feedback.

    Args:
      fn: ``fn(params, *args)`` (linen: ``lambda p, x: model.apply({"params": p}, x)``).
      params: the parameter tree.
      batches: a re-iterable (a list) of argument tuples (a bare array is one argument).
      spec_or_rules: a :class:`QuantSpec` or ordered ``[(regex, QuantSpec | None), ...]`` rules.
      where: selection (default: matmul/conv leaves; gathered embeddings have no inputs).
      masks: pruning masks with the params' paths: pruned weights stay exactly zero and the
        kept ones compensate for them (apply :func:`jcompress.pruning.apply_masks` first or not:
        the result is the same).
      roles: ``{path: Role}``; default: read from ``fn``'s jaxpr on the first batch
        (:func:`jcompress.roles`), right for any layout (Flax ``(in, out)``, ``(out, in)``,
        Equinox, attention kernels, ``nn.scan`` stacks).
      block_size, percdamp, act_order: as in :func:`gptq_layer`.
      sequential: calibrate each layer on the outputs of the already-quantized earlier layers
        (one walk over ``batches`` per layer); default: on the original ``params``.
      layers_per_pass: Gram matrices (``C²`` floats per stacked slice) held at once: each walk
        over ``batches`` captures them for this many leaves (``jc.capture(..., paths=)``), in
        the order ``fn`` consumes them, so memory is bounded by one layer's Hessian by default;
        ``None`` captures every leaf in one walk (fewest forward passes, most memory).
        Without ``sequential`` the result does not depend on it; with it, the leaves of one
        pass are calibrated together on the outputs of the earlier passes.
      quiet: no ``rich`` progress bar.

    Returns:
      The tree with compressed leaves (``QArray``; ``LookupArray`` / ``Float8Array`` for the
      other formats) for the selected leaves, others unchanged.

    Raises:
      ValueError: as :func:`quantize` (rules, selection, ``PerGroup`` divisibility, NaN/Inf),
        a selected leaf that ``fn`` never multiplies (no statistics; all such paths named), a
        Hessian not positive definite after dampening.

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    >>> xs = [(jax.random.normal(jax.random.key(i), (16, 8)),) for i in range(2)]
    >>> q = gptq(lambda p, x: x @ p["Dense_0"]["kernel"], params, xs, QuantSpec(bits=4),
    ...          quiet=True)
    >>> q["Dense_0"]["kernel"]
    QArray(shape=(8, 4), bits=4, dtype=float32, values=int4[8,4], scale=float32[1,4])
    """
    what = "GPTQ"
    resolved = resolve_calibrated(
        fn, params, batches, spec_or_rules, where=where, roles=roles, what=what, formats=True
    )
    mask_of = {} if masks is None else jtree.match_by_path(params, masks, name="masks")
    calibration.check_options(what, block_size=block_size, percdamp=percdamp, what=what)
    options = {"block_size": block_size, "percdamp": float(percdamp), "act_order": bool(act_order)}

    def compress(path, leaf, stats):
        spec, role = resolved[path]
        mask = mask_of.get(path)
        if mask is not None and isinstance(mask, bool | np.bool_):
            mask = None if mask else jnp.zeros(leaf.shape, bool)
        qa = _gptq_leaf(path, jnp.asarray(leaf), stats, spec, role, mask, options)
        return calibration.Layer(qa, qa.dequantize())

    quantized, _ = calibration.calibrate(
        fn,
        params,
        batches,
        list(resolved),
        compress,
        what=what,
        sequential=sequential,
        layers_per_pass=layers_per_pass,
        quiet=quiet,
    )
    return quantized
