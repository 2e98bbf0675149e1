"""AWQ: activation-aware weight quantization with per-input-channel scales (Lin et al., 2023).

Input channels that carry large activations matter more to a layer's output. AWQ multiplies
each kernel row (input channel ``j``) by ``s_j = m_j^alpha`` before rounding, where ``m_j`` is the
channel's activation magnitude on calibration data, and divides the activations by ``s_j``, so
the float function is unchanged while the salient rows get relatively finer quantization steps::

    X W  =  (X / s) (s W)  ≈  (X / s) Q(s W)

``alpha`` is searched on the grid ``0, 1/grid, ..., 1`` to minimise the layer output error on the
calibration inputs, ``||X (W - Q(s W)/s)||²_F = tr(ΔWᵀ XᵀX ΔW)``, computed from the Gram matrix
``XᵀX`` that ``jc.capture(..., gram=True)`` accumulates (no activations are stored). ``alpha = 0``
(``s = 1``) is plain round to nearest and is on the grid, so AWQ is never worse than RTN on the
calibration objective. ``s`` is normalised by ``sqrt(max(s) · min(s))`` as in the reference
implementation.

Activation magnitude: the reference uses ``mean |x_j|``; the captured statistics hold
``Σ x_j²``, so ``m_j`` here is the root mean square ``sqrt(mean x_j²)`` (same ordering of
channels for the heavy-tailed activations AWQ targets; dead channels are clamped to
``1e-4 · max m``).

Representation: the result is an :class:`AWQArray`, a wrapper leaf around the :class:`QArray`
``inner = Q(s W)`` (exactly as ``quantize`` lays out ``s W``) with ``input_scale = s`` (the
leaf's rank, size 1 on output axes). It folds the scale back in: ``dequantize() = Q(s W) / s ≈
W``, so ``jc.quantization.dequantize(tree)`` is a correct float model; its ``dot_general``
divides the activations by ``s`` and then runs the inner ``QArray``'s formulation on ``Q(s W)``
(weight-only or int8 x int8), which is AWQ's runtime. ``nbytes`` counts the ``in`` float32 input
scales. Checkpoints store it as the kind ``AWQArray`` holding its inner ``QArray``.

Reference: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, 2023, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration", arXiv:2306.00978,
Section 3.2 (scale search).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jcompress import calibration
from jcompress import tree as jtree
from jcompress.quantization._calibrated import resolve_calibrated
from jcompress.quantization._qarray import QArray
from jcompress.quantization._quantize import quantize
from jcompress.quantization._scales import compute_scales, fake_quant, scale_blocks
from jcompress.quantization._spec import QuantSpec, SpecOrRules, require_int

__all__ = ["AWQArray", "AWQLayerStats", "awq", "awq_layer"]

_DENSE = jtree.Role("matmul", contracting=(0,), output=(1,))
_CLAMP = 1e-4


class AWQArray(jtree.Compressed, kind="AWQArray"):
    """AWQ's leaf: a wrapper around a :class:`QArray` of ``Q(s W)`` with the input scale ``s``.

    Children: ``inner``, the quantized ``s W`` (a ``QArray`` whose ``dtype`` is the original
    float dtype), and ``input_scale`` ``s`` (float32, ``inner``'s rank, size 1 on the output axes,
    the full size on the contracting and stacked axes). ``dequantize() == inner / input_scale``
    (float32, cast to ``dtype``); ``dot_general`` divides the activations by ``input_scale``
    along the contracted axes and hands them to ``inner.dot_general`` (weight-only or int8 x
    int8); ``nbytes`` is ``inner``'s plus the input scales'. ``shape``, ``dtype`` and ``bits``
    are ``inner``'s.

    Checkpoints written before the wrapper (an ``AWQArray`` that was a ``QArray`` with
    ``act_scale = s``) load as this wrapper (:meth:`from_stored`).

    >>> import jax.numpy as jnp
    >>> q = QArray(jnp.array([[4], [-6]], jnp.int4), jnp.array([[0.5]]), bits=4,
    ...            dtype=jnp.float32)
    >>> aw = AWQArray(q, jnp.array([[2.0], [0.5]]))
    >>> aw.dequantize()
    Array([[ 1.],
           [-6.]], dtype=float32)
    >>> aw.nbytes  # 2 int4 values (1 byte), one float32 scale, 2 float32 input scales
    13
    """

    inner = jtree.field()
    input_scale = jtree.field()

    def __init__(self, inner: jtree.Compressed, input_scale: ArrayLike):
        if not jtree.is_compressed(inner):
            raise TypeError(
                f"AWQArray wraps a compressed leaf (a QArray of s·W), got {type(inner).__name__}"
            )
        if not hasattr(input_scale, "dtype"):
            input_scale = jnp.asarray(input_scale)
        if not jnp.issubdtype(input_scale.dtype, jnp.floating):
            raise TypeError(f"AWQArray: input_scale must be float, got {input_scale.dtype}")
        shape = tuple(inner.shape)
        if len(input_scale.shape) != len(shape) or any(
            s not in (1, d) for s, d in zip(input_scale.shape, shape)
        ):
            raise ValueError(
                f"AWQArray needs input_scale of the weight's rank {len(shape)} with each axis of "
                f"size 1 or the weight's (size 1 on output axes), got {tuple(input_scale.shape)} "
                f"for a weight of shape {shape}"
            )
        super().__init__(inner=inner, input_scale=input_scale)

    @classmethod
    def from_stored(cls, **fields: Any) -> AWQArray:
        """From a checkpoint: ``inner`` and ``input_scale``, or the layout written before the
        wrapper (``values``, ``scale``, ``zero_point``, ``bits``, ``dtype`` of ``Q(s W)`` and
        ``act_scale = s``)."""
        if "inner" not in fields and "values" in fields:
            s = fields.pop("act_scale")
            return cls(QArray.from_stored(**fields), s)
        return cls(**fields)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape

    @property
    def dtype(self) -> np.dtype:
        return self.inner.dtype

    @property
    def bits(self) -> int:
        """The inner ``QArray``'s bits."""
        return self.inner.bits

    def dequantize(self) -> jax.Array:
        """``Q(s W) / s ≈ W`` in float32, cast to ``dtype``."""
        inner = self.inner
        if isinstance(inner, QArray):  # dequantized in float32, not through the original dtype
            w = inner.replace(dtype=np.dtype(jnp.float32)).dequantize()
        else:
            w = inner.dequantize().astype(jnp.float32)
        return (w / self.input_scale.astype(jnp.float32)).astype(self.dtype)

    def take(self, indices: ArrayLike, axis: int = 0) -> jax.Array:
        """``jnp.take(self.dequantize(), indices, axis)``."""
        return jnp.take(self.dequantize(), jnp.asarray(indices), axis=axis)

    def dot_general(
        self, lhs: jax.Array, dimension_numbers: Any, *, weight_is_rhs: bool = True, **options
    ) -> jax.Array:
        """``(lhs / s) · Q(s W)`` with the inner leaf's formulations (``options`` as there)."""
        (lc, rc), _ = dimension_numbers
        xc, wc = (lc, rc) if weight_is_rhs else (rc, lc)
        a = self.input_scale
        if any(a.shape[d] != 1 for d in range(a.ndim) if d not in wc):
            # per-slice scales on a batched (stacked) axis: no fold into lhs; exact float path
            dims = dimension_numbers
            ops = (lhs, self.dequantize()) if weight_is_rhs else (self.dequantize(), lhs)
            return lax.dot_general(
                *ops, dims, preferred_element_type=options.get("preferred_element_type")
            )
        a = jnp.transpose(a, (*wc, *(d for d in range(a.ndim) if d not in wc)))
        a = a.reshape([a.shape[i] for i in range(len(wc))])
        order = np.argsort(xc)
        a = jnp.transpose(a, tuple(order))
        shape = [1] * lhs.ndim
        for pos, d in enumerate(sorted(xc)):
            shape[d] = a.shape[pos]
        scaled = lhs / a.reshape(shape).astype(lhs.dtype)
        return self.inner.dot_general(
            scaled, dimension_numbers, weight_is_rhs=weight_is_rhs, **options
        )


