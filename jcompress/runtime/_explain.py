"""``explain``: which compiled path each compressed matmul took, read from the compiled HLO."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jcompress.tree import is_compressed, leaves_with_paths

__all__ = [
    "INTEGER_DOT",
    "FLOAT_FALLBACK",
    "FP8_DOT",
    "FUSED",
    "GATHER",
    "Explained",
    "explain",
    "kernel_scope",
]

INTEGER_DOT = "integer dot"
FP8_DOT = "fp8 dot"
FUSED = "fused dequantization"
FLOAT_FALLBACK = "float fallback"
GATHER = "gather rows"
UNKNOWN = "unknown"

# A compressed leaf's kernel says what it computes and which path it intends, by code.
_PATH_CODES = {"int": INTEGER_DOT, "fp8": FP8_DOT, "fused": FUSED, "float": FLOAT_FALLBACK}
_MARK = re.compile(r"jc\[(?P<path>[^|\]]*)\|(?P<how>[^\]]*)\]")
_KERNEL = re.compile(r"jc\.kernel=(?P<kernel>[A-Za-z_0-9.\-]+)\|(?P<code>int|fp8|fused|float)")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>[a-z0-9]+)\[(?P<dims>[0-9,]*)\]\S*\s+"
    r"(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<rest>.*)$"
)
_PARAM = re.compile(r"dynamic\[\\?'(?P<path>[^'\\]+)\\?'\]\.values")
_CALLS = re.compile(r"calls=%(?P<callee>[\w.\-]+)")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$")
_COMMENT = re.compile(r"/\*.*?\*/")
_FLOAT = ("f16", "bf16", "f32", "f64")
_SUBBYTE_INT = ("s8", "s4", "s2", "u8", "u4", "u2")
_FP8 = ("f8e4m3fn", "f8e5m2")
FP8_FALLBACK_NOTE = (
    "this backend has no fp8 matmul (XLA:CPU: none): it converted both 8-bit operands to "
    "float32 (the same products, a float matmul)"
)


@contextlib.contextmanager
def kernel_scope(formulation: str, path: str) -> Iterator[None]:
    """The ``named_scope`` a compressed leaf's ``dot_general`` puts around its computation, so
    that :func:`explain` reports it: ``formulation`` (the leaf's own name for what it computes:
    letters, digits, ``_.-``) and the ``path`` it intends: ``"int"`` (an integer dot), ``"fused"``
    (the integer weight read inside the fusion doing the matmul) or ``"float"`` (a float copy of
    the weight). The runtime reads nothing else of the leaf's kernels.

    >>> import jax, jax.numpy as jnp
    >>> def f(x):
    ...     with kernel_scope("mine", "fused"):
    ...         return x * 2
    >>> "jc.kernel=mine|fused" in jax.jit(f).lower(jnp.ones(2)).as_text(debug_info=True)
    True
    """
    if path not in _PATH_CODES or not re.fullmatch(r"[A-Za-z_0-9.\-]+", formulation):
        raise ValueError(
            f"kernel_scope({formulation!r}, {path!r}): path must be one of "
            f"{sorted(_PATH_CODES)} and the formulation a name of letters, digits and _.-"
        )
    with jax.named_scope(f"jc.kernel={formulation}|{path}"):
        yield


@dataclasses.dataclass(frozen=True)
class Explained:
    """How one compressed leaf's consumer was compiled.

    Attributes:
      path: the leaf's path (leaves of arguments after the first: ``args[i]/...``).
      intended: the path jcompress asked for: ``"integer dot"`` (``s8 x s8 -> s32``), ``"fp8
        dot"`` (``float8 x float8`` read by the matmul itself: ``mode="fp8"``), ``"fused
        dequantization"`` (the integer weight read inside the fusion doing the matmul), ``"float
        fallback"`` (a float copy of the whole weight materialised: no fast path), or ``"gather
        rows"``.
      compiled: what the compiled HLO shows, in the same terms (``"unknown"`` if unreadable).
      formulation: the formulation the leaf's kernel named at trace time (:func:`kernel_scope`;
        for ``QArray``: ``limbs``, ``limbs_nk``, ``limbs_groups``, ``int8``, ``chunked``,
        ``dequantize``, ...),
        else the runtime's own (``dequantize``, ``take``, or the ``mode`` it asked for).
      note: why a float path was intended, where there is a known reason (convolutions).
    """

    path: str
    intended: str
    compiled: str
    formulation: str
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.intended == self.compiled


@dataclasses.dataclass
class _Instr:
    name: str
    dtype: str
    size: int
    op: str
    args: list[str]
    tag: tuple[str, str] | None
    kernel: tuple[str, str] | None
    callee: str | None
    param_of: str | None = None


def _parse(hlo: str) -> tuple[dict[str, list[_Instr]], set[str]]:
    comps: dict[str, list[_Instr]] = {}
    fused: set[str] = set()
    current = None
    for line in hlo.splitlines():
        line = _COMMENT.sub("", line)  # long tuple types carry /*index=5*/ markers
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group("name")
            comps[current] = []
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        dims = [int(d) for d in m.group("dims").split(",") if d]
        tag = _MARK.search(m.group("rest"))
        kernel = _KERNEL.search(m.group("rest"))
        callee = _CALLS.search(m.group("rest"))
        param = _PARAM.search(m.group("rest")) if m.group("op") == "parameter" else None
        if callee and m.group("op") == "fusion":
            fused.add(callee.group("callee"))
        comps[current].append(
            _Instr(
                name=m.group("name"),
                dtype=m.group("type"),
                size=math.prod(dims),
                op=m.group("op"),
                args=re.findall(r"%([\w.\-]+)", m.group("args")),
                tag=(tag.group("path"), tag.group("how")) if tag else None,
                kernel=(kernel.group("kernel"), kernel.group("code")) if kernel else None,
                callee=callee.group("callee") if callee else None,
                param_of=param.group("path") if param else None,
            )
        )
    return comps, fused


def _has_int_dot(comps, instr: _Instr) -> bool:
    if instr.op in ("dot", "convolution") and instr.dtype == "s32":
        return True
    body = comps.get(instr.callee or "", [])
    return any(i.op in ("dot", "convolution") and i.dtype == "s32" for i in body)


_PASS = ("bitcast", "copy", "transpose", "reshape", "convert")


def _classify_by_flow(comps, fused, path: str, weight_size: int) -> str:
    """Follow the weight's integer ``values`` parameter to the instructions that consume it."""
    for cname, instrs in comps.items():
        if cname in fused:
            continue
        params = [i.name for i in instrs if i.param_of == path]
        if not params:
            continue
        fp8 = any(i.dtype in _FP8 for i in instrs if i.name in params)
        users: dict[str, list[_Instr]] = {}
        for i in instrs:
            for a in i.args:
                users.setdefault(a, []).append(i)
        frontier, consumers, seen = list(params), [], set(params)
        while frontier:
            for u in users.get(frontier.pop(), []):
                if u.name in seen:
                    continue
                seen.add(u.name)
                if u.op in _PASS and u.dtype in (*_SUBBYTE_INT, *_FP8):  # layout-only copies
                    frontier.append(u.name)
                else:
                    consumers.append(u)
        if fp8 and any(c.op in ("dot", "custom-call") for c in consumers):
            return FP8_DOT  # the 8-bit float values read by the matmul itself
        if any(c.dtype in _FLOAT and c.size == weight_size for c in consumers):
            return FLOAT_FALLBACK
        if any(_has_int_dot(comps, c) for c in consumers):
            return INTEGER_DOT
        if any(c.dtype in _FLOAT for c in consumers):
            return FUSED
    return UNKNOWN


