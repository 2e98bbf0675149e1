"""Deep Compression's recipe on LeNet-300-100 (digits), with library calls only.

Han et al. (2016): prune, then share weights through a small codebook per layer (k-means
centroids, 5 bits here), then fine-tune the centroids with the indices fixed: each centroid
moves by the summed gradient of the weights mapped to it. Here:

1. gradual magnitude pruning to 92% of every Dense kernel during training
   (``prune(optax.adamw(...), schedule=polynomial_schedule(0.92, ...))``);
2. ``quantize(params, QuantSpec(bits=5, format=Codebook(...), granularity=PerTensor()))``:
   a 32-entry table per kernel, pruned weights kept exactly zero (they take no table entry);
3. centroid fine-tuning: ``trainable, rest = jc.tree.partition(q)`` (the tables and the float
   biases), an ordinary optax loop on ``trainable`` through ``jc.compressed`` (the gradient
   reaches the tables through the lookup), ``jc.tree.combine(trainable, rest)``.

The comparison at equal bits is uniform 5-bit integers per output channel
(``QuantSpec(bits=5)``), round to nearest, fine-tuned the same way (its scales and biases:
``partition(q, scales=True)``), same steps and seeds. Accuracy and the true stored bytes of the
Dense kernels (``nbytes``: indices/values in their containers plus tables/scales) are printed.

    python examples/09_deep_compression.py           # 5 seeds
    python examples/09_deep_compression.py --quick   # 1 seed, few steps (smoke test)
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import optax

import jcompress as jc
from jcompress.demo import DigitsTask, fit
from jcompress.demo._train import cross_entropy_loss
from jcompress.pruning import polynomial_schedule, prune
from jcompress.quantization import Codebook, PerTensor, QuantSpec, dequantize, quantize

SPARSITY = 0.92
BITS = 5


def kernel_bytes(params) -> tuple[int, int]:
    """Bytes of the Dense kernels: in memory (packed ``nbytes``) and encoded in a checkpoint
    (``jc.report``: zeros and pruned indices sparse-encoded)."""
    rows = [r for r in jc.report.summarize(params).leaves if r.path.endswith("kernel")]
    return sum(r.memory_bytes for r in rows), sum(r.encoded_bytes for r in rows)


def zeros(params) -> int:
    """Exact zeros in the Dense kernels (as the model computes with them)."""
    dense = dequantize(params)
    return sum(
        int(np.sum(np.asarray(leaf) == 0))
        for path, leaf in jc.tree.leaves_with_paths(dense)
        if "kernel" in path
    )


def fine_tune(task: DigitsTask, q, *, scales: bool, steps: int, seed: int):
    """Train the float children of ``q`` (tables or scales, and the biases), indices fixed."""
    trainable, rest = jc.tree.partition(q, scales=scales)
    apply = jc.compressed(task.apply)
    loss = cross_entropy_loss(lambda t, x: apply(jc.tree.combine(t, rest), x))
    trainable, _ = fit(loss, optax.adam(1e-3), trainable, task.data, steps=steps, seed=seed)
    return jc.tree.combine(trainable, rest)


def run(seed: int, *, steps: int, tune_steps: int) -> dict:
    task = DigitsTask.load(seed=seed)
    schedule = polynomial_schedule(
        SPARSITY, begin_step=steps // 10, end_step=steps * 6 // 10, update_every=max(steps // 40, 1)
    )
    tx = prune(optax.adamw(3e-3, weight_decay=1e-4), schedule=schedule)
    params, _ = fit(task.loss, tx, task.init(seed), task.data, steps=steps, seed=seed)
    pruned_zeros = zeros(params)
    apply = jc.compressed(task.apply)
    specs = {
        "codebook": QuantSpec(
            bits=BITS, format=Codebook(init="linear", iters=20), granularity=PerTensor()
        ),
        "int": QuantSpec(bits=BITS),
    }
    out = {"float": task.accuracy(params), "float_bytes": kernel_bytes(params)}
    for name, spec in specs.items():
        q = quantize(params, spec)
        out[f"{name}_rtn"] = task.accuracy(q, apply)
        tuned = fine_tune(task, q, scales=name == "int", steps=tune_steps, seed=seed)
        out[f"{name}_tuned"] = task.accuracy(tuned, apply)
        out[f"{name}_bytes"] = kernel_bytes(tuned)
        # pruned weights stay exactly zero through quantization and fine-tuning
        assert zeros(tuned) >= pruned_zeros, (name, zeros(tuned), pruned_zeros)
        if name == "codebook":  # at most 2**bits values per kernel, zero included
            for path, leaf in jc.tree.leaves_with_paths(dequantize(tuned)):
                if "kernel" in path:
                    assert len(np.unique(np.asarray(leaf))) <= 2**BITS, path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the per-seed results here")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    steps, tune_steps = (60, 20) if args.quick else (2000, 300)
    results = []
    for seed in range(seeds):
        r = run(seed, steps=steps, tune_steps=tune_steps)
        results.append(r)
        print(
            f"seed {seed}: float {100 * r['float']:.2f}%  codebook {100 * r['codebook_rtn']:.2f}"
            f" -> {100 * r['codebook_tuned']:.2f}%  int{BITS} {100 * r['int_rtn']:.2f} -> "
            f"{100 * r['int_tuned']:.2f}%"
        )

    def stat(key):
        v = 100 * np.asarray([r[key] for r in results])
        return f"{v.mean():6.2f} ± {v.std():.2f}"

    r0 = results[0]
    print(f"\nLeNet-300-100 on digits, {SPARSITY:.0%} pruned, {seeds} seed(s), {BITS} bits")
    print("| model | test accuracy (%) | Dense kernel bytes | encoded (checkpoint) |")
    print("|---|---|---|---|")
    rows = [
        ("float, pruned", "float", "float_bytes"),
        ("codebook, before fine-tuning", "codebook_rtn", "codebook_bytes"),
        ("codebook, centroids fine-tuned", "codebook_tuned", "codebook_bytes"),
        (f"int{BITS} per channel, RTN", "int_rtn", "int_bytes"),
        (f"int{BITS}, scales fine-tuned", "int_tuned", "int_bytes"),
    ]
    for name, acc, size in rows:
        memory, encoded = r0[size]
        print(f"| {name} | {stat(acc)} | {memory} | {encoded} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": seeds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
