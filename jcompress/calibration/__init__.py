"""Calibration: the shared maths and driver of calibrated compression methods.

A calibrated method compresses a layer using statistics of its inputs on calibration data.
This package holds what those methods share, once:

* :mod:`~jcompress.calibration._second_order`: the Hessian ``2 XᵀX / n``, dampening, the
  Cholesky factor of its inverse and the blocked Optimal-Brain-Surgeon sweep (GPTQ, SparseGPT);
* :class:`LeafMatrices`: any matmul/conv leaf as stacked ``(in, out)`` matrices and back;
* the driver: :func:`select_layers` (which leaves, roles read from ``fn``'s jaxpr, eager
  checks) and :func:`calibrate` (walk the batches, capture one layer's statistics at a time,
  hand them to the method, rebuild the tree).

The methods themselves live where users look for them (``jc.quantization.gptq`` / ``awq``,
``jc.pruning.sparsegpt`` / ``wanda_masks``, ``jc.structure.low_rank``), each a short module on
top of this package; ARCHITECTURE.md shows how to add one.
"""

from jcompress.calibration._driver import (
    Layer,
    accumulate,
    calibrate,
    check_batches,
    check_stats,
    roles_from_fn,
    select_layers,
)
from jcompress.calibration._matrices import LeafMatrices, per_slice
from jcompress.calibration._second_order import (
    LayerStats,
    Prepared,
    block_rows,
    check_layer,
    check_options,
    hessian,
    output_error,
    prepare,
    raise_if_any_failed,
    raise_if_failed,
    sweep,
)

__all__ = [
    "Layer",
    "LayerStats",
    "LeafMatrices",
    "Prepared",
    "accumulate",
    "block_rows",
    "calibrate",
    "check_batches",
    "check_layer",
    "check_options",
    "check_stats",
    "hessian",
    "output_error",
    "per_slice",
    "prepare",
    "raise_if_any_failed",
    "raise_if_failed",
    "roles_from_fn",
    "select_layers",
    "sweep",
]
