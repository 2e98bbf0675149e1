"""Quantization: ``QArray`` leaves, post-training quantization with calibrated clipping, QAT.

* :class:`QuantSpec` with formats :class:`Int` (default), :class:`NF4`, :class:`Codebook`,
  :class:`E4M3`, :class:`E5M2`, granularities
  :class:`PerTensor`, :class:`PerChannel`, :class:`PerGroup` and calibrations
  :class:`AbsMax`, :class:`Percentile`, :class:`MSE`;
  per-path settings are ordered ``[(regex, spec | None), ...]`` rules.
* :func:`quantize` / :func:`dequantize`: float leaves to :class:`QArray` (for ``NF4`` /
  ``Codebook`` specs :class:`LookupArray`, for ``E4M3`` / ``E5M2`` :class:`Float8Array`) and
  back.
* :func:`calibrate`: frozen ``{path: Scales}`` reused by :func:`quantize` and
  :func:`fake_quantize` (quantization-aware training with a straight-through gradient).
* :func:`runtime_layout`: once after loading, the layout ``jc.compressed`` computes with
  fastest on this backend (on CPU: int4 widened to int8 containers, per-channel weights
  output-major, :class:`OutMajor`, per-group weights group-major, :class:`GroupMajor`);
  :func:`widen` does the first part alone.
* :func:`nonfinite`: the flag for NaN/Inf weights met inside ``jit``.
* Calibrated post-training quantization: :func:`gptq` (Frantar et al. 2022) and :func:`awq`
  (Lin et al. 2023, :class:`AWQArray` leaves), from input statistics of ``jc.capture``.
* :func:`calibrate_activations`: static int8 activation steps (abs-max / percentile ranges) for
  ``jc.compressed(fn, mode="int8")`` (W8A8 static).
"""

from jcompress.quantization._dispatch import runtime_layout
from jcompress.quantization._float8 import Float8Array
from jcompress.quantization._lookup import LookupArray
from jcompress.quantization._qarray import GroupMajor, OutMajor, QArray, widen
from jcompress.quantization._qat import fake_quantize
from jcompress.quantization._quantize import calibrate, dequantize, nonfinite, quantize
from jcompress.quantization._scales import Scales
from jcompress.quantization._spec import (
    E4M3,
    E5M2,
    MSE,
    NF4,
    AbsMax,
    Codebook,
    Int,
    Percentile,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
)

# isort: split
# Calibrated post-training quantization.
from jcompress.quantization._awq import AWQArray, awq, awq_layer
from jcompress.quantization._gptq import gptq, gptq_layer
from jcompress.quantization._static import calibrate_activations

__all__ = [
    "E4M3",
    "E5M2",
    "MSE",
    "NF4",
    "AbsMax",
    "Codebook",
    "Int",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "Percentile",
    "Float8Array",
    "LookupArray",
    "GroupMajor",
    "OutMajor",
    "QArray",
    "QuantSpec",
    "Scales",
    "calibrate",
    "dequantize",
    "fake_quantize",
    "nonfinite",
    "quantize",
    "runtime_layout",
    "widen",
    "AWQArray",
    "awq",
    "awq_layer",
    "calibrate_activations",
    "gptq",
    "gptq_layer",
]
