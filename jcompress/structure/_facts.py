"""Channel facts: what each axis of a variable holds, and what happens when two axes meet.

The dependency analysis keeps one fact per variable axis:

* a **layout** (activations): the axis holds the channels of one or more *spaces*, each a run
  ``offset + c`` (``+ j * stride`` after a channel-last flatten) of the axis (a tuple of
  :class:`~jcompress.structure._spaces.Seg`);
* a **claim** (parameter-derived values): the parameter ``(path, axis)`` pairs the axis comes
  from, not yet tied to a space (a frozenset);
* ``None``: no channels (batch, spatial and input-feature axes, constants).

:class:`Algebra` combines facts and records the consequences in its
:class:`~jcompress.structure._spaces.Spaces`: a claim meeting a layout makes the parameter axis a
member of the layout's spaces (bias, norm scale and statistics, the next kernel's contracting
rows); two layouts meeting merge their spaces (both sides of a residual add; ``q``/``k`` head
axes in ``q @ k``); a fact that cannot survive (:meth:`Algebra.drop`) blocks its spaces with the
reason, or fixes its parameter axes (contracted against the model input, indexed by a gather).
An axis that a ``broadcast_in_dim`` makes from nothing or from size 1 (an attention mask
``mask[:, None]`` broadcast over the heads by ``jnp.where``, a scalar constant broadcast to an
activation's shape) is a layout of a *free* space: its values are the same at every index, so it
takes whatever width the channels it meets elementwise keep (``shrink`` re-emits the broadcast at
that width). A free space joins the group it meets; contracted or reduced over, it blocks as a
constant does (:meth:`Algebra.unfree`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jcompress.structure._spaces import Seg, Spaces

__all__ = ["Algebra", "Fact", "is_claim", "is_layout"]


@dataclasses.dataclass(frozen=True)
class Fact:
    """Channel facts of a variable: one per axis, and whether it derives only from parameters.

    An axis fact is ``None``, a layout (a tuple of :class:`Seg`) or a claim (a frozenset of
    ``(path, axis)``).
    """

    axes: tuple[Any, ...]
    param: bool


def is_layout(f: Any) -> bool:
    """Whether an axis fact is a layout (a tuple of :class:`Seg`)."""
    return isinstance(f, tuple)


def is_claim(f: Any) -> bool:
    """Whether an axis fact is a claim (a frozenset of parameter ``(path, axis)``)."""
    return isinstance(f, frozenset)


class Algebra:
    """How axis facts combine; the consequences land in :attr:`spaces`."""

    def __init__(self) -> None:
        self.spaces = Spaces()

    def drop(self, f: Any, why: str) -> None:
        """An axis fact that cannot survive: block its spaces, or fix its parameter axes."""
        if is_layout(f):
            self.spaces.block(f, why)
        elif is_claim(f):
            for key in f:
                self.spaces.fixed.setdefault(key, f"{key[0]} axis {key[1]} {why}")

    def unfree(self, f: Any, why: str) -> Any:
        """A free axis used where its width matters: blocked, and a constant axis (``None``)."""
        if is_layout(f) and self.spaces.is_free(f):
            self.drop(f, f"is a broadcast used by {why}")
            return None
        return f

    def meet(self, a: Any, b: Any, na: int, nb: int, why: str) -> Any:
        """Two axis facts that must agree index by index (elementwise ops, contractions)."""
        if na == 1 and nb != 1:
            self.drop(a, f"is broadcast {why}")
            return b
        if nb == 1 and na != 1:
            self.drop(b, f"is broadcast {why}")
            return a
        if a is None or b is None:
            x = a if b is None else b
            if x is None:
                return None
            self.drop(x, f"meets an axis that cannot lose channels (model input or constant) {why}")
            return x if is_layout(x) and not self.spaces.is_free(x) else None
        if is_claim(a) and is_claim(b):
            return a | b
        if is_claim(a) or is_claim(b):
            claim, layout = (a, b) if is_claim(a) else (b, a)
            for s in layout:
                self.spaces.add(s, claim)
            return layout
        sa, sb = sorted(a, key=lambda s: s.offset), sorted(b, key=lambda s: s.offset)
        sizes = self.spaces.size
        if len(sa) == len(sb) and all(
            x.offset == y.offset and x.stride == y.stride and sizes[x.space] == sizes[y.space]
            for x, y in zip(sa, sb)
        ):
            for x, y in zip(sa, sb):
                self.spaces.union(x.space, y.space)
            return a
        why = f"meets a differently laid-out channel axis {why}"
        self.spaces.block(a, why)
        self.spaces.block(b, why)
        return a

    def contract(self, a: Any, b: Any, n: int, why: str) -> None:
        """Two axes summed over together (a ``dot_general`` / ``conv`` contraction)."""
        free = [is_layout(f) and self.spaces.is_free(f) for f in (a, b)]
        if any(free):  # a sum over channels weighted by a broadcast depends on the width
            for f in (a, b):
                self.drop(f, f"is contracted against a broadcast input or constant by {why}")
            return
        if is_claim(a) and is_claim(b):  # parameter @ parameter (a factorized weight)
            seg = Seg(self.spaces.new(n))
            self.spaces.add(seg, a | b)
            return
        self.meet(a, b, n, n, why)

    def born(self, f: Any, n: int) -> Any:
        """A claimed axis becoming an activation axis: a new space with the claim as members."""
        if not is_claim(f):
            return f
        seg = Seg(self.spaces.new(n))
        self.spaces.add(seg, f)
        return (seg,)

    # -- reshape arithmetic ---------------------------------------------------------------------

    def flatten(self, f: Any, outer: int, channels: int, why: str) -> Any:
        """A channel-last flatten: ``outer`` positions of ``channels`` channels each."""
        if outer == 1:
            return f
        if is_layout(f) and all(s.stride == 0 for s in f):
            return tuple(Seg(s.space, s.offset, channels) for s in f)
        self.drop(f, f"is merged with other axes by {why}")
        return None

    def split(self, f: Any, inner: int, why: str) -> Any:
        """A channel axis reshaped to ``(outer, inner...)``: the outer axis holds runs of ``inner``.

        Every later use of the inner axes stays inside one run, so the runs are the pruning unit
        (whole GroupNorm groups, whole heads, a key/value head with its query heads).
        """
        sizes = self.spaces.size
        if is_layout(f) and all(
            s.stride == 0 and s.offset % inner == 0 and sizes[s.space] % inner == 0 for s in f
        ):
            return tuple(Seg(self.spaces.coarse(s.space, inner), s.offset // inner) for s in f)
        self.drop(f, f"is split into runs of {inner} that do not align with its channels by {why}")
        return None

    def refine(self, f: Any, inner: int, why: str) -> Any:
        """``(outer, inner...)`` merged with channels only on the outer axis: ``inner`` per channel
        (GroupNorm statistics repeated over a group, ``jnp.repeat`` of key/value heads, a
        channel-first flatten)."""
        if inner == 1:
            return f
        if is_layout(f) and all(s.stride == 0 for s in f):
            return tuple(Seg(self.spaces.fine(s.space, inner), s.offset * inner) for s in f)
        self.drop(f, f"is merged with inner axes by {why}")
        return None
