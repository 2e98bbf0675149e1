"""Which matmul formulation a ``QArray`` runs with, and the runtime layout prepared for it.

The dispatch half of the CPU/GPU/TPU kernels (the formulations themselves are in
``_kernels.py``): :func:`formulation` picks one per backend, batch size, weight size, granularity
and CPU feature (:func:`int8_dot_cpu`); :func:`preferred_layout` / :func:`runtime_layout` make the
one-time layout (int8 containers, output-major per-channel and group-major per-group weights)
the fastest formulation reads. ``benchmarks/runtime.py`` measures every rule here.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax

from jcompress import tree as jtree
from jcompress.quantization._qarray import GroupMajor, OutMajor, QArray, widen

__all__ = [
    "FORMULATIONS",
    "MODES",
    "formulation",
    "int8_dot_cpu",
    "preferred_layout",
    "runtime_layout",
]

MODES = ("weight_only", "int8")
FORMULATIONS = ("dequantize", "chunked", "limbs")  # the weight-only ones, forced by formulation=
# Below this many weight elements (the digits MLP) converting the weight costs less than the
# limbs' extra work: the CPU dispatch dequantizes.
_MIN_SIZE = 1 << 16
# CPU feature flags (``/proc/cpuinfo``) of an int8 dot-product instruction: x86 VNNI / AMX,
# Arm dot product
_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
# Groups up to this size are multiplied by dequantized chunks at every batch: with asymmetric
# PerGroup(32) on 4096x4096 chains the integer loop (one small dot per group) measured 0.7x /
# 0.9x / 0.7x float32 at batch 1 / 4 / 16, the chunks 0.85x / 1.4x / 1.65x.
_SMALL_GROUP = 32
# The smallest group a GroupMajor layout is made for: with groups of 64 its per-group loop
# measured 0.9x float32 at batch 4, where the canonical formulations run 1.4x.
_GROUP_MAJOR_MIN = 128


@functools.cache
def int8_dot_cpu() -> bool:
    """Whether this machine's CPU has an int8 dot-product instruction (x86 VNNI or AMX, Arm
    ``dotprod``), read from ``/proc/cpuinfo``; ``False`` where unknown (the safe float path).

    The integer formulations multiply int8 by int8 with int32 accumulation; without such an
    instruction they are not measured, so the CPU dispatch keeps to float formulations.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return bool(set(value.split()) & set(_INT8_DOT_FLAGS))
    except OSError:
        pass
    return False


def formulation(
    mode: str,
    rows: int,
    backend: str | None = None,
    size: int | None = None,
    *,
    grouped: bool = False,
    group: int | None = None,
    int8_dot: bool | None = None,
    group_major: bool = False,
) -> str:
    """The formulation ``mode`` resolves to for ``rows`` activation rows and a weight of ``size``
    elements on ``backend`` (default: the default backend).

    Args:
      mode: ``"weight_only"`` (dispatch) or ``"int8"``; a formulation name returns itself.
      rows: activation rows (the batch of a decode step).
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``; another backend gets ``"dequantize"``.
      size: weight elements (default: large).
      grouped: per-group scales (``PerGroup``) along the contracting axis.
      group: the contracted size of one group (default 128).
      int8_dot: whether the CPU has an int8 dot-product instruction (default:
        :func:`int8_dot_cpu`); without one the CPU keeps to float formulations.
      group_major: the weight is stored :class:`GroupMajor` (made by :func:`runtime_layout`).

    The CPU rules (``benchmarks/runtime.py`` measures them): small weights dequantize; per-channel
    weights use ``"limbs"`` at every batch; per-group weights use ``"limbs"`` (one integer dot
    per group) while ``2 * rows <= group``, and ``"chunked"`` above, where accumulating
    ``rows x out`` partial sums per group costs more than dequantizing a chunk; groups of 32 or
    fewer use ``"chunked"`` at every batch (one integer dot per 32 rows is slower than a
    dequantized chunk even at batch 1). A ``GroupMajor`` weight uses ``"limbs"`` at every batch
    (one batched dot over all groups for up to 4 rows, else one dot per group reading its
    contiguous block). GPU/TPU compilers fuse the dequantization into the dot: ``"dequantize"``.

    >>> formulation("weight_only", 4, "cpu", size=4096 * 4096, int8_dot=True)
    'limbs'
    >>> formulation("weight_only", 256, "cpu", size=4096 * 4096, grouped=True, int8_dot=True)
    'chunked'
    >>> formulation("weight_only", 4, "cpu", size=4096 * 4096, int8_dot=False)
    'chunked'
    >>> formulation("weight_only", 4, "gpu", size=4096 * 4096)
    'dequantize'
    >>> formulation("int8", 4, "cpu")
    'int8'
    """
    if mode in FORMULATIONS or mode == "int8":
        return mode
    if mode != "weight_only":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (backend or jax.default_backend()) != "cpu":
        return "dequantize"
    if size is not None and size < _MIN_SIZE:
        return "dequantize"
    if not (int8_dot_cpu() if int8_dot is None else int8_dot):
        return "chunked"
    group = 128 if group is None else group
    if grouped and not group_major and (group <= _SMALL_GROUP or 2 * rows > group):
        return "chunked"
    return "limbs"


