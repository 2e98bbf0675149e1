"""Allocation: the per-leaf option with the least summed predicted increase that meets a budget.

A multiple-choice knapsack: each leaf takes exactly one option; costs add up; the predicted
increases (from :func:`jcompress.budget.sensitivity`) add up. Solved exactly by dynamic
programming over the Pareto frontier of (cost, increase) pairs; where the frontier would grow
beyond ``_MAX_FRONTIER`` points, costs are rounded UP to a grid of that many buckets (the budget is
then still met, the optimum may be missed by at most one bucket per leaf).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from jcompress.budget._sensitivity import Sensitivity

__all__ = ["allocate"]

_MAX_FRONTIER = 20_000


def _frontier(choices: list[list[tuple[int, float]]], budget: int) -> list[int] | None:
    """Option index per leaf minimising the summed increase with summed cost <= ``budget``;
    ``choices[leaf]`` lists ``(cost, increase, option index)`` of the options that fit it."""
    grid = 1
    for _ in range(64):
        # points: (cost, increase, back-pointer); the frontier keeps increasing cost and
        # strictly decreasing increase
        frontier: list[tuple[int, float, tuple]] = [(0, 0.0, ())]
        too_big = False
        for leaf in choices:
            points = {}
            for cost, inc, back in frontier:
                for c, d, k in leaf:
                    total = cost + math.ceil(c / grid) * grid
                    if total > budget:
                        continue
                    value = inc + d
                    if total not in points or value < points[total][0]:
                        points[total] = (value, (back, k))
            kept, best = [], math.inf
            for total in sorted(points):
                value, back = points[total]
                if value < best:
                    kept.append((total, value, back))
                    best = value
            frontier = kept
            if not frontier:
                return None
            if len(frontier) > _MAX_FRONTIER:
                too_big = True
                break
        if not too_big:
            _, _, back = min(frontier, key=lambda t: (t[1], t[0]))
            picks = []
            while back:
                back, k = back
                picks.append(k)
            return picks[::-1]
        grid *= 2
    return None  # pragma: no cover (the grid grows until the frontier fits)


def allocate(
    sensitivity: Sensitivity,
    *,
    max_bytes: int | None = None,
    ratio: float | None = None,
    sparsity: float | None = None,
) -> list[tuple[str, Any]]:
    """The per-leaf choice of options with the least summed predicted increase that meets the
    budget, as rules ``[(regex, option), ...]`` for ``quantize`` / ``magnitude_masks`` /
    :func:`jcompress.budget.compress` (one exact-path rule per leaf, in tree order).

    Args:
      sensitivity: from :func:`jcompress.budget.sensitivity`.
      max_bytes: quantization options: the most bytes the selected leaves may take (their
        packed ``nbytes``).
      ratio: quantization options: instead of ``max_bytes``, the float bytes of the selected
        leaves divided by ``ratio`` (``ratio=8``: an eighth of float32).
      sparsity: sparsity options: the fraction of the selected weights pruned, at least (met
        exactly up to the rounding of the options' per-layer counts).

    Raises:
      ValueError: the wrong budget for the options' kind, or an infeasible one (naming the
        smallest feasible budget).

    >>> s = Sensitivity("quantization", {"int8": "q8", "int4": "q4"}, ("a", "b"),
    ...                 {"a": {"int8": 0.1, "int4": 0.5}, "b": {"int8": 0.0, "int4": 0.01}},
    ...                 {"a": {"int8": 8, "int4": 4}, "b": {"int8": 8, "int4": 4}},
    ...                 {"a": 32, "b": 32}, {"a": 8, "b": 8})
    >>> allocate(s, max_bytes=12)
    [('a', 'q8'), ('b', 'q4')]
    """
    names = list(sensitivity.options)
    paths = list(sensitivity.paths)
    if sensitivity.kind == "quantization":
        if sparsity is not None or (max_bytes is None) == (ratio is None):
            raise ValueError(
                "allocate: quantization options take exactly one of max_bytes= and ratio= "
                f"(got max_bytes={max_bytes!r}, ratio={ratio!r}, sparsity={sparsity!r})"
            )
        if ratio is not None:
            if not ratio > 0:
                raise ValueError(f"allocate: ratio must be > 0, got {ratio!r}")
            max_bytes = int(sum(sensitivity.float_bytes.values()) / ratio)
        budget = int(max_bytes)
        cost, inc = sensitivity.cost, sensitivity.increase
        choices = [
            [(cost[p][n], inc[p][n], k) for k, n in enumerate(names) if cost[p][n] is not None]
            for p in paths
        ]
        unit = "bytes"
    else:
        if sparsity is None or max_bytes is not None or ratio is not None:
            raise ValueError(
                "allocate: sparsity options take sparsity= (the global fraction pruned), got "
                f"max_bytes={max_bytes!r}, ratio={ratio!r}, sparsity={sparsity!r}"
            )
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"allocate: sparsity must be in [0, 1), got {sparsity!r}")
        total = sum(sensitivity.sizes.values())
        needed = math.ceil(float(np.float32(sparsity)) * total - 1e-9)
        # at least `needed` pruned <=> at most total - needed kept
        budget = total - needed
        cost, inc, sizes = sensitivity.cost, sensitivity.increase, sensitivity.sizes
        choices = [
            [
                (sizes[p] - cost[p][n], inc[p][n], k)
                for k, n in enumerate(names)
                if cost[p][n] is not None
            ]
            for p in paths
        ]
        unit = "kept weights"
    smallest = sum(min(c for c, _, _ in leaf) for leaf in choices)
    if smallest > budget:
        if sensitivity.kind == "quantization":
            hint = f"max_bytes={smallest}"
        else:
            hint = f"sparsity={(total - smallest) / total:.6g}"
        raise ValueError(
            f"allocate: the budget ({budget} {unit}) is below what the options can reach "
            f"({smallest} {unit} with every leaf at its cheapest option); the smallest feasible "
            f"budget is {hint}"
        )
    picks = _frontier(choices, budget)
    if picks is None:  # pragma: no cover (smallest <= budget makes the cheapest choice feasible)
        raise ValueError("allocate: no assignment meets the budget")
    return [(re.escape(p), sensitivity.options[names[k]]) for p, k in zip(paths, picks)]
