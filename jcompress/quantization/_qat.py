"""Quantization-aware training: ``fake_quantize`` with a clipped straight-through gradient."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jcompress import tree as jtree
from jcompress.quantization._quantize import format_leaf, map_quantized
from jcompress.quantization._scales import Scales, compute_scales, fake_quant
from jcompress.quantization._spec import Int, QuantSpec, SpecOrRules

__all__ = ["fake_quantize"]


def _fake_leaf(w, scales, *, spec: QuantSpec, blocks, key):
    if isinstance(spec.format, Int):
        return _fake_int(w, scales, spec=spec, blocks=blocks)
    # Other formats: forward exactly their leaf's dequantize(), gradient the identity.
    out = format_leaf(jax.lax.stop_gradient(w), key, spec=spec, blocks=blocks).dequantize()
    return out + (w - jax.lax.stop_gradient(w))


@functools.partial(jax.jit, static_argnames=("spec", "blocks"))
def _fake_int(w, scales, *, spec: QuantSpec, blocks):
    if scales is None:
        scales = compute_scales(jax.lax.stop_gradient(w), spec=spec, blocks=blocks)
    scales = jax.lax.stop_gradient(scales)
    out, inside = fake_quant(jax.lax.stop_gradient(w), scales, spec)
    # Forward: exactly ``out``. Backward: identity where w was not clipped, zero where it was.
    passthrough = jnp.where(inside, w - jax.lax.stop_gradient(w), jnp.zeros((), w.dtype))
    return out + passthrough


def fake_quantize(
    params: jtree.Params,
    spec_or_rules: SpecOrRules,
    *,
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
    scales: Mapping[str, Scales] | None = None,
    key: jax.Array | None = None,
) -> jtree.Params:
    """Quantize then dequantize the selected leaves, with a straight-through gradient.

    The forward value of each selected leaf equals ``quantize(...)``'s ``QArray.dequantize()``
    (same dtype); the gradient is the identity for elements inside the clipping range and zero
    for clipped ones (Bengio et al., 2013, "Estimating or propagating gradients through stochastic
    neurons"; the clipped variant as in Jacob et al., CVPR 2018). Scales carry no gradient.
    ``NF4`` / ``Codebook`` / ``E4M3`` / ``E5M2`` specs: the forward value is their leaf's
    ``dequantize()`` (tables and scales recomputed every call, with no gradient) and the gradient
    is the identity everywhere (nothing is clipped). Call it
    inside any loss, under ``jit`` and ``grad``; pass ``scales=calibrate(params, ...)`` so no MSE
    search runs per step (QAT is then an ordinary optax loop on float parameters).

    Args:
      params: the float parameter tree (the one being trained).
      spec_or_rules: a :class:`QuantSpec` or ordered ``[(regex, spec | None), ...]`` rules.
      where: selection, intersected with the rules.
      roles: ``{path: Role}``.
      scales: frozen ``{path: Scales}`` from :func:`calibrate`; ``None`` calibrates every call.
      key: for ``Codebook(init="kmeans++")`` specs, as in :func:`quantize`.

    Returns:
      A tree like ``params`` with the selected leaves fake-quantized.

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec, calibrate
    >>> p = {"kernel": jnp.array([[0.5, -1.0], [0.25, 1.0]])}
    >>> s = calibrate(p, QuantSpec(bits=2))  # ternary, scales (1, 2): [[0.5, 1.0]]
    >>> fake_quantize(p, QuantSpec(bits=2), scales=s)["kernel"]
    Array([[ 0.5, -1. ],
           [ 0. ,  1. ]], dtype=float32)
    >>> loss = lambda p: jnp.sum(fake_quantize(p, QuantSpec(bits=2), scales=s)["kernel"])
    >>> jax.grad(loss)({"kernel": jnp.array([[0.5, -2.0], [0.25, 1.0]])})["kernel"]  # -2 clipped
    Array([[1., 0.],
           [1., 1.]], dtype=float32)
    """
    return map_quantized(
        _fake_leaf, params, spec_or_rules, where, roles, scales, "fake_quantize", key
    )
