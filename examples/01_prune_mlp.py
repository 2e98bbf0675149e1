"""Gradual magnitude pruning of LeNet-300-100 on digits, with ``prune`` around ``adamw``.

The pruned model is trained exactly like the dense one (same steps, data order and seeds), with
``prune(optax.adamw(...), schedule=polynomial_schedule(0.9, ...))`` as the optimizer: the masks
live in the optimizer state and the training loop is the plain optax loop
(``jcompress.demo.fit``). Every Dense kernel ends at exactly 90% sparsity (asserted); biases
stay dense.

    python examples/01_prune_mlp.py           # 5 seeds, full training
    python examples/01_prune_mlp.py --quick   # 1 seed, a few steps (smoke test)
"""

from __future__ import annotations

import argparse

import numpy as np
import optax

from jcompress.demo import DigitsTask, fit
from jcompress.pruning import masks_of, nonfinite, polynomial_schedule, prune, sparsity

SPARSITY = 0.9


def train(seed: int, *, steps: int, pruned: bool) -> tuple[float, float]:
    """Train one model; returns (test accuracy, sparsity of the Dense kernels)."""
    task = DigitsTask.load(seed=seed)  # MLP((300, 100, 10)) on a seeded split
    tx = optax.adamw(3e-3, weight_decay=1e-4)
    if pruned:
        schedule = polynomial_schedule(
            SPARSITY,
            begin_step=steps // 10,
            end_step=steps * 6 // 10,
            update_every=max(steps // 40, 1),
        )
        tx = prune(tx, schedule=schedule)
    params, opt_state = fit(task.loss, tx, task.init(seed), task.data, steps=steps, seed=seed)

    if pruned:
        assert not bool(nonfinite(opt_state)), "NaN/Inf met during training"
        masks = masks_of(opt_state)
        for name, layer in params.items():
            kernel = np.asarray(layer["kernel"])
            kept = np.asarray(masks[name]["kernel"])
            # Exact per-layer count, and pruned weights are exactly zero.
            assert int(kept.size - kept.sum()) == round(SPARSITY * kernel.size), name
            assert np.all(kernel[~kept] == 0), name
    return task.accuracy(params), sparsity(params)  # sparsity: zeros over the kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    steps = args.steps or (60 if args.quick else 2000)

    dense, pruned, sparsities, dense_sparsities = [], [], [], []
    for seed in range(seeds):
        acc_d, s_d = train(seed, steps=steps, pruned=False)
        acc_p, s = train(seed, steps=steps, pruned=True)
        dense.append(100 * acc_d)
        pruned.append(100 * acc_p)
        sparsities.append(s)
        dense_sparsities.append(s_d)
        print(
            f"seed {seed}: dense {100 * acc_d:.2f}%  pruned {100 * acc_p:.2f}%  "
            f"kernel sparsity {s:.4f}"
        )

    # Exactly 90% of the Dense kernels' weights are zero (per layer: round(0.9 * size)).
    assert all(s == SPARSITY for s in sparsities), sparsities

    def stat(v):
        return f"{np.mean(v):6.2f} ± {np.std(v):.2f}"

    print()
    print(f"LeNet-300-100 on digits, {seeds} seed(s), {steps} steps, adamw")
    print("| model                  | test accuracy (%) | kernel sparsity |")
    print("|------------------------|-------------------|-----------------|")
    print(f"| dense                  | {stat(dense):>17} | {np.mean(dense_sparsities):15.4f} |")
    print(f"| pruned (GMP, 90%)      | {stat(pruned):>17} | {np.mean(sparsities):15.4f} |")
    gap = np.mean(dense) - np.mean(pruned)
    print(f"\naccuracy gap (dense - pruned): {gap:+.2f} points")


if __name__ == "__main__":
    main()
