"""Ordered per-leaf rules: ``[(regex, value), ...]``, the first ``re.fullmatch`` on a path wins.

The one rule mechanism of every transform that takes a per-leaf setting (quantization specs,
pruning sparsities): :func:`parse_rules` validates the list once, :func:`assign` gives each
selected path its rule's value and checks that every rule wins at least one leaf (a rule shadowed
by an earlier one, or matching only leaves ``where=`` leaves out, is almost always a mistake).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = ["Rule", "assign", "is_rules", "parse_rules"]


class Rule(NamedTuple):
    """One parsed rule. ``regex`` ``None`` is a catch-all (a bare value given without rules)."""

    regex: str | None
    pattern: re.Pattern | None
    value: Any

    def matches(self, path: str) -> bool:
        return self.pattern is None or self.pattern.fullmatch(path) is not None


def is_rules(x: Any) -> bool:
    """Whether ``x`` is written as rules: a list or tuple of ``(str, value)`` pairs.

    >>> is_rules([("Dense_0/kernel", 0.5)]), is_rules(0.5), is_rules((0.5, 0.7))
    (True, False, False)
    """
    if isinstance(x, str | bytes | Mapping) or not isinstance(x, Sequence) or not x:
        return False
    return all(isinstance(r, tuple | list) and len(r) == 2 and isinstance(r[0], str) for r in x)


def parse_rules(
    rules: Sequence[Any], *, check: Callable[[int, str, Any], Any], kind: str
) -> list[Rule]:
    """Validate ordered ``(regex, value)`` rules once.

    Args:
      rules: the user's list.
      check: ``check(i, regex, value) -> value`` validates (and may normalise) one rule's value,
        raising a ``TypeError``/``ValueError`` that names the rule.
      kind: what a value is, for messages (``"QuantSpec | None"``, ``"sparsity | NM | None"``).

    Raises:
      TypeError: an item is not a ``(regex, value)`` pair.
      ValueError: a regex does not compile, or the list is empty.

    >>> [r.value for r in parse_rules([("a.*", 1), ("b", None)], check=lambda i, r, v: v,
    ...                               kind="int | None")]
    [1, None]
    """
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(f"rule {i} must be a (regex, {kind}) pair, got {rule!r}")
        regex, value = rule
        value = check(i, regex, value)
        try:
            compiled = re.compile(regex)
        except re.error as e:
            raise ValueError(f"rule {i}: {regex!r} is not a valid regular expression: {e}") from e
        out.append(Rule(regex, compiled, value))
    if not out:
        raise ValueError(f"the rules are an empty list; give at least one (regex, {kind}) pair")
    return out


def assign(
    paths: Sequence[str], rules: Sequence[Rule], *, what: str, all_paths: Sequence[str]
) -> dict[str, Any]:
    """``{path: value}`` of the first rule each path fully matches (paths no rule matches are
    left out); every rule with a regex must win at least one of ``paths``.

    Args:
      paths: the selected paths, in tree order.
      rules: from :func:`parse_rules`.
      what: the caller's name for error messages.
      all_paths: every path of the tree (to say what a losing rule matches).

    Raises:
      ValueError: a rule wins no path, naming what it matches and the fix.

    >>> rules = parse_rules([("a/.*", 1), (".*", 2)], check=lambda i, r, v: v, kind="int")
    >>> assign(["a/w", "b/w"], rules, what="demo", all_paths=["a/w", "b/w"])
    {'a/w': 1, 'b/w': 2}
    """
    out: dict[str, Any] = {}
    wins = [0] * len(rules)
    for path in paths:
        for i, rule in enumerate(rules):
            if rule.matches(path):
                wins[i] += 1
                out[path] = rule.value
                break
    more = " ..." if len(all_paths) > 6 else ""
    for rule, n in zip(rules, wins):
        if n == 0 and rule.pattern is not None:
            matched = [p for p in all_paths if rule.pattern.fullmatch(p)]
            reason = (
                f"it matches {matched[:4]}, which earlier rules take or where= leaves out"
                if matched
                else f"it matches no path (paths: {list(all_paths[:6])}{more})"
            )
            raise ValueError(
                f"{what}: the rule {rule.regex!r} selects no leaf: {reason}; fix or remove the "
                "rule (the first re.fullmatch wins, so put specific rules before catch-alls)"
            )
    return out