def preferred_layout(qarray: Any, role: jtree.Role | None = None, backend: str | None = None):
    """The layout :func:`runtime_layout` gives ``qarray`` on ``backend`` (matmul weights of at
    least 2^16 elements on a CPU with an int8 dot instruction): :class:`OutMajor` for per-channel
    scales (one integer dot over contiguous rows reads it at memory speed), :class:`GroupMajor`
    for ``PerGroup`` scales of groups of 128 or more along the one contracting axis (one batched
    integer dot over all groups at batch 1-4); else ``None``.

    The axes come from ``role`` (contracting axes directly followed by the output axes, at the
    end) or, without one, from the scales: trailing axes with one scale per element are output
    axes, the size-1 axes before them contracting axes (Flax ``Dense`` / ``DenseGeneral``
    kernels); per group, the blocked axis before the output axes is the contracting one when
    every axis before it has one scale per element (stacked layers). Per-tensor scales, smaller
    groups, gathered tables and weights whose contracting axes already come last (Equinox
    ``(out, in)``) keep ``None``.
    """
    if (backend or jax.default_backend()) != "cpu" or not int8_dot_cpu():
        return None
    if not isinstance(qarray, QArray) or math.prod(qarray.shape) < _MIN_SIZE:
        return None
    shape, scale = qarray.shape, qarray.canonical().scale.shape
    n = len(shape)
    if role is not None:
        if role.kind != "matmul":
            return None
        c, o = sorted(role.contracting), sorted(role.output)
        b = len(o)
        if not c or not o or o != list(range(n - b, n)) or c != list(range(n - b - len(c), n - b)):
            return None
        a = len(c)
    else:
        b = 0
        while b < n - 1 and scale[n - 1 - b] == shape[n - 1 - b]:
            b += 1
        a = 0
        while a + b < n and scale[n - 1 - b - a] == 1:
            a += 1
    if b == 0:
        return None
    k = n - 1 - b  # the contracting axis next to the output axes
    if role is None and a == 0 and 1 < scale[k] < shape[k]:  # per group: a role of one axis
        a = 1 if all(scale[d] == shape[d] for d in range(k)) else 0  # leading axes stacked
    if a == 0:
        return None
    if a == 1 and 1 < scale[k] < shape[k]:  # per group along the one contracting axis
        if shape[k] // scale[k] < _GROUP_MAJOR_MIN:
            return None
        return GroupMajor(groups=scale[k], output=b)
    if any(scale[d] != 1 for d in range(n - b - a, n - b)):
        return None  # per-group (or per-element) scales on one of several contracting axes
    return OutMajor(contracting=a, output=b)


def runtime_layout(tree: Any, *, roles: dict[str, jtree.Role] | None = None, backend=None) -> Any:
    """``tree`` with every ``QArray`` in the layout ``jc.compressed`` computes with fastest.

    A one-time transform after loading (or quantizing), as :func:`widen` is, never inside the
    jitted function. On CPU: sub-byte values widened to ``int8`` containers (XLA:CPU keeps
    int4/int2 buffers at one byte per value anyway, and would convert them on every call),
    per-channel matmul weights output-major (:func:`preferred_layout`), read by one integer dot,
    and per-group ones (groups >= 128) group-major, read by one batched integer dot at batch 1-4;
    a ``QArray`` inside a wrapper leaf (``AWQArray``) is widened only. On GPU/TPU the tree is
    returned unchanged (their compilers fuse the dequantization). Results stay
    ``fn(dequantize(tree))`` to float rounding; ``jc.checkpoint.save`` stores the canonical
    packed form (:meth:`QArray.stored`), so loading gives it back: call this again.

    Args:
      tree: a parameter tree with ``QArray`` leaves (others are returned as they are).
      roles: ``{path: Role}`` (``jc.roles``) naming each weight's axes; default: read from the
        scales (see :func:`preferred_layout`).
      backend: the backend to prepare for (default: the default backend).

    >>> import jax.numpy as jnp
    >>> from jcompress.quantization import QuantSpec, quantize
    >>> q = quantize({"kernel": jnp.ones((512, 256))}, QuantSpec(bits=4))
    >>> fast = runtime_layout(q, backend="cpu")
    >>> fast["kernel"].values.dtype, fast["kernel"].shape
    (dtype('int8'), (512, 256))
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return tree

    def one(path, x):
        if not isinstance(x, QArray):
            return widen(x) if jtree.is_compressed(x) else x
        role = None if roles is None else roles.get(path)
        return x.widen().with_layout(preferred_layout(x, role, backend))

    return jtree.map_with_paths(one, tree)
