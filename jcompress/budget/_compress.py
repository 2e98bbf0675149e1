"""Apply allocated per-leaf rules with the existing transforms."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jcompress import tree as jtree
from jcompress.pruning import apply_masks, magnitude_masks, sparsegpt
from jcompress.quantization import QuantSpec, gptq, quantize

__all__ = ["compress"]


def compress(
    params: jtree.Params,
    rules: list[tuple[str, Any]],
    *,
    fn: Callable[..., Any] | None = None,
    batches: Iterable[Any] | None = None,
    roles: Mapping[str, jtree.Role] | None = None,
) -> jtree.Params:
    """Apply rules from :func:`jcompress.budget.allocate` (or written by hand).

    Quantization rules (``QuantSpec`` / ``None``): ``quantize(params, rules)``, or
    ``gptq(fn, params, batches, rules)`` when ``fn`` and ``batches`` are given. Sparsity rules
    (a fraction, ``NM(n, m)`` or ``None``): ``apply_masks(params, magnitude_masks(params,
    rules))``, or ``sparsegpt(fn, params, batches, rules)`` (its pruned tree: kept weights
    reconstructed) when ``fn`` and ``batches`` are given. Only the leaves the rules name are
    touched; rules that leave everything uncompressed return ``params`` unchanged.

    >>> import jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.array([[1.0, -2.0], [0.5, 4.0]])}}
    >>> out = compress(params, [("a/kernel", 0.5)])
    >>> out["a"]["kernel"].tolist()
    [[0.0, -2.0], [0.0, 4.0]]
    """
    rules = list(rules)
    if not rules:
        raise TypeError("compress: rules must be a non-empty list of (regex, option) pairs")
    parsed = jtree.parse_rules(rules, check=lambda i, regex, option: option, kind="option")

    def where(path: str, _leaf: Any) -> bool:
        return any(rule.matches(path) for rule in parsed)

    values = [v for _, v in rules if v is not None]
    if not values:
        return params
    if (fn is None) != (batches is None):
        raise ValueError(
            "compress: pass both fn= and batches= (GPTQ / SparseGPT) or neither (round to "
            "nearest / magnitude)"
        )
    if all(isinstance(v, QuantSpec) for v in values):
        if fn is not None:
            return gptq(fn, params, batches, rules, where=where, roles=roles, quiet=True)
        return quantize(params, rules, where=where, roles=roles)
    if any(isinstance(v, QuantSpec) for v in values):
        raise ValueError("compress: rules mix quantization specs and sparsities; pass one kind")
    if fn is not None:
        pruned, _ = sparsegpt(fn, params, batches, rules, where=where, roles=roles, quiet=True)
        return pruned
    return apply_masks(params, magnitude_masks(params, rules, where=where, roles=roles))