def _relabels_float(instr: _Instr, by_name: dict[str, _Instr]) -> bool:
    """A layout-only op on float operands (not a dequantization)."""
    return instr.op in _PASS and all(
        a in by_name and by_name[a].dtype in _FLOAT for a in instr.args
    )


def _classify(comps, fused, path: str, weight_size: int) -> str:
    by_flow = _classify_by_flow(comps, fused, path, weight_size)
    if by_flow != UNKNOWN:
        return by_flow
    found_int = found_float = found_fused = False
    for cname, instrs in comps.items():
        if cname in fused:
            continue
        by_name = {i.name: i for i in instrs}
        tagged = {i.name for i in instrs if i.tag and i.tag[0] == path}
        # tagged instructions, their direct users and their direct operands (XLA drops the
        # metadata of some fusions, e.g. the integer GEMM's)
        operands = {a for i in instrs if i.name in tagged for a in i.args}
        members = [
            i
            for i in instrs
            if i.name in tagged or i.name in operands or any(a in tagged for a in i.args)
        ]
        for i in members:
            if _has_int_dot(comps, i):
                found_int = True
            elif (
                i.dtype in _FLOAT
                and i.size == weight_size
                and i.op != "parameter"
                and not _relabels_float(i, by_name)  # e.g. the activations, reshaped
            ):
                found_float = True
            elif i.dtype in _FLOAT and any(
                by_name.get(a) is not None
                and by_name[a].dtype in _SUBBYTE_INT
                and by_name[a].size == weight_size
                for a in i.args
            ):
                found_fused = True
    if found_float:
        return FLOAT_FALLBACK
    if found_int:
        return INTEGER_DOT
    if found_fused:
        return FUSED
    return UNKNOWN


