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
    "MSE",
    "AbsMax",
    "Calibration",
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "Percentile",
    "QuantSpec",
    "Rules",
    "SpecOrRules",
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
# QuantSpec
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one leaf.

    Attributes:
      bits: integer width, 2..8. Values are stored as signed ``int2`` (2 bits), ``int4`` (3-4
        bits) or ``int8`` (5-8 bits).
      granularity: :class:`PerTensor`, :class:`PerChannel` (default) or :class:`PerGroup`.
      calibration: :class:`AbsMax` (default), :class:`Percentile` or :class:`MSE`.
      symmetric: symmetric levels ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1`` times a scale (2 bits:
        ternary); ``False``: all ``2**bits`` levels with an integer zero point, 0.0 exactly
        representable.

    >>> QuantSpec(bits=4, granularity=PerGroup(32)).levels
    (-7, 7)
    >>> QuantSpec(bits=4, symmetric=False).levels
    (-8, 7)
    """

    bits: int = 8
    granularity: Granularity = dataclasses.field(default_factory=PerChannel)
    calibration: Calibration = dataclasses.field(default_factory=AbsMax)
    symmetric: bool = True

    def __post_init__(self):
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(
                f"QuantSpec.bits must be an int in 2..8, got {self.bits!r}; use bits=8 for int8, "
                "bits=4 for int4 (1-bit and >8-bit values are not supported)"
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

    @property
    def levels(self) -> tuple[int, int]:
        """``(qmin, qmax)``: the integer range the values use."""
        half = 2 ** (self.bits - 1)
        return (-(half - 1), half - 1) if self.symmetric else (-half, half - 1)


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
