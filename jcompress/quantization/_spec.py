"""Quantization configs: granularities, calibrations, ``QuantSpec`` and ordered per-path rules.

All configs are frozen, keyword-only dataclasses checked at construction; they are hashable, so
they can be static arguments of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from jcompress import tree as jtree

__all__ = [
    "E4M3",
    "E5M2",
    "MSE",
    "NF4",
    "AbsMax",
    "Calibration",
    "Codebook",
    "Format",
    "Granularity",
    "Int",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "Percentile",
    "QuantSpec",
    "Rules",
    "SpecOrRules",
    "require_int",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# Granularity: which elements share one scale
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerTensor:
    """One scale per tensor (per slice of the ``stacked`` axes of the leaf's role).

    >>> PerTensor()
    PerTensor()
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerChannel:
    """One scale per output channel: per index of the role's ``output`` (and ``stacked``) axes.

    Dense ``(in, out)``: scale ``(1, out)``; attention ``DenseGeneral`` ``(features, heads,
    head_dim)`` with ``output=(1, 2)``: scale ``(1, heads, head_dim)``; an embedding table
    ``(vocab, features)`` (role ``gather``): one scale per row, ``(vocab, 1)``.

    >>> PerChannel()
    PerChannel()
    """


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """One scale per group of ``size`` consecutive elements along the last contracting axis
    (``Role.group_axis``): every other axis keeps its own scales.

    Dense ``(in, out)`` with ``PerGroup(32)``: scale ``(in // 32, out)``; Conv ``(kh, kw, in,
    out)``: ``(kh, kw, in // 32, out)`` (groups of the flattened ``kh * kw * in`` contraction);
    attention output ``(heads, head_dim, features)``: ``(heads, head_dim // 32, features)``. The
    group axis must be divisible by ``size`` (no padding: a leaf that does not divide is an error
    naming it; give it another spec with a rule).

    Attributes:
      size: elements per group (>= 1).

    >>> PerGroup(32)
    PerGroup(size=32)
    """

    size: int

    def __post_init__(self):
        if not _is_int(self.size) or self.size < 1:
            raise ValueError(
                f"PerGroup.size must be a positive int, got {self.size!r}; "
                "e.g. PerGroup(32) or PerGroup(128)"
            )


Granularity: TypeAlias = PerTensor | PerChannel | PerGroup


# ----------------------------------------------------------------------------------------------
# Calibration: how the clipping range of each block is chosen
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbsMax:
    """Clip at the block's extreme values (round-to-nearest with no clipping).

    >>> AbsMax()
    AbsMax()
    """


@dataclasses.dataclass(frozen=True)
class Percentile:
    """Clip at the ``q``-th percentile of ``|w|`` in each block (asymmetric: of ``w`` at ``q`` and
    ``100 - q``); ``Percentile(100)`` is :class:`AbsMax`.

    Attributes:
      q: percentile in ``(0, 100]``, e.g. ``99.9``.

    >>> Percentile(99.9)
    Percentile(q=99.9)
    """

    q: float

    def __post_init__(self):
        if not _is_real(self.q) or not 0.0 < float(self.q) <= 100.0:
            raise ValueError(f"Percentile.q must be in (0, 100], got {self.q!r}; e.g. 99.9")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSE:
    """Choose each block's clipping ratio by grid search to minimise ``sum((w - deq(q(w)))**2)``.

    The ``grid`` ratios are evenly spaced from ``1.0`` (absmax, always tried first, so the result is
    never worse than :class:`AbsMax` on any block) down to ``min_ratio``. The search runs on every
    channel/group at once (a ``lax.fori_loop`` over the grid, memory of one copy of the weight).
    Reference: clipping-ratio search as in Banner et al., "Post training 4-bit quantization of
    convolutional networks for rapid-deployment" (NeurIPS 2019) and Lin et al., AWQ (2024)
    ``auto_clip``.

    Attributes:
      grid: number of candidate ratios (>= 2).
      min_ratio: smallest ratio tried, in ``(0, 1)``.

    >>> MSE(grid=50)
    MSE(grid=50, min_ratio=0.2)
    """

    grid: int = 100
    min_ratio: float = 0.2

    def __post_init__(self):
        if not _is_int(self.grid) or self.grid < 2:
            raise ValueError(f"MSE.grid must be an int >= 2, got {self.grid!r}; e.g. MSE(grid=100)")
        if not _is_real(self.min_ratio) or not 0.0 < float(self.min_ratio) < 1.0:
            raise ValueError(
                f"MSE.min_ratio must be in (0, 1), got {self.min_ratio!r}; e.g. min_ratio=0.2"
            )


Calibration: TypeAlias = AbsMax | Percentile | MSE


# ----------------------------------------------------------------------------------------------
# Format: how one quantized number is represented
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int:
    """Integers times a scale (and a zero point when asymmetric): the ``QArray`` leaf, ``bits``
    2..8 (default 8). The default format.

    >>> Int()
    Int()
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4:
    """4-bit NormalFloat: each value is one of 16 fixed levels (quantiles of a normal
    distribution, exact 0.0 and ±1.0) times the abs-max of its block (per tensor, output channel
    or group, as the granularity says); stored as a ``LookupArray``. ``bits`` is 4.

    Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (NeurIPS 2023),
    the ``NF4`` data type (the levels of bitsandbytes).

    >>> NF4()
    NF4()
    """


_CODEBOOK_INITS = ("linear", "density", "kmeans++")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Codebook:
    """A learned table of ``2**bits`` values per tensor or per output channel (``bits`` 1..8,
    default 4): Lloyd's k-means on the non-zero weights, stored as a ``LookupArray`` of indices
    into the table. Exact zeros (pruned weights) stay exactly zero and take no centroid: a table
    whose weights hold zeros reserves entry 0 for ``0.0``.

    Reference: Han et al., "Deep Compression" (ICLR 2016), weight sharing by k-means with
    linear, density and random initialisation; k-means++ seeding from Arthur and Vassilvitskii,
    "k-means++: the advantages of careful seeding" (SODA 2007).

    Attributes:
      init: ``"linear"`` (evenly spaced between the smallest and largest non-zero weight),
        ``"density"`` (evenly spaced quantiles of the non-zero weights) or ``"kmeans++"``
        (D² sampling: needs ``key=`` in ``quantize``).
      iters: Lloyd iterations (>= 0; 0 keeps the initial table).

    >>> Codebook(init="density", iters=10)
    Codebook(init='density', iters=10)
    """

    init: str = "linear"
    iters: int = 20

    def __post_init__(self):
        if self.init not in _CODEBOOK_INITS:
            raise ValueError(
                f"Codebook.init must be one of {list(_CODEBOOK_INITS)}, got {self.init!r}; e.g. "
                "Codebook(init='density')"
            )
        if not _is_int(self.iters) or self.iters < 0:
            raise ValueError(
                f"Codebook.iters must be an int >= 0, got {self.iters!r}; e.g. Codebook(iters=20)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class E4M3:
    """8-bit float ``float8_e4m3fn`` (4 exponent, 3 mantissa bits, largest value 448) times an
    abs-max scale per block of the granularity (saturating cast); stored as a ``Float8Array``.
    ``bits`` is 8. Reference: Micikevicius et al., "FP8 Formats for Deep Learning" (2022).

    >>> E4M3()
    E4M3()
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class E5M2:
    """8-bit float ``float8_e5m2`` (5 exponent, 2 mantissa bits, largest value 57344) times an
    abs-max scale per block of the granularity (saturating cast); stored as a ``Float8Array``.
    ``bits`` is 8. Reference: Micikevicius et al., "FP8 Formats for Deep Learning" (2022).

    >>> E5M2()
    E5M2()
    """


Format: TypeAlias = Int | NF4 | Codebook | E4M3 | E5M2

# (default bits, allowed bits) per format
_FORMAT_BITS: dict[type, tuple[int, tuple[int, ...]]] = {
    Int: (8, tuple(range(2, 9))),
    NF4: (4, (4,)),
    Codebook: (4, tuple(range(1, 9))),
    E4M3: (8, (8,)),
    E5M2: (8, (8,)),
}


# ----------------------------------------------------------------------------------------------
# QuantSpec
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one leaf.

    Attributes:
      bits: width of one stored number. ``None`` (default) takes the format's: 8 for
        :class:`Int`, 4 for :class:`NF4` and :class:`Codebook`, 8 for :class:`E4M3` /
        :class:`E5M2`; the constructed spec holds the number. :class:`Int`: 2..8, stored as signed
        ``int2`` (2 bits), ``int4`` (3-4 bits) or ``int8`` (5-8 bits); :class:`Codebook`: 1..8
        (``2**bits`` table entries); the other formats have one width and any other is an error.
      granularity: :class:`PerTensor`, :class:`PerChannel` (default) or :class:`PerGroup`
        (not for :class:`Codebook`, whose tables are per tensor or per output channel).
      calibration: :class:`AbsMax` (default), :class:`Percentile` or :class:`MSE`
        (:class:`Int` only; the other formats scale by abs-max).
      symmetric: symmetric levels ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1`` times a scale (2 bits:
        ternary); ``False``: all ``2**bits`` levels with an integer zero point, 0.0 exactly
        representable (:class:`Int` only).
      format: :class:`Int` (default: integers, the ``QArray`` leaf), :class:`NF4` or
        :class:`Codebook` (table lookups, the ``LookupArray`` leaf), :class:`E4M3` /
        :class:`E5M2` (8-bit floats times scales, the ``Float8Array`` leaf).

    >>> QuantSpec(bits=4, granularity=PerGroup(32)).levels
    (-7, 7)
    >>> QuantSpec(bits=4, symmetric=False).levels
    (-8, 7)
    >>> QuantSpec(format=NF4(), granularity=PerGroup(64)).bits
    4
    """

    bits: int | None = None
    granularity: Granularity = dataclasses.field(default_factory=PerChannel)
    calibration: Calibration = dataclasses.field(default_factory=AbsMax)
    symmetric: bool = True
    format: Format = dataclasses.field(default_factory=Int)

    def __post_init__(self):
        if not isinstance(self.format, Int | NF4 | Codebook | E4M3 | E5M2):
            raise TypeError(
                "QuantSpec.format must be Int(), NF4(), Codebook(...), E4M3() or E5M2(), got "
                f"{self.format!r}"
            )
        name = type(self.format).__name__
        default, allowed = _FORMAT_BITS[type(self.format)]
        if self.bits is None:
            object.__setattr__(self, "bits", default)
        elif not _is_int(self.bits) or self.bits not in allowed:
            if isinstance(self.format, Int):
                fix = (
                    "use bits=8 for int8, bits=4 for int4 (1-bit and >8-bit values are not "
                    "supported)"
                )
                raise ValueError(f"QuantSpec.bits must be an int in 2..8, got {self.bits!r}; {fix}")
            span = f"in {allowed[0]}..{allowed[-1]}" if len(allowed) > 1 else f"{allowed[0]}"
            raise ValueError(
                f"QuantSpec(format={self.format!r}) needs bits {span} (or None), got "
                f"{self.bits!r}; leave bits out to take the format's width"
            )
        if not isinstance(self.granularity, PerTensor | PerChannel | PerGroup):
            raise TypeError(
                f"QuantSpec.granularity must be PerTensor(), PerChannel() or PerGroup(size), got "
                f"{self.granularity!r}"
            )
        if not isinstance(self.calibration, AbsMax | Percentile | MSE):
            raise TypeError(
                f"QuantSpec.calibration must be AbsMax(), Percentile(q) or MSE(), got "
                f"{self.calibration!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        if isinstance(self.format, Int):
            return
        if not self.symmetric:
            raise ValueError(
                f"QuantSpec(format={name}(), symmetric=False): symmetric applies to Int() only "
                f"({name} stores 0.0 exactly already); drop symmetric=False"
            )
        if not isinstance(self.calibration, AbsMax):
            raise ValueError(
                f"QuantSpec(format={name}(), calibration={self.calibration!r}): {name} scales "
                "by abs-max; Percentile and MSE clipping apply to Int() only: drop calibration="
            )
        if isinstance(self.format, Codebook) and isinstance(self.granularity, PerGroup):
            raise ValueError(
                f"QuantSpec(format=Codebook(), granularity={self.granularity!r}): codebooks are "
                "per tensor or per output channel; use PerTensor() or PerChannel()"
            )

    @property
    def levels(self) -> tuple[int, int]:
        """``(qmin, qmax)``: the integer range the values use (:class:`Int` formats)."""
        require_int(self, "QuantSpec.levels")
        half = 2 ** (self.bits - 1)
        return (-(half - 1), half - 1) if self.symmetric else (-half, half - 1)


def require_int(spec: QuantSpec, what: str, path: str | None = None) -> None:
    """``ValueError`` unless ``spec`` has the integer format (for integer-only methods).

    >>> require_int(QuantSpec(bits=4), "gptq")  # an Int() spec: no error
    >>> try:
    ...     require_int(QuantSpec(format=NF4()), "gptq")
    ... except ValueError as e:
    ...     print(str(e)[:44])
    gptq supports QuantSpec(format=Int()) only,
    """
    if isinstance(spec.format, Int):
        return
    where = f"{path}: " if path else ""
    raise ValueError(
        f"{where}{what} supports QuantSpec(format=Int()) only, not {spec.format!r} (not "
        f"implemented yet); use quantize() for {spec.format!r}, or an Int() spec for this leaf"
    )


Rules: TypeAlias = Sequence[tuple[str, QuantSpec | None]]
"""Ordered ``[(regex, spec | None), ...]``: the first ``re.fullmatch`` on the path wins."""

SpecOrRules: TypeAlias = QuantSpec | Rules


def _check_rules(spec_or_rules: Any) -> list[jtree.Rule]:
    """The parsed rules; a bare spec is one catch-all rule (regex ``None``)."""
    if isinstance(spec_or_rules, QuantSpec):
        return [jtree.Rule(None, None, spec_or_rules)]
    if isinstance(spec_or_rules, str | Mapping) or not isinstance(spec_or_rules, Sequence):
        raise TypeError(
            "spec_or_rules must be a QuantSpec or an ordered list of (regex, QuantSpec | None) "
            f"pairs, got {type(spec_or_rules).__name__}"
        )
    if not spec_or_rules:
        raise ValueError("spec_or_rules is an empty list of rules; pass a QuantSpec or rules")

    def check(i: int, regex: str, spec: Any) -> Any:
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"rule {i} ({regex!r}): the spec must be a QuantSpec or None")
        return spec

    return jtree.parse_rules(spec_or_rules, check=check, kind="QuantSpec | None")


def resolve_specs(
    params: jtree.Params,
    spec_or_rules: SpecOrRules,
    *,
    where: jtree.Where,
    roles: Mapping[str, jtree.Role] | None,
    what: str,
) -> tuple[jtree.Selection, dict[str, QuantSpec]]:
    """The leaves to quantize and ``{path: spec}`` for each, in tree order.

    A leaf is quantized if ``where`` selects it and its first matching rule has a spec. Every rule
    must win at least one selected leaf (a rule shadowed by an earlier one, or matching only
    leaves ``where`` leaves out, is an error), and the result must not be empty. The returned
    :class:`~jcompress.tree.Selection` holds exactly the leaves to quantize (its ``roles`` are
    resolved on first use).
    """
    rules = _check_rules(spec_or_rules)
    chosen = jtree.selection(params, where, roles=roles, what=what)
    for path, leaf in chosen.leaves.items():
        if jtree.is_compressed(leaf):
            raise ValueError(
                f"{path}: {what} got a leaf that is already compressed ({type(leaf).__name__}); "
                "call jc.quantization.dequantize(tree) first or exclude it with where="
            )
    assigned = jtree.assign(chosen.paths, rules, what=what, all_paths=list(chosen.all_paths))
    specs: dict[str, QuantSpec] = {p: v for p, v in assigned.items() if v is not None}
    if not specs:
        raise ValueError(
            f"{what}: every selected leaf is left in float by the rules (spec None); nothing to "
            "quantize"
        )
    return chosen.narrow(specs), specs
