"""``roles``: every parameter leaf's kind and axes, read from how the function consumes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jcompress.runtime import _interpret as ip
from jcompress.tree import Params, Role, leaves_with_paths

__all__ = ["consumer_role", "roles"]


def _role(kind: str, view: ip.View, contracting, output, stacked=()) -> Role | None:
    c, o = view.leaf_axes(contracting), view.leaf_axes(output)
    s = tuple(sorted({*view.stacked, *view.leaf_axes(stacked)}))
    if not c or not o or (set(c) & set(o)) or (set(s) & (set(c) | set(o))):
        return None  # a vector, or axes mixed by a reshape: not a weight role
    return Role(kind, contracting=c, output=o, stacked=s)


def consumer_role(eqn: Any, facts: list[ip.View | None]) -> tuple[int, ip.View, Role | None]:
    """``(operand index, view, role)`` of the parameter view a consumer equation reads.

    The role is ``None`` when the use does not give the leaf a weight role (a vector in a dot,
    an operand used as the activation side of a conv).
    """
    name = eqn.primitive.name
    p = eqn.params
    if name == ip.DOT:
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        i = 1 if facts[1] is not None else 0
        view = facts[i]
        c, b = (rc, rb) if i == 1 else (lc, lb)
        free = [d for d in range(len(view.axes)) if d not in c and d not in b]
        return i, view, _role("matmul", view, c, free, b)
    if name == ip.CONV:
        if facts[1] is None:
            return 0, facts[0], None
        rhs_spec = p["dimension_numbers"].rhs_spec
        view = facts[1]
        return 1, view, _role("conv", view, (rhs_spec[1], *rhs_spec[2:]), (rhs_spec[0],))
    # gather / dynamic_slice: indexed axes are rows (output), the rest contract
    view = facts[0]
    if view is None:
        return next(i for i, f in enumerate(facts) if f is not None), facts[1], None
    shape = eqn.invars[0].aval.shape
    sizes = p["slice_sizes"]
    indexed = [d for d in range(len(shape)) if sizes[d] != shape[d]]
    rest = [d for d in range(len(shape)) if sizes[d] == shape[d]]
    return 0, view, _role("gather", view, rest, indexed)


class _RoleFinder(ip.Interpreter):
    def __init__(self):
        super().__init__()
        self.found: dict[str, tuple[Role, str]] = {}

    def consume(self, eqn, invals, facts):
        _, view, role = consumer_role(eqn, facts)
        if role is not None and view is not None:
            self._add(view.path, role, eqn.primitive.name)
        return super().consume(eqn, invals, facts)

    def _add(self, path: str, role: Role, by: str) -> None:
        if path not in self.found:
            self.found[path] = (role, by)
            return
        old, old_by = self.found[path]
        if (old.contracting, old.output, old.stacked) == (
            role.contracting,
            role.output,
            role.stacked,
        ):
            if {old.kind, role.kind} == {"gather", "matmul"}:  # a tied embedding
                self.found[path] = (Role("gather", old.contracting, old.output, old.stacked), by)
            elif old.kind == role.kind:
                return
            else:
                self._conflict(path, old, old_by, role, by)
        else:
            self._conflict(path, old, old_by, role, by)

    @staticmethod
    def _conflict(path, old, old_by, role, by):
        raise ValueError(
            f"{path}: consumed twice with inconsistent roles: {old} (by {old_by}) and {role} "
            f"(by {by}); pass roles= written by hand for this leaf"
        )


def roles(fn: Callable[..., Any], params: Params, *args: Any) -> dict[str, Role]:
    """Every leaf's :class:`~jcompress.tree.Role`, inferred from how ``fn`` consumes it.

    ``fn`` is called as ``fn(params, *args)``. For linen, pass
    ``lambda p, x: model.apply({"params": p}, x)`` with ``variables["params"]`` so the paths
    match the tree optax sees (``model.apply`` directly yields paths with a ``params/`` prefix).

    A leaf read by ``dot_general`` is ``"matmul"`` (contracting: its contracted axes; output: its
    free axes), by ``conv_general_dilated`` ``"conv"`` (kernel spatial and input axes contract),
    by ``gather`` / ``dynamic_slice`` ``"gather"`` (indexed rows are the output, the rest
    contracts: the same axes a tied output projection ``x @ embedding.T`` gives). Axes sliced by
    ``scan`` (``nn.scan`` stacks) or used as ``dot_general`` batch axes are ``stacked``. The leaf
    is followed through reshapes, transposes, broadcasts, slices, squeezes, dtype casts and
    copies, inside ``jit``, ``remat``, custom derivatives, ``scan``, ``cond`` and ``while``.
    Leaves nothing consumes (biases, norm scales) get ``Role("other")``.

    Typical layouts: Dense ``(in, out)``: contracting ``(0,)``, output ``(1,)``; Conv
    ``(kh, kw, in, out)``: ``(0, 1, 2)`` / ``(3,)``; attention ``DenseGeneral``
    ``(features, heads, head_dim)``: ``(0,)`` / ``(1, 2)`` and ``(heads, head_dim, features)``:
    ``(0, 1)`` / ``(2,)``; Embed ``(vocab, features)``: gather, ``(1,)`` / ``(0,)``; Equinox
    ``(out, in)``: ``(1,)`` / ``(0,)``; an ``nn.scan`` stack ``(layers, in, out)``:
    ``stacked=(0,)``.

    Args:
      fn: ``fn(params, *args)``.
      params: the parameter tree (compressed leaves allowed).
      *args: example arguments (arrays or ``jax.ShapeDtypeStruct`` s; only shapes matter).

    Returns:
      ``{path: Role}`` for every leaf of ``params``, in tree order.

    Raises:
      ValueError: a leaf consumed twice with inconsistent roles (naming both); a parameter
        reaching an unsupported higher-order primitive (naming it); ``fn`` looking up a path the
        tree lacks.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> roles(lambda p, x: x @ p["w"] + p["b"], params, jnp.ones((2, 4)))
    {'b': Role(kind='other', contracting=(), output=(), stacked=()),
     'w': Role(kind='matmul', contracting=(0,), output=(1,), stacked=())}
    """
    traced = ip.trace_params(fn, params, args)
    finder = _RoleFinder()

    def run(*leaves):
        return finder.run(traced.jaxpr, list(leaves), traced.facts())[0]

    ip.run_abstract(traced, run)
    out = {}
    for path, _ in leaves_with_paths(params):
        found = finder.found.get(path)
        out[path] = found[0] if found else Role("other")
    return out