class AWQLayerStats(NamedTuple):
    """What :func:`awq_layer` reports (float32 scalars).

    Attributes:
      alpha: the chosen exponent ``alpha``.
      output_error: ``tr(ΔWᵀ H ΔW) / 2`` of the result (``H = 2 XᵀX / n``: the mean squared
        layer-output error ``||X ΔW||² / n``).
      rtn_output_error: the same for plain round to nearest (``alpha = 0``).
    """

    alpha: jax.Array
    output_error: jax.Array
    rtn_output_error: jax.Array


def _magnitude(h: jax.Array) -> jax.Array:
    """``sqrt(mean x²)`` per input channel from ``H = 2 XᵀX / n``, dead channels clamped."""
    m = jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0) * jnp.float32(0.5))
    top = jnp.max(m)
    floor = jnp.where(top > 0, top * jnp.float32(_CLAMP), jnp.float32(1))
    return jnp.maximum(m, floor)


def _scales(m: jax.Array, alpha: jax.Array) -> jax.Array:
    s = jnp.power(m, alpha)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("spec", "alphas"))
def _search(w, h, *, spec: QuantSpec, alphas: tuple[float, ...]):
    """``(s (in,), alpha, err, rtn_err)``: the grid point with the least output error."""
    w = w.astype(jnp.float32)
    blocks = scale_blocks("", tuple(w.shape), spec, _DENSE)
    m = _magnitude(h)

    def error(alpha):
        s = _scales(m, alpha)
        ws = w * s[:, None]
        wq = fake_quant(ws, compute_scales(ws, spec=spec, blocks=blocks), spec)[0] / s[:, None]
        return calibration.output_error(w, wq, h)

    grid = jnp.asarray(alphas, jnp.float32)
    errs = lax.map(error, grid)
    errs = jnp.where(jnp.isnan(errs), jnp.float32(jnp.inf), errs)
    best = jnp.argmin(errs)  # first minimum: ties keep the smaller alpha (RTN at alpha = 0)
    return _scales(m, grid[best]), grid[best], errs[best], errs[0]


