"""The ``jcompress`` command: ``demo``, ``inspect``, and checkpoint-to-checkpoint ``quantize`` /
``prune`` / ``budget`` (no model code: leaves' roles come from ``--layout``).

Errors in arguments or files print one line ``jcompress <command>: error: ...`` and exit with
status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str):
        raise _CLIError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class _CLIError(Exception):
    pass


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------
# Reading parameters: jcompress checkpoints and plain orbax PyTree checkpoints
# ----------------------------------------------------------------------------------------------


def _read_params(path: str) -> Any:
    from jcompress import checkpoint
    from jcompress._fs import resolve
    from jcompress.checkpoint._io import SCHEMA_FILE

    p = resolve(path, what="checkpoint directory")
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if (p / SCHEMA_FILE).is_file():
        return checkpoint.load(p)
    if not p.is_dir() or not ((p / "_METADATA").exists() or (p / "_CHECKPOINT_METADATA").exists()):
        raise ValueError(f"{path}: neither a jcompress checkpoint nor an orbax PyTree checkpoint")
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(p)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        import jax

        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(p, args=ocp.args.PyTreeRestore(restore_args=args))


def _torch_roles(params: Any) -> dict:
    """Roles for PyTorch layouts: ``weight (out, in)`` / conv ``(out, in, kh, kw)``."""
    import numpy as np

    from jcompress.tree import Role, leaves_with_paths

    roles = {}
    for path, x in leaves_with_paths(params):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
            if not (dtype is not None and np.dtype(dtype).name == "bfloat16"):
                continue
        ndim = len(getattr(x, "shape", ()))
        if ndim >= 2 and path.rsplit("/", 1)[-1] == "weight":
            kind = "matmul" if ndim == 2 else "conv"
            roles[path] = Role(kind, contracting=tuple(range(1, ndim)), output=(0,))
    if not roles:
        raise ValueError("--layout torch: no floating leaf named 'weight' with rank >= 2 found")
    return roles


def _roles(params: Any, layout: str) -> dict | None:
    return _torch_roles(params) if layout == "torch" else None


def _require(module: str, *names: str) -> tuple:
    import importlib

    mod = importlib.import_module(f"jcompress.{module}")
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise ImportError(
            f"jcompress.{module} lacks {', '.join(missing)} in this install; this command needs it"
        )
    return tuple(getattr(mod, n) for n in names)


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 120))


def _transform(fn, params: Any) -> Any:
    """``fn(params)`` compiled once; plain arrays come back as the input's array type."""
    import jax
    import numpy as np

    from jcompress.tree import is_compressed

    out = jax.jit(fn)(params)
    return jax.tree.map(
        lambda new, old: (
            np.asarray(new) if isinstance(old, np.ndarray) and not is_compressed(new) else new
        ),
        out,
        params,
        is_leaf=is_compressed,
    )


def _save_and_report(tree: Any, out: str, reference: Any) -> None:
    from jcompress import checkpoint, report

    checkpoint.save(out, tree)
    s = report.summarize(tree, reference=reference)
    console = _console()
    console.print(s.table(title=out))
    console.print(
        f"wrote {out}: {report.format_bytes(checkpoint.disk_bytes(out))} on disk, "
        f"{report.format_bytes(s.memory_bytes)} in memory "
        f"({s.ratio:.1f}x smaller than the input)"
    )


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from jcompress.demo._pipeline import run

    run(quick=args.quick, out=args.out, seed=args.seed)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from jcompress import checkpoint, report

    tree = _read_params(args.dir)
    s = report.summarize(tree)
    disk = checkpoint.disk_bytes(args.dir)
    if args.json:
        d = s.to_dict()
        d["total"]["disk_bytes"] = disk
        print(json.dumps(d, indent=1))
        return 0
    console = _console()
    console.print(s.table(title=str(args.dir)))
    console.print(
        f"{len(s.leaves)} leaves, {s.size:,} values, {report.format_bytes(s.memory_bytes)} in "
        f"memory, {report.format_bytes(s.encoded_bytes)} encoded, "
        f"{report.format_bytes(disk)} on disk"
    )
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    AbsMax, MSE, Percentile, PerChannel, PerGroup, QuantSpec, quantize = _require(
        "quantization",
        "AbsMax",
        "MSE",
        "Percentile",
        "PerChannel",
        "PerGroup",
        "QuantSpec",
        "quantize",
    )
    calibration = {
        "absmax": lambda: AbsMax(),
        "mse": lambda: MSE(),
        "percentile": lambda: Percentile(args.percentile),
    }[args.calibration]()
    granularity = PerGroup(args.group_size) if args.group_size else PerChannel()
    spec = QuantSpec(bits=args.bits, granularity=granularity, calibration=calibration)
    params = _read_params(args.input)
    roles = _roles(params, args.layout)
    q = _transform(lambda p: quantize(p, spec, where=args.where, roles=roles), params)
    _save_and_report(q, args.output, params)
    return 0


