"""2:4 sparsity for an nnx CNN on digits, with ``prune`` inside ``nnx.Optimizer``.

The CNN trains dense for the first half of the steps; at ``begin_step`` a constant schedule
switches 2:4 pruning on (keep 2 of every 4 consecutive weights along each kernel's last
contracting axis: a conv's input channels, a Dense layer's inputs, as sparse tensor cores
expect), and the rest of training fine-tunes the survivors. The first conv has a single input
channel (not divisible by 4), so ``where=`` leaves it dense. The dense baseline trains the same
steps with the same seeds and data order.

    python examples/07_nm_nnx_cnn.py           # 5 seeds
    python examples/07_nm_nnx_cnn.py --quick   # 1 seed, a few steps (smoke test)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jcompress.demo import accuracy, batches, load_digits
from jcompress.pruning import NM, constant_schedule, masks_of, nonfinite, prune

PRUNED = r"(conv2|fc1|fc2)/kernel"


class CNN(nnx.Module):
    """``(n, 8, 8, 1)`` digits → two 3x3 convs (16, 32 channels) → Dense 64 → Dense 10."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(8 * 8 * 32, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


def check_2_of_4(masks, model: CNN) -> None:
    """Every group of 4 consecutive weights along the last contracting axis keeps exactly 2,
    and the pruned weights are exactly zero in the model."""
    for name in ("conv2", "fc1", "fc2"):
        mask = np.asarray(masks[name]["kernel"])
        kernel = np.asarray(getattr(model, name).kernel[...])
        # The last contracting axis is the one before the output axis.
        groups = np.moveaxis(mask, -2, -1).reshape(-1, 4)
        assert np.all(groups.sum(axis=1) == 2), name
        assert np.all(kernel[~mask] == 0), name
        nonzero = np.moveaxis(kernel != 0, -2, -1).reshape(-1, 4)
        assert np.all(nonzero.sum(axis=1) <= 2), name
    assert bool(np.all(np.asarray(masks["conv1"]["kernel"])))  # left dense


def train(seed: int, *, steps: int, pruned: bool) -> float:
    data = load_digits(seed=seed)
    model = CNN(nnx.Rngs(seed))
    tx = optax.adam(1e-3)
    if pruned:
        tx = prune(
            tx,
            structure=NM(n=2, m=4),
            schedule=constant_schedule(0.5, begin_step=steps // 2),
            where=PRUNED,
        )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(m):
            logits = m(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        optimizer.update(model, nnx.grad(loss_fn)(model))

    for x, y in batches(data.images("train"), data.y_train, 64, seed=seed, steps=steps):
        step(model, optimizer, jnp.asarray(x), jnp.asarray(y))

    if pruned:
        assert not bool(nonfinite(optimizer.opt_state)), "NaN/Inf met during training"
        check_2_of_4(masks_of(optimizer.opt_state), model)
    return float(accuracy(model(jnp.asarray(data.images("test"))), data.y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    steps = args.steps or (40 if args.quick else 1200)

    dense, pruned = [], []
    for seed in range(seeds):
        dense.append(100 * train(seed, steps=steps, pruned=False))
        pruned.append(100 * train(seed, steps=steps, pruned=True))
        print(f"seed {seed}: dense {dense[-1]:.2f}%  2:4 {pruned[-1]:.2f}%")

    def stat(v):
        return f"{np.mean(v):6.2f} ± {np.std(v):.2f}"

    print()
    print(f"nnx CNN on digits, {seeds} seed(s), {steps} steps (2:4 from step {steps // 2}), adam")
    print("| model                    | test accuracy (%) |")
    print("|--------------------------|-------------------|")
    print(f"| dense                    | {stat(dense):>17} |")
    print(f"| 2:4 (conv2, fc1, fc2)    | {stat(pruned):>17} |")
    print(f"\naccuracy gap (dense - 2:4): {np.mean(dense) - np.mean(pruned):+.2f} points")


if __name__ == "__main__":
    main()
