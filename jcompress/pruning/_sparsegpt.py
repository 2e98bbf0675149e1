"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, 2023).

Rows of a Flax ``(in, out)`` kernel (the input channels; the paper's columns) are visited in
order with the Hessian machinery shared with GPTQ (:mod:`jcompress.calibration`): a pruned weight's
value is removed and its error, divided by ``U[j, j]``, is subtracted from the later rows along
``U[j]`` (``U`` the upper Cholesky factor of the dampened ``H⁻¹``), so the kept weights
reconstruct the layer output. The mask is chosen adaptively from the *current* (already
updated) weights by the OBS saliency ``w² / U[j, j]²``:

* unstructured: at the start of every block of ``block_size`` rows, each output channel prunes
  its lowest-saliency weights in the block. Counts are exact per output channel: block ``b``
  removes ``round(s · end_b) - round(s · start_b)``, so every output channel loses exactly
  ``round(float32(s) · in)`` weights in total (the reference code instead thresholds each
  block over all output channels together, which fixes the count only approximately).
* ``NM(n, m)``: at the start of every group of ``m`` rows, each output channel keeps the ``n``
  of the ``m`` with the largest saliency.

Reference: Frantar, Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", arXiv:2301.00774, Algorithm 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jcompress import calibration
from jcompress import tree as jtree
from jcompress.pruning._plan import (
    check_nm_size,
    check_sparsity,
    plan_selection,
    rule_sparsities,
)
from jcompress.pruning._structures import NM, Channels, Structure, Unstructured
from jcompress.pruning._threshold import exact_count, keep_largest
from jcompress.tree import Params, Role, Where

__all__ = ["SparseGPTLayer", "sparsegpt", "sparsegpt_layer"]


class SparseGPTLayer(NamedTuple):
    """Result of :func:`sparsegpt_layer`: ``(weights, mask, stats)``.

    Attributes:
      weights: the pruned and reconstructed kernel ``(in, out)``, ``w``'s dtype, exactly zero
        where ``mask`` is ``False``.
      mask: bool ``(in, out)``, ``True`` where kept.
      stats: :class:`jcompress.calibration.LayerStats`.
    """

    weights: jax.Array
    mask: jax.Array
    stats: calibration.LayerStats


@functools.partial(jax.jit, static_argnames=("structure", "block_size", "percdamp"))
def _sparsegpt(w, h, sparsity, *, structure, block_size: int, percdamp: float):
    n, out = w.shape
    nm = structure if isinstance(structure, NM) else None
    segment = nm.m if nm is not None else calibration.block_rows(n, block_size, 1)
    block = calibration.block_rows(n, block_size, segment)
    prep = calibration.prepare(w, h, percdamp=percdamp, block=block, act_order=False)
    rows = prep.w.shape[0]
    if nm is None:
        starts = [min(b * block, n) for b in range(rows // block + 1)]
        cumulative = jnp.stack([exact_count(sparsity, s) for s in starts])
    real = jnp.arange(rows) < n

    def on_segment(carry, seg_rows, start, diag):
        keep, result = carry
        saliency = jnp.square(seg_rows) / jnp.square(diag)[:, None]
        if nm is not None:
            chosen = keep_largest(saliency, nm.m - nm.n, axis=0)
        else:
            inside = lax.dynamic_slice_in_dim(real, start, segment, 0)
            saliency = jnp.where(inside[:, None], saliency, jnp.float32(jnp.inf))
            b = start // block
            k = cumulative[b + 1] - cumulative[b]
            chosen = keep_largest(saliency, k, axis=0)
        return lax.dynamic_update_slice_in_dim(keep, chosen, start, 0), result

    def on_row(carry, row, r):
        keep, result = carry
        target = jnp.where(keep[r], row, jnp.float32(0))
        return (keep, lax.dynamic_update_slice_in_dim(result, target[None], r, 0)), target

    init = (jnp.ones((rows, out), bool), jnp.zeros((rows, out), jnp.float32))
    (keep, result), loss = calibration.sweep(
        prep, init, block=block, segment=segment, on_segment=on_segment, on_row=on_row
    )
    weights = result[:n].astype(w.dtype)
    err = calibration.output_error(w, weights, h)
    return SparseGPTLayer(weights, keep[:n], calibration.LayerStats(loss, err, prep.ok))


@functools.partial(jax.jit, static_argnames=("lay", "structure", "block_size", "percdamp"))
def _sparsegpt_stack(leaf, stats, sparsity, *, lay, structure, block_size, percdamp):
    """SparseGPT on every stacked slice of one leaf (one program per shape and layout)."""

    def one(w, h):
        return _sparsegpt(
            w, h, sparsity, structure=structure, block_size=block_size, percdamp=percdamp
        )

    out = calibration.per_slice(one, lay, leaf, stats)
    return lay.from_matrices(out.weights), lay.from_matrices(out.mask), out.stats


def _structure_and_sparsity(path: str, sparsity: Any, n: int) -> tuple[Any, Any]:
    if isinstance(sparsity, NM):
        check_nm_size(path, n, sparsity)
        return sparsity, jnp.float32(sparsity.sparsity)
    if isinstance(sparsity, Unstructured):
        raise TypeError(f"{path}: pass the sparsity as a float (Unstructured is the default)")
    try:
        check_sparsity(sparsity, Unstructured(), what="SparseGPT", required=True)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; for N:M pass NM(n=2, m=4)") from None
    return Unstructured(), jnp.asarray(sparsity, jnp.float32)


def sparsegpt_layer(
    w: ArrayLike,
    h: ArrayLike,
    sparsity: float | NM,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    path: str = "W",
) -> SparseGPTLayer:
    """Prune one kernel with SparseGPT (Frantar & Alistarh, 2023, Algorithm 1); jittable.

    Args:
      w: kernel ``(in, out)`` (Flax orientation: rows are the contracting axis).
      h: Hessian ``(in, in)``, ``2 XᵀX / n`` of the layer inputs
        (``jcompress.calibration.hessian``). Inputs that never fire (``H[j, j] == 0``) get
        their weight row zeroed.
      sparsity: a float in ``[0, 1)`` (may be traced): every output channel loses exactly
        ``round(float32(s) · in)`` weights; or ``NM(n, m)`` (``n`` kept in each ``m``
        consecutive rows, ``in % m == 0``).
      block_size: rows per block: the unit of adaptive mask selection and lazy updates
        (rounded to a multiple of ``m`` for N:M).
      percdamp: dampening ``λ = percdamp · mean(diag H)``.
      path: the leaf's name for error messages.

    Returns:
      :class:`SparseGPTLayer` ``(weights, mask, stats)``.

    Raises:
      ValueError: shapes that do not fit (naming both), a bad sparsity or options, NaN/Inf in a
        concrete ``w``, or (eagerly) a Hessian that is not positive definite after dampening
        (inside ``jit``: ``stats.ok``).

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 0.2], [0.1, -2.0], [0.5, 0.3], [-0.2, 1.0]])
    >>> out = sparsegpt_layer(w, jnp.eye(4), 0.5)
    >>> out.mask.tolist()   # identity Hessian: magnitude pruning per output channel
    [[True, False], [False, True], [True, False], [False, True]]
    """
    what = "SparseGPT"
    w, h = calibration.check_layer(path, w, h, block_size=block_size, percdamp=percdamp, what=what)
    structure, s = _structure_and_sparsity(path, sparsity, w.shape[0])
    result = _sparsegpt(
        w, h, s, structure=structure, block_size=block_size, percdamp=float(percdamp)
    )
    calibration.raise_if_failed(path, result.stats, what, percdamp)
    return result


def sparsegpt(
    fn: Callable[..., Any],
    params: Params,
    batches: Iterable[Any],
    sparsity: jax.typing.ArrayLike | None,
    *,
    structure: Structure | None = None,
    where: Where = None,
    roles: Mapping[str, Role] | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    sequential: bool = False,
    layers_per_pass: int | None = 1,
    quiet: bool = False,
) -> tuple[Params, Any]:
    """Prune a model with SparseGPT (Frantar & Alistarh, 2023): masks and reconstructed weights.

    The inputs of every selected matmul/conv leaf are captured on ``batches`` (``jc.capture``
    with Gram matrices) and each leaf (each stacked slice on its own, contracting axes
    flattened in leaf order) is pruned by :func:`sparsegpt_layer`.

    Args:
      fn: ``fn(params, *args)`` (linen: ``lambda p, x: model.apply({"params": p}, x)``).
      params: the parameter tree.
      batches: a re-iterable (a list) of argument tuples (a bare array is one argument).
      sparsity: fraction removed in ``[0, 1)``: every output channel of ``C`` contracting weights
        loses exactly ``round(float32(s) · C)``; ``None`` (or ``n/m``) with ``NM``. Or per-layer
        rules ``[(regex, sparsity | NM(n, m) | None), ...]`` as in ``magnitude_masks`` (first
        ``re.fullmatch`` wins; ``None`` or no rule: the layer is neither pruned nor updated).
      structure: ``Unstructured()`` (default) or ``NM(n, m)`` along the last contracting axis.
      where: selection (default: matmul/conv leaves).
      roles: ``{path: Role}``; default: read from ``fn``'s jaxpr on the first batch
        (:func:`jcompress.roles`), right for any layout (Flax ``(in, out)``, ``(out, in)``,
        Equinox, attention kernels, ``nn.scan`` stacks).
      block_size, percdamp: as in :func:`sparsegpt_layer`.
      sequential: calibrate each layer on the outputs of the already-pruned earlier layers
        (one walk over ``batches`` per layer); default: on the original ``params``.
      layers_per_pass: Gram matrices held at once, as in :func:`jcompress.quantization.gptq`
        (default: one layer's, with one walk over ``batches`` per layer; ``None``: all, one
        walk).
      quiet: no ``rich`` progress bar.

    Returns:
      ``(params, masks)``: the pruned tree (dtypes and nnx ``Variable`` s kept; pruned weights
      exactly zero, kept weights updated) and masks with the params' paths (plain bool arrays
      for selected leaves, ``True`` elsewhere) for ``jc.pruning.prune(masks=...)`` fine-tuning.

    Raises:
      ValueError: as ``magnitude_masks`` (selection, sparsity, N:M divisibility, NaN/Inf),
        ``Channels`` structure (not supported), a selected leaf without statistics (named),
        a Hessian not positive definite after dampening.

    >>> import jax, jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    >>> xs = [(jax.random.normal(jax.random.key(i), (16, 8)),) for i in range(2)]
    >>> pruned, masks = sparsegpt(lambda p, x: x @ p["Dense_0"]["kernel"], params, xs, 0.5,
    ...                           quiet=True)
    >>> (~masks["Dense_0"]["kernel"]).sum(axis=0).tolist()
    [4, 4, 4, 4]
    """
    what = "SparseGPT"
    if isinstance(structure, Channels):
        raise ValueError(
            f"{what} prunes single weights or N:M groups, not channels; use "
            "jc.pruning.structured_masks for Channels"
        )
    layers = calibration.select_layers(fn, params, batches, where=where, roles=roles, what=what)
    if jtree.is_rules(sparsity):
        rules = rule_sparsities(layers, sparsity, structure=structure, scope="layer", what=what)
        groups = list(rules.items())
        layers = layers.narrow(path for _, paths in groups for path in paths)
    else:
        groups = [(sparsity, layers.paths)]
    layer_sparsity = {}
    for value, paths in groups:
        nm = isinstance(value, NM)
        p, _ = plan_selection(
            params,
            structure=value if nm else structure,
            where=layers.narrow(paths),
            sparsity=None if nm else value,
            what=what,
            require_sparsity=True,
        )
        for path in paths:
            layer_sparsity[path] = p.structure if isinstance(p.structure, NM) else value
    calibration.check_options(what, block_size=block_size, percdamp=percdamp, what=what)
    options = {"block_size": block_size, "percdamp": float(percdamp)}

    def compress(path, leaf, stats):
        leaf = jnp.asarray(leaf)
        lay = calibration.LeafMatrices.of(path, leaf.shape, layers.roles[path])
        lay.check_gram(stats)
        structure, s = _structure_and_sparsity(path, layer_sparsity[path], lay.dims[1])
        shared = dataclasses.replace(lay, path="")  # one compiled program across paths
        weights, mask, st = _sparsegpt_stack(
            leaf, stats, s, lay=shared, structure=structure, **options
        )
        calibration.raise_if_any_failed(path, st, what, percdamp)
        return calibration.Layer(weights, weights, mask)

    pruned, masks = calibration.calibrate(
        fn,
        params,
        batches,
        list(layers.paths),
        compress,
        what=what,
        sequential=sequential,
        layers_per_pass=layers_per_pass,
        quiet=quiet,
    )
    return pruned, layers.unflatten(masks)
