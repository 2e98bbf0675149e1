"""Per-layer bit widths for a byte budget: measure, allocate, compress (``jcompress.budget``).

The committed character-level transformer (``jcompress.demo.load_charlm``: 13 Dense kernels of
128 or 512 inputs) is quantized to an eighth of its float32 kernel bytes. A uniform setting that
small must use 2 bits everywhere (int4 with its scales is ~7.5x); letting each kernel take its
own width keeps most of the model's quality:

1. ``sensitivity(fn, params, batches, options)``: for every kernel and option, the KL
   divergence of the logits on a few calibration windows when that kernel ALONE is quantized,
   and the option's true packed bytes;
2. ``allocate(s, ratio=8)``: one option per kernel with the least summed increase whose bytes
   fit 1/8 of float32 (an exact knapsack), as ordinary ``[(regex, QuantSpec), ...]`` rules;
3. ``compress(params, rules)``: ``quantize`` with those rules (``fn=``/``batches=``: GPTQ).

Printed: the sensitivity table, the allocation, and held-out perplexity and bytes of the
allocated model vs every uniform setting (round to nearest, MSE clipping). The evidence over
three models, three budgets, five seeds and the sparsity variant is ``benchmarks/budget.py``.

    python examples/08_budget.py           # all 1079 held-out windows, 64 calibration windows
    python examples/08_budget.py --quick   # 128 held-out windows, 32 calibration windows
"""

from __future__ import annotations

import argparse
import re

import jax
from rich.console import Console

from jcompress import tree as jtree
from jcompress.budget import allocate, compress, sensitivity
from jcompress.demo import calibration_windows, charlm_perplexity, heldout_windows, load_charlm
from jcompress.quantization import MSE, PerGroup, QuantSpec, dequantize

RATIO = 8
KERNELS = r".*kernel"  # the embedding, positions and norms stay float32


def spec(bits: int, group: int | None = None) -> QuantSpec:
    granularity = {} if group is None else {"granularity": PerGroup(group)}
    return QuantSpec(bits=bits, calibration=MSE(), **granularity)


OPTIONS = {
    "float": None,
    "int8": spec(8),
    "int4": spec(4),
    "int2": spec(2),
    "int4 g64": spec(4, 64),  # every kernel's input dimension (128 or 512) divides by 64
    "int2 g64": spec(2, 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer windows (smoke test)")
    args = parser.parse_args()
    model, params = load_charlm()

    def fn(p, tokens):
        return model.apply({"params": p}, tokens)

    apply = jax.jit(fn)
    windows = heldout_windows(128 if args.quick else None)
    calib = calibration_windows(32 if args.quick else 64, batch=16, seed=0)

    # 1. sensitivity: one row per kernel, "KL increase (bytes)" per option
    s = sensitivity(fn, params, calib, OPTIONS, where=KERNELS, quiet=True)
    Console(width=150).print(s.table())

    # 2. allocate an eighth of the float32 bytes
    rules = allocate(s, ratio=RATIO)
    float_bytes = sum(s.float_bytes.values())
    budget = float_bytes // RATIO
    names = {spec: name for name, spec in OPTIONS.items()}
    choice = {path: names[option] for path, (_, option) in zip(s.paths, rules)}
    print(f"allocation for 1/{RATIO} of {float_bytes} float32 kernel bytes ({budget} bytes):")
    for path, name in choice.items():
        print(f"  {path:<20} {name:<9} {s.cost[path][name]:>7} bytes")

    # 3. compress; the stored bytes are exactly what the sensitivity counted
    def kernel_bytes(tree) -> int:
        leaves = dict(jtree.leaves_with_paths(tree))
        return sum(int(leaves[p].nbytes) for p in s.paths)

    base = charlm_perplexity(apply, params, windows)
    rows = [("float32", float_bytes, base)]
    allocated = compress(params, rules)
    assert kernel_bytes(allocated) == sum(s.cost[p][n] for p, n in choice.items()) <= budget
    ppl = charlm_perplexity(apply, dequantize(allocated), windows)
    rows.append(("allocated", kernel_bytes(allocated), ppl))
    for name in OPTIONS:
        if OPTIONS[name] is not None:
            q = compress(params, [(re.escape(p), OPTIONS[name]) for p in s.paths])
            ppl = charlm_perplexity(apply, dequantize(q), windows)
            rows.append((f"uniform {name}", kernel_bytes(q), ppl))

    print(f"\nheld-out perplexity, {len(windows)} windows of 64 bytes (RTN, MSE clipping):")
    print("| setting          |   bytes | vs float32 | fits 1/8 | perplexity | increase |")
    print("|------------------|---------|------------|----------|------------|----------|")
    for name, nbytes, ppl in rows:
        fits = "yes" if nbytes <= budget else "no"
        print(
            f"| {name:<16} | {nbytes:>7} | {float_bytes / nbytes:>9.2f}x | {fits:>8} | "
            f"{ppl:>10.3f} | {ppl - base:>+8.3f} |"
        )
    fitting = [r for r in rows[2:] if r[1] <= budget]
    best = min(fitting, key=lambda r: r[2])
    print(
        f"\nallocated: +{rows[1][2] - base:.3f} perplexity at {float_bytes / rows[1][1]:.2f}x; "
        f"best uniform setting that fits ({best[0]}): +{best[2] - base:.3f} at "
        f"{float_bytes / best[1]:.2f}x"
    )


if __name__ == "__main__":
    main()
