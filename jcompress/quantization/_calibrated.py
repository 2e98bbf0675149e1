"""Which leaves a calibrated quantizer (GPTQ, AWQ) compresses, with which spec and role."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jcompress import calibration
from jcompress import tree as jtree
from jcompress.quantization._scales import scale_blocks
from jcompress.quantization._spec import QuantSpec, SpecOrRules, require_int, resolve_specs

__all__ = ["resolve_calibrated"]


def resolve_calibrated(
    fn: Callable[..., Any],
    params: jtree.Params,
    batches: Iterable[Any],
    spec_or_rules: SpecOrRules,
    *,
    where: jtree.Where,
    roles: Mapping[str, jtree.Role] | None,
    what: str,
    formats: bool = False,
) -> dict[str, tuple[QuantSpec, jtree.Role]]:
    """``{path: (spec, role)}`` for a calibrated quantizer (GPTQ, AWQ), checked eagerly before
    any calibration pass: :func:`jcompress.calibration.select_layers` (roles from ``fn``,
    default matmul/conv selection, finite leaves that flatten to matrices), the rules, and each
    spec's layout; ``formats``: the method also takes non-integer formats (GPTQ)."""
    layers = calibration.select_layers(fn, params, batches, where=where, roles=roles, what=what)
    chosen, specs = resolve_specs(
        params, spec_or_rules, where=lambda path, _: path in layers, roles=layers.roles, what=what
    )
    out = {}
    for path, role in chosen.roles.items():
        if not formats:
            require_int(specs[path], what, path)
        scale_blocks(path, tuple(chosen.leaves[path].shape), specs[path], role)
        out[path] = (specs[path], role)
    return out