def _grid(grid: Any, alpha: Any, path: str) -> tuple[float, ...]:
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ValueError(f"{path}: AWQ needs alpha in [0, 1] or None, got {alpha!r}")
        return (0.0, float(alpha))
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(
            f"{path}: AWQ needs grid a positive int (alpha is searched on 0, 1/grid, ..., 1), "
            f"got {grid!r}"
        )
    return tuple(i / grid for i in range(grid + 1))


def _finish(path, leaf, s_leaf, spec, role) -> AWQArray:
    """Quantize ``leaf * s`` exactly as ``quantize`` does and wrap it with ``input_scale = s``."""
    scaled = jnp.asarray(leaf).astype(jnp.float32) * s_leaf
    qa = quantize({"w": scaled}, spec, roles={"w": role})["w"]
    return AWQArray(qa.replace(dtype=np.dtype(jnp.asarray(leaf).dtype)), s_leaf)


def awq_layer(
    w: ArrayLike,
    h: ArrayLike,
    spec: QuantSpec,
    *,
    grid: int = 20,
    alpha: float | None = None,
    path: str = "W",
) -> tuple[AWQArray, AWQLayerStats]:
    """AWQ on one kernel ``(in, out)`` given the Hessian ``H = 2 XᵀX / n`` ``(in, in)``.

    Args:
      w: kernel ``(in, out)`` (Flax orientation), float32 or bfloat16.
      h: ``(in, in)``, e.g. ``jcompress.calibration.hessian(stats.gram, stats.count)``.
      spec: the :class:`QuantSpec` applied to ``s W``.
      grid: ``alpha`` is searched on ``0, 1/grid, ..., 1``.
      alpha: use this ``alpha`` (or ``alpha = 0``, whichever has the lower output error; ``alpha=0``
        is round to nearest exactly) instead of the grid search.
      path: the leaf's name for error messages.

    Returns:
      ``(AWQArray, AWQLayerStats)``.

    Raises:
      ValueError / TypeError: shapes that do not fit, NaN/Inf in ``w``, a bad grid or alpha,
        a ``PerGroup`` size not dividing ``in``.

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> w = jnp.array([[0.9, -0.2], [0.4, 0.75], [-0.6, 0.1], [0.3, -0.35]])
    >>> qa, stats = awq_layer(w, jnp.diag(jnp.array([100.0, 1.0, 1.0, 1.0])), QuantSpec(bits=3))
    >>> float(stats.output_error) <= float(stats.rtn_output_error)
    True
    >>> qa.input_scale.shape
    (4, 1)
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{path}: AWQ needs a QuantSpec, got {type(spec).__name__}")
    require_int(spec, "AWQ", path)
    alphas = _grid(grid, alpha, path)
    w, h = calibration.check_layer(path, w, h, block_size=1, percdamp=0.0, what="AWQ")
    scale_blocks(path, tuple(w.shape), spec, _DENSE)
    s, a, err, rtn = _search(w, h.astype(jnp.float32), spec=spec, alphas=alphas)
    return _finish(path, w, s[:, None], spec, _DENSE), AWQLayerStats(a, err, rtn)


def awq(
    fn: Callable[..., Any],
    params: jtree.Params,
    batches: Iterable[Any],
    spec_or_rules: SpecOrRules,
    *,
    where: jtree.Where = None,
    roles: Mapping[str, jtree.Role] | None = None,
    grid: int = 20,
    quiet: bool = False,
    layers_per_pass: int | None = 1,
) -> jtree.Params:
    """Calibrated post-training quantization with AWQ (Lin et al., 2023) over a model.

    The inputs of every selected matmul/conv leaf are captured on ``batches``
    (``jc.capture(..., gram=True, paths=...)``, ``layers_per_pass`` leaves per walk over
    ``batches``), and each leaf (each stacked slice on its own)
    gets the per-input-channel scale ``s = m^alpha`` with the least layer output error (module
    docstring); the leaf becomes an :class:`AWQArray` holding ``Q(s W)`` and ``s``.
    ``jc.quantization.dequantize(result)`` is the float model ``Q(s W) / s``, and
    ``jc.compressed(fn)`` runs ``(x / s) · Q(s W)``.

    Args:
      fn: ``fn(params, *args)`` (linen: ``lambda p, x: model.apply({"params": p}, x)``).
      params: the parameter tree.
      batches: a re-iterable (a list) of argument tuples (a bare array is one argument).
      spec_or_rules: a :class:`QuantSpec` or ordered ``[(regex, QuantSpec | None), ...]`` rules.
      where: selection (default: matmul/conv leaves).
      roles: ``{path: Role}``; default: read from ``fn``'s jaxpr on the first batch
        (:func:`jcompress.roles`), right for any layout (Flax ``(in, out)``, ``(out, in)``,
        Equinox, attention kernels, ``nn.scan`` stacks).
      grid: ``alpha`` is searched on ``0, 1/grid, ..., 1`` (``grid + 1`` candidates).
      quiet: no ``rich`` progress bar.
      layers_per_pass: Gram matrices held at once, as in :func:`jcompress.quantization.gptq`
        (``None``: one walk for every leaf, all Grams at once; same result).

    Returns:
      The tree with :class:`AWQArray` leaves for the selected leaves, others unchanged.

    Raises:
      ValueError: as :func:`quantize` (rules, selection, ``PerGroup`` divisibility, NaN/Inf), a
        selected leaf that ``fn`` never multiplies (no statistics), a bad ``grid``, no batches.

    >>> import jax, jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec
    >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    >>> xs = [(jax.random.normal(jax.random.key(i), (16, 8)),) for i in range(2)]
    >>> q = awq(lambda p, x: x @ p["Dense_0"]["kernel"], params, xs, QuantSpec(bits=4),
    ...         quiet=True)
    >>> q["Dense_0"]["kernel"].input_scale.shape
    (8, 1)
    """
    what = "AWQ"
    alphas = _grid(grid, None, what)
    resolved = resolve_calibrated(
        fn, params, batches, spec_or_rules, where=where, roles=roles, what=what
    )

    def compress(path, leaf, stats):
        spec, role = resolved[path]
        lay = calibration.LeafMatrices.of(path, leaf.shape, role)
        w3 = lay.to_matrices(leaf)
        h3 = lay.hessians(stats)
        s3 = jnp.stack([_search(w3[i], h3[i], spec=spec, alphas=alphas)[0] for i in range(len(w3))])
        qa = _finish(path, leaf, lay.from_matrices(s3[:, :, None]), spec, role)
        return calibration.Layer(qa, qa.dequantize())

    quantized, _ = calibration.calibrate(
        fn,
        params,
        batches,
        list(resolved),
        compress,
        what=what,
        layers_per_pass=layers_per_pass,
        quiet=quiet,
    )
    return quantized