# A leaf type may say why it has no ``conv`` in a ``no_conv_reason`` attribute.
CONV_NOTE = "this leaf type has no convolution of its own: its kernel is dequantized"


def _intended(how: str, kernel: tuple[str, str] | None) -> tuple[str, str, str]:
    """(intended path, formulation, note) from the runtime's marker and the kernel's tag."""
    if how == "take":
        return GATHER, "take", ""
    if how == "dequantize_conv":
        return FLOAT_FALLBACK, "dequantize", CONV_NOTE
    if how == "dequantize":  # the runtime found no fast path for this use
        return FLOAT_FALLBACK, "dequantize", ""
    if kernel is not None:  # the leaf's kernel named itself and its path
        return _PATH_CODES[kernel[1]], kernel[0], ""
    return FUSED, how, ""  # a leaf's own dot_general without a kernel_scope


def _compressed_leaves(args: tuple, kwargs: dict) -> dict[str, Any]:
    leaves = {}
    for i, a in enumerate(args):
        for p, x in leaves_with_paths(a):
            if is_compressed(x):
                leaves[p if i == 0 else (f"args[{i}]/{p}" if p else f"args[{i}]")] = x
    for k, a in kwargs.items():
        for p, x in leaves_with_paths(a):
            if is_compressed(x):
                leaves[f"kwargs[{k}]/{p}" if p else f"kwargs[{k}]"] = x
    return leaves


def explain(jitted_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Explained]:
    """Which compiled path each compressed matmul of ``jitted_fn(*args)`` took.

    Compiles ``jitted_fn`` (``jax.jit(jc.compressed(f))`` or ``jc.compressed(f)``) for ``args``
    and reads the compiled HLO text: consumers of compressed leaves are tagged at trace time, and
    the HLO around each tag shows an integer dot (``s8 x s8 -> s32``), a fusion reading the integer
    weight and producing a float result (fused dequantization), or a float copy of the whole
    weight materialised before a float matmul (float fallback). A fallback is never silent:
    it is a record with ``compiled == "float fallback"``.

    Args:
      jitted_fn: a function with ``.lower(*args)``.
      *args: arguments to compile for.
      **kwargs: keyword arguments to compile for.

    Returns:
      One :class:`Explained` per tagged consumer, in HLO order of first appearance.

    >>> import jax.numpy as jnp
    >>> from jcompress.runtime import compressed
    >>> explain(compressed(lambda p, x: x @ p["w"]), {"w": jnp.ones((2, 2))}, jnp.ones((1, 2)))
    []
    """
    hlo = jitted_fn.lower(*args, **kwargs).compile().as_text()
    comps, fused = _parse(hlo)
    leaves = _compressed_leaves(args, kwargs)
    seen: dict[tuple[str, str], tuple[str, str] | None] = {}
    for instrs in comps.values():
        for i in instrs:
            if i.tag is not None:
                key = i.tag
                if key not in seen or seen[key] is None:
                    seen[key] = i.kernel
    out = []
    for (path, how), kernel in seen.items():
        intended, formulation, note = _intended(how, kernel)
        leaf = leaves.get(path)
        if note == CONV_NOTE and getattr(leaf, "no_conv_reason", None):
            note = leaf.no_conv_reason  # the leaf type's own reason
        compiled = UNKNOWN if leaf is None else _classify(comps, fused, path, math.prod(leaf.shape))
        if intended == GATHER and compiled != FLOAT_FALLBACK:
            compiled = GATHER
        if intended == FP8_DOT and compiled == FLOAT_FALLBACK and not note:
            note = FP8_FALLBACK_NOTE
        out.append(Explained(path, intended, compiled, formulation, note))
    return out
