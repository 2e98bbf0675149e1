"""``compressed``: run a function on parameter trees holding compressed leaves."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jcompress.runtime import _interpret as ip
from jcompress.tree import is_compressed

__all__ = ["compressed", "filter_jit", "marker"]

# View primitives a compressed leaf may pass through on its way into a dot: pure relabelings.
_PERMUTING = {"transpose", "convert_element_type", "copy", "copy_p", "sharding_constraint"}


def marker(path: str, intended: str) -> str:
    """The ``named_scope`` tagging a compressed consumer in HLO metadata (read by ``explain``)."""
    return f"jc[{path}|{intended}]"


def _permutation(x: ip.Deferred, ndim: int) -> list[int] | None:
    """``perm`` with ``operand axis i == base axis perm[i]``, or ``None`` if not a relabeling."""
    perm = list(range(ndim))
    for prim, params in x.ops:
        if prim.name not in _PERMUTING:
            return None
        if prim.name == "transpose":
            perm = [perm[i] for i in params["permutation"]]
    return perm


class _Runner(ip.Interpreter):
    def __init__(self, options: dict[str, Any]):
        super().__init__()
        self.options = options  # handed to every leaf's dot_general, unread

    def consume(self, eqn, invals, facts):
        name = eqn.primitive.name
        out_aval = eqn.outvars[0].aval
        if name == ip.DOT:
            i = 1 if isinstance(invals[1], ip.Deferred) else 0
            w = invals[i]
            if (
                isinstance(w, ip.Deferred)
                and is_compressed(w.base)
                and w.base.dot_general is not None
                and not isinstance(invals[1 - i], ip.Deferred)
                and facts[i] is not None
            ):
                out = self._dot(eqn, w, invals[1 - i], i, facts[i].path)
                if out is not None:
                    return [out.astype(out_aval.dtype)]
        elif name == ip.CONV:
            w = invals[1]
            if (
                isinstance(w, ip.Deferred)
                and is_compressed(w.base)
                and w.base.conv is not None
                and _permutation(w, w.base.ndim) == list(range(w.base.ndim))
            ):
                lhs = self.materialize(invals[0])
                params = dict(eqn.params)
                with jax.named_scope(marker(facts[1].path, "conv")):
                    out = w.base.conv(lhs, **params)
                return [out.astype(out_aval.dtype)]
        elif name == ip.GATHER:
            out = self._gather(eqn, invals, facts)
            if out is not None:
                return [out.astype(out_aval.dtype)]
        path = next((f.path for f in facts if f is not None), "?")
        how = "dequantize_conv" if name == ip.CONV else "dequantize"  # explain says why
        with jax.named_scope(marker(path, how)):
            return super().consume(eqn, invals, facts)

    def _dot(self, eqn, w: ip.Deferred, lhs, i: int, path: str):
        base = w.base
        perm = _permutation(w, base.ndim)
        if perm is None:
            return None
        lhs = self.materialize(lhs)
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        wc, wb = (rc, rb) if i == 1 else (lc, lb)
        xc, xb = (lc, lb) if i == 1 else (rc, rb)
        base_c = tuple(perm[d] for d in wc)
        base_b = tuple(perm[d] for d in wb)
        dn = ((tuple(xc), base_c), (tuple(xb), base_b))
        if i == 0:
            dn = ((base_c, tuple(xc)), (base_b, tuple(xb)))
        with jax.named_scope(marker(path, str(self.options.get("mode", "weight_only")))):
            try:
                out = base.dot_general(
                    lhs,
                    dn,
                    weight_is_rhs=(i == 1),
                    preferred_element_type=jnp.float32,
                    **self.options,
                )
            except (ValueError, TypeError) as e:  # name the leaf (unknown options included)
                raise type(e)(f"{path}: {e}") from None
        # the base's free axes come out in base order; the equation wants operand order
        w_free = [d for d in range(base.ndim) if d not in wc and d not in wb]
        free_base = [perm[d] for d in w_free]
        order = sorted(range(len(free_base)), key=lambda k: free_base[k])
        inverse = [order.index(k) for k in range(len(order))]
        if inverse != list(range(len(inverse))):
            nb = len(wb)
            nx = lhs.ndim - len(xc) - len(xb)
            start = nb + nx if i == 1 else nb
            axes = list(range(out.ndim))
            axes[start : start + len(inverse)] = [start + k for k in inverse]
            out = jnp.transpose(out, axes)
        return out

    def _gather(self, eqn, invals, facts):
        w, idx = invals[0], invals[1]
        if not (
            isinstance(w, ip.Deferred)
            and is_compressed(w.base)
            and w.base.take is not None
            and not w.ops
            and not isinstance(idx, ip.Deferred)
        ):
            return None
        dn = eqn.params["dimension_numbers"]
        shape = w.base.shape
        nb = idx.ndim - 1
        if not (
            dn.start_index_map == (0,)
            and dn.collapsed_slice_dims == (0,)
            and not dn.operand_batching_dims
            and tuple(eqn.params["slice_sizes"]) == (1, *shape[1:])
            and tuple(dn.offset_dims) == tuple(range(nb, nb + len(shape) - 1))
            and idx.shape[-1] == 1
        ):
            return None
        with jax.named_scope(marker(facts[0].path, "take")):
            return w.base.take(idx[..., 0], axis=0)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _split_args(args: tuple, kwargs: dict):
    """``(treedef, (static, names), dynamic)``: ``dynamic`` maps names to array / compressed leaves.

    Compressed leaves are named by their path (as :func:`explain` reports them), so the compiled
    HLO parameters carry it (``dynamic['Dense_0/kernel'].values``).
    """
    flat, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_compressed)
    names = ip.leaf_names(args, kwargs)
    static, dynamic = [], {}
    for i, (x, name) in enumerate(zip(flat, names)):
        if ip.is_array_like(x):
            static.append(_DYNAMIC)
            dynamic[name if is_compressed(x) and name not in dynamic else f"~{i:06d}"] = x
        elif not _hashable(x):
            raise TypeError(
                f"a non-array argument leaf of type {type(x).__name__} is not hashable; "
                "non-array arguments are static (part of the compile cache key): pass it "
                "as an array or make it hashable"
            )
        else:
            static.append(x)
    return treedef, (tuple(static), tuple(dynamic)), dynamic


def filter_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``jax.jit`` with array (and compressed) leaves traced and everything else static.

    Like ``eqx.filter_jit``: non-array leaves (flags, ``mutable=`` lists, strings) are part of
    the cache key, so they must be hashable. The result has ``.lower(*args, **kwargs)``.
    """

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(treedef, static_names, dynamic):
        static, names = static_names
        it = iter(dynamic[k] for k in names)
        flat = [next(it) if s is _DYNAMIC else s for s in static]
        args, kwargs = jax.tree_util.tree_unflatten(treedef, flat)
        return fn(*args, **kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run(*_split_args(args, kwargs))

    wrapper.lower = lambda *a, **k: run.lower(*_split_args(a, k))  # type: ignore[attr-defined]
    return wrapper


class _Dynamic:
    def __repr__(self):
        return "<dynamic>"


_DYNAMIC = _Dynamic()


def compressed(
    fn: Callable[..., Any],
    *,
    mode: str = "weight_only",
    **options: Any,
) -> Callable[..., Any]:
    """``fn`` made to run on trees holding compressed leaves (``QArray``, ...), jit-compiled.

    The returned function has ``fn``'s signature. Array leaves of every argument are traced;
    compressed leaves (``jcompress.tree.is_compressed``) are traced as their float shape, and
    ``fn``'s jaxpr is interpreted (as ``jax.experimental.sparse.sparsify`` does) so that:

    * a ``dot_general`` reading a compressed leaf (possibly through transposes or dtype casts)
      calls the leaf's own ``dot_general`` with ``mode`` and ``options`` (for ``QArray``: the
      formulation chosen for the backend, batch size and layout, see
      ``jcompress.quantization._dispatch``);
    * a ``conv_general_dilated`` calls the leaf's ``conv`` if it has one (``QArray`` has none:
      its convolution kernels are dequantized);
    * an embedding ``gather`` calls the leaf's ``take`` (only the rows taken are dequantized);
    * any other use (and any leaf without the method) gets ``leaf.dequantize()``.

    Non-array arguments are static, as ``eqx.filter_jit`` treats them (linen ``apply`` with
    ``mutable=``, ``rngs``, ``train=False`` flags); programs are cached per input shapes and dtypes
    (a second call with the same shapes does not retrace). It composes with ``jax.jit``,
    ``jax.vmap`` and sharded inputs. Use with linen (``lambda p, x: model.apply({"params": p},
    x)``), nnx (``lambda state, x: nnx.merge(graphdef, state)(x)``), Equinox modules and plain
    functions.

    Args:
      fn: any function of pytrees.
      mode: ``"weight_only"`` (default): results equal ``fn(dequantize(tree), ...)`` to float
        rounding. ``"int8"``: W8A8 — activations are quantized per token (per row, dynamic absmax
        scale) to int8 and multiplied in int8 x int8 with int32 accumulation; outputs then depend
        on the activation rounding (relative error ~0.4% per element), so validate accuracy.
        A ``QArray`` whose ``act_scale`` holds a calibrated static activation step ``a`` (size
        1 on every axis except stacked layer axes) is multiplied with static activations
        ``clip(round(x / a), -127, 127)`` instead: no per-token absmax, and inputs beyond
        ``127·a`` saturate. Per-input-channel ``act_scale`` raises ``ValueError`` there. In
        ``"weight_only"`` mode ``act_scale`` is ignored (results stay ``fn(dequantize(tree))``).
        ``"fp8"``: FP8 weights (``QuantSpec(format=E4M3())`` / ``E5M2()``) multiply
        activations rounded per row to the same 8-bit format, ``float8 x float8 -> float32``
        (an fp8 matmul where the backend has one; XLA:CPU converts both to float32, as
        ``explain`` says); integer ``QArray`` s refuse it. Lookup leaves (NF4, codebooks) and
        low-rank factors ignore ``mode``.
      **options: handed unread, with ``mode``, to every compressed leaf's ``dot_general``; each
        leaf type documents and checks its own (an unknown one raises ``ValueError`` or
        ``TypeError`` naming the leaf, at the first call). ``QArray``: ``formulation=``
        (``"dequantize"``, ``"chunked"`` or ``"limbs"``) forces a weight-only formulation
        instead of the dispatch, for benchmarks and tests.

    Returns:
      The compiled function; ``.lower(*args)`` lowers it (for :func:`explain`).

    Raises:
      TypeError: ``mode`` is not a string.

    >>> import jax.numpy as jnp
    >>> f = compressed(lambda p, x: x @ p["w"])
    >>> f({"w": jnp.eye(2)}, jnp.ones((1, 2)))
    Array([[1., 1.]], dtype=float32)
    """
    if not isinstance(mode, str):
        raise TypeError(f"compressed: mode must be a string, got {mode!r}")
    options = {"mode": mode, **options}

    def run(*args, **kwargs):
        traced = ip.trace(fn, args, kwargs, param_args=(), name_all=True)
        values = [ip.Deferred(x) if is_compressed(x) else x for x in traced.leaves]
        facts = traced.facts()
        outs, _ = _Runner(options).run(traced.jaxpr, values, facts)
        outs = [ip.Interpreter.materialize(o) for o in outs]
        return jax.tree_util.tree_unflatten(traced.out_tree, outs)

    functools.update_wrapper(run, fn)
    return filter_jit(run)