def _parse_structure(text: str | None):
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != "nm" or not all(p.isdigit() for p in parts[1:]):
        raise _CLIError(f"--structure {text!r}: expected nm:N:M, e.g. nm:2:4")
    return int(parts[1]), int(parts[2])


def _cmd_prune(args: argparse.Namespace) -> int:
    nm = _parse_structure(args.structure)
    if args.sparsity is None and nm is None:
        raise _CLIError("jcompress prune: error: give --sparsity or --structure nm:N:M")
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise _CLIError(
            f"jcompress prune: error: --sparsity must be in [0, 1), got {args.sparsity}"
        )
    NM, apply_masks, magnitude_masks = _require("pruning", "NM", "apply_masks", "magnitude_masks")
    params = _read_params(args.input)
    structure = NM(n=nm[0], m=nm[1]) if nm else None
    roles = _roles(params, args.layout)

    def prune(p):
        masks = magnitude_masks(
            p, args.sparsity, structure=structure, where=args.where, roles=roles
        )
        return apply_masks(p, masks)

    _save_and_report(_transform(prune, params), args.output, params)
    return 0


def _levels(text: str, parse, what: str) -> list:
    try:
        return [parse(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise _CLIError(
            f"jcompress budget: error: {what} {text!r}: a comma-separated list"
        ) from None


def _cmd_budget(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from jcompress import budget
    from jcompress.quantization import QuantSpec

    if (args.ratio is not None) + (args.max_bytes is not None) + (args.sparsity is not None) != 1:
        raise _CLIError(
            "jcompress budget: error: give exactly one of --ratio, --max-bytes, --sparsity"
        )
    params = _read_params(args.input)
    if args.sparsity is not None:
        levels = _levels(args.levels, float, "--levels")
        options = {"dense": None, **{f"{s:g}": s for s in levels}}
    else:
        bits = _levels(args.bits, int, "--bits")
        options = {"float": None, **{f"int{b}": QuantSpec(bits=b) for b in bits}}

    def weight_error(outputs, reference):  # data-free: squared reconstruction error
        pairs = zip(jax.tree.leaves(outputs), jax.tree.leaves(reference))
        return sum(jnp.sum((o.astype(jnp.float32) - r.astype(jnp.float32)) ** 2) for o, r in pairs)

    roles = _roles(params, args.layout)
    s = budget.sensitivity(
        lambda p: p,
        params,
        [()],
        options,
        metric=weight_error,
        where=args.where,
        roles=roles,
        quiet=True,
    )
    console = _console()
    console.print(s.table())
    rules = budget.allocate(s, max_bytes=args.max_bytes, ratio=args.ratio, sparsity=args.sparsity)
    chosen = [next(n for n, o in s.options.items() if o == option) for _, option in rules]
    console.print("allocation: " + ", ".join(f"{p} {n}" for p, n in zip(s.paths, chosen)))
    out = _transform(lambda p: budget.compress(p, rules, roles=roles), params)
    _save_and_report(out, args.output, params)
    return 0


def _parser() -> _Parser:
    p = _Parser(
        prog="jcompress",
        description="JAX-native model compression: demo, inspect and compress checkpoints.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    d = sub.add_parser("demo", help="train, prune, distill, quantize and save LeNet-300-100")
    d.add_argument("--quick", action="store_true", help="a short run (seconds; used by CI)")
    d.add_argument(
        "--out", default="jcompress-demo", help="output directory (default: %(default)s)"
    )
    d.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    d.set_defaults(func=_cmd_demo)

    i = sub.add_parser("inspect", help="per-leaf report of a saved checkpoint")
    i.add_argument("dir", help="a jcompress checkpoint or an orbax PyTree checkpoint")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_cmd_inspect)

    layout_help = (
        "parameter layout deciding each leaf's axes: flax (kernel (in, out), the default; "
        "leaves named kernel/embedding) or torch (weight (out, in))"
    )
    q = sub.add_parser("quantize", help="quantize a checkpoint's weights into a new checkpoint")
    q.add_argument("input", metavar="IN", help="input checkpoint (jcompress or orbax)")
    q.add_argument("output", metavar="OUT", help="output jcompress checkpoint")
    q.add_argument("--bits", type=int, default=8, help="bits per value, 2..8 (default: 8)")
    q.add_argument(
        "--group-size",
        type=int,
        default=0,
        help="quantization group size along the contracting axis (default: per-channel)",
    )
    q.add_argument(
        "--calibration",
        choices=("absmax", "mse", "percentile"),
        default="mse",
        help="how clipping ranges are chosen (default: mse)",
    )
    q.add_argument("--percentile", type=float, default=99.9, help="for --calibration percentile")
    q.add_argument("--where", help="regex (full match) of the leaf paths to quantize")
    q.add_argument("--layout", choices=("flax", "torch"), default="flax", help=layout_help)
    q.set_defaults(func=_cmd_quantize)

    r = sub.add_parser("prune", help="magnitude-prune a checkpoint's weights into a new checkpoint")
    r.add_argument("input", metavar="IN", help="input checkpoint (jcompress or orbax)")
    r.add_argument("output", metavar="OUT", help="output jcompress checkpoint")
    r.add_argument("--sparsity", type=float, help="fraction of weights to remove per layer")
    r.add_argument("--structure", help="nm:N:M keeps N of every M along the contracting axis")
    r.add_argument("--where", help="regex (full match) of the leaf paths to prune")
    r.add_argument("--layout", choices=("flax", "torch"), default="flax", help=layout_help)
    r.set_defaults(func=_cmd_prune)

    b = sub.add_parser(
        "budget",
        help="per-layer bit widths or sparsities that meet a size budget, into a new checkpoint",
        description=(
            "Choose each layer's option (--bits or --levels) with the least predicted damage "
            "that meets the budget, then apply it. Without model code each layer's damage is "
            "its weight reconstruction error (data-free); in Python, jc.budget.sensitivity "
            "measures the model's outputs on data."
        ),
    )
    b.add_argument("input", metavar="IN", help="input checkpoint (jcompress or orbax)")
    b.add_argument("output", metavar="OUT", help="output jcompress checkpoint")
    b.add_argument("--ratio", type=float, help="quantize to 1/RATIO of the float bytes")
    b.add_argument("--max-bytes", type=int, help="quantize to at most this many bytes")
    b.add_argument("--sparsity", type=float, help="prune this global fraction of the weights")
    b.add_argument("--bits", default="8,4,2", help="bit widths to choose from (default: 8,4,2)")
    b.add_argument(
        "--levels", default="0.5,0.7,0.9", help="sparsities to choose from (default: 0.5,0.7,0.9)"
    )
    b.add_argument("--where", help="regex (full match) of the leaf paths to compress")
    b.add_argument("--layout", choices=("flax", "torch"), default="flax", help=layout_help)
    b.set_defaults(func=_cmd_budget)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jcompress`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _CLIError as e:
        print(_one_line(str(e)), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    prog = f"jcompress {args.command}"
    try:
        return args.func(args)
    except _CLIError as e:
        print(_one_line(str(e)), file=sys.stderr)
    except (OSError, RuntimeError, ValueError, TypeError, ImportError) as e:
        print(f"{prog}: error: {_one_line(str(e))}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
