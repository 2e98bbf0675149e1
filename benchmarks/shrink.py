"""Forward time of a shrunken model vs the masked dense model it equals.

Channel pruning with ``structured_masks(..., groups=jc.structure.dependencies(...))`` zeroes
whole channels; on its own that saves nothing (XLA multiplies the zeros). ``jc.structure.shrink``
removes them, so the matmuls and convolutions get smaller. This script times, jitted and side by
side in one process, ``fn(apply_masks(params, masks), x)`` (masked dense) against
``small_fn(small_params, x)`` for:

* an MLP 784-1024-1024-10 (``jcompress.demo.MLP``), batch 256;
* a CNN on 8x8x1 images, convs of 32 and 64 channels, Dense 128, Dense 10
  (``jcompress.demo.CNN``), batch 256;
* a ResNeXt-style CNN on 16x16x3 images: conv 64, grouped conv 128 (``feature_group_count=8``;
  every group loses the same number of channels and the count stays 8), 1x1 conv 10, batch 64;
* a GroupNorm CNN on 16x16x3 images: conv 64 + GroupNorm(8), conv 128 + GroupNorm(16), mean,
  Dense 10 (whole norm groups removed), batch 64;

with 50% and 75% of every prunable group's channels removed (the output layer is blocked and
keeps its width). Times are medians of interleaved repeats (``benchmarks/_harness.py``, with
its noise measure). Parameters are random (speed does not depend on the values).

It also times building the channel-group masks (``structured_masks(..., groups=...)``) for the CNN
of ``examples/05_shrink_cnn.py``: the first call (one compiled program for the model's groups)
and a second call at a new sparsity (no recompilation).

    python benchmarks/shrink.py [--quick]

Writes ``benchmarks/results/shrink.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run

from jcompress.demo import CNN, MLP
from jcompress.pruning import apply_masks, structured_masks
from jcompress.structure import dependencies, shrink


class GroupedCNN(nn.Module):
    """conv 64 -> grouped conv 128 (8 groups) -> 1x1 conv 10 -> spatial mean."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.relu(nn.Conv(128, (3, 3), feature_group_count=8)(x))
        return nn.Conv(10, (1, 1))(x).mean((1, 2))


class GroupNormCNN(nn.Module):
    """conv 64 + GroupNorm(8) -> conv 128 + GroupNorm(16) -> spatial mean -> Dense 10."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=8)(nn.Conv(64, (3, 3))(x)))
        x = nn.relu(nn.GroupNorm(num_groups=16)(nn.Conv(128, (3, 3))(x)))
        return nn.Dense(10)(x.mean((1, 2)))


def mask_build_times() -> dict[str, float]:
    """Seconds for ``structured_masks(..., groups=...)`` on the CNN of examples/05: the first
    call (compiles the group program) and a second call at another sparsity (cached)."""
    model = CNN()
    x = jnp.ones((1, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    groups = dependencies(lambda p, x: model.apply({"params": p}, x), params, x)
    out = {}
    for name, s in (("first_call_s", 0.5), ("second_call_s", 0.25)):
        t = time.perf_counter()
        jax.block_until_ready(structured_masks(params, s, groups=groups))
        out[name] = time.perf_counter() - t
    return out


def count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def case(run, table, name: str, model, x: jax.Array, fractions, repeats: int) -> None:
    def fn(p, x):
        return model.apply({"params": p}, x)

    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    groups = dependencies(fn, params, x)
    dense = jax.jit(fn)
    for s in fractions:
        masks = structured_masks(params, s, groups=groups)
        masked = apply_masks(params, masks)
        small_fn, small = shrink(fn, params, masks, x)
        small_jit = jax.jit(small_fn)
        err = float(jnp.max(jnp.abs(small_jit(small, x) - dense(masked, x))))
        t = run.interleaved(
            {
                "masked": lambda m=masked: dense(m, x),
                "shrunk": lambda f=small_jit, p=small: f(p, x),
            },
            repeats=repeats,
        ).wall
        table.row(
            [name, f"{100 * s:.0f}%", count(params), count(small), 1e3 * t["masked"],
             1e3 * t["shrunk"], t["masked"] / t["shrunk"], f"{err:.1e}"],
            data=t,
        )  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    run = Run("shrink", script=__file__, argv=argv, quick=args.quick)
    repeats = 5 if args.quick else 41
    batch = 256
    rng = np.random.default_rng(0)
    models = [
        ("MLP 784-1024-1024-10", MLP((1024, 1024, 10)), (batch, 784)),
        ("CNN 8x8x1 32-64ch Dense128", CNN(channels=(32, 64), hidden=128), (batch, 8, 8, 1)),
        ("grouped CNN 16x16 64-g8:128", GroupedCNN(), (64, 16, 16, 3)),
        ("GroupNorm CNN 16x16x3 64-128", GroupNormCNN(), (64, 16, 16, 3)),
    ]
    columns = ["model", "removed", "params", "shrunk params", "masked ms", "shrunk ms"]
    columns += ["speedup", "max diff"]
    title = f"forward time, masked dense vs shrunk ({repeats} interleaved repeats)"
    with run.table("forward", title, columns) as table:
        for name, model, shape in models:
            x = jnp.asarray(rng.uniform(size=shape), jnp.float32)
            case(run, table, name, model, x, (0.5, 0.75), repeats)
    title = "channel-group masks for the CNN of examples/05 (structured_masks with groups=)"
    with run.table("group_masks", title, ["call", "seconds"]) as table:
        build = mask_build_times()
        table.row(["first (compiles the group program)", build["first_call_s"]])
        table.row(["second, another sparsity (cached)", build["second_call_s"]])
    run.finish()


if __name__ == "__main__":
    main()
