"""Magnitude-mask time vs tree size: jcompress (histogram threshold) vs plain-JAX baselines.

Methods, all jitted, timed after a warm-up, medians of interleaved repeats in one process:

* ``jcompress``: ``jc.pruning.magnitude_masks(params, s)`` (exact counts, two histogram passes
  over the float32 bit patterns, no sort), ``scope="layer"`` and ``scope="global"``;
* ``sort``: the usual plain-JAX recipe: ``jnp.sort`` of ``|w|`` (per layer, or of all weights
  concatenated for global) and a threshold at index ``k`` (not exact with ties);
* ``bisect32``: 32 counting passes of a bisection over the int32 keys (per layer).

Trees are made of realistic kernel shapes (4096x4096, 1024x4096, ...), from ~1M to ~51M
parameters. Timed with ``benchmarks/_harness.py`` (interleaved medians, the noise measure);
full sorts of more than 20M values are timed once.

Usage: ``python benchmarks/mask_time.py [--quick]``; writes ``benchmarks/results/mask_time.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run, bind

import jcompress.pruning as P

SPARSITY = 0.7

TREES = {
    "1M": [(1024, 1024)],
    "4M": [(1024, 4096)],
    "13M": [(4096, 1024), (1024, 4096), (1024, 4096)],
    "25M": [(4096, 4096), (1024, 4096), (4096, 1024)],
    "51M": [(4096, 4096)] * 3 + [(1024, 512)],
}


def make_tree(shapes):
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return {
        f"Dense_{i}": {"kernel": jax.random.normal(k, s, jnp.float32) * 0.02}
        for i, (k, s) in enumerate(zip(keys, shapes))
    }


def ours(scope):
    return jax.jit(lambda params, s: P.magnitude_masks(params, s, scope=scope))


def _sort_threshold(x, s):
    k = int(SPARSITY * x.size)  # static: the baseline is not jittable over s
    return jnp.sort(x.ravel())[k]


def sort_layer(params, s):
    def one(w):
        a = jnp.abs(w)
        return a >= _sort_threshold(a, s)

    return jax.tree.map(one, params)


def sort_global(params, s):
    leaves = [jnp.abs(w) for w in jax.tree.leaves(params)]
    t = _sort_threshold(jnp.concatenate([a.ravel() for a in leaves]), s)
    return jax.tree.unflatten(jax.tree.structure(params), [a >= t for a in leaves])


def bisect_layer(params, s):
    def one(w):
        keys = jax.lax.bitcast_convert_type(jnp.abs(w), jnp.int32)
        k = jnp.round(s * w.size).astype(jnp.int32)

        def body(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            enough = jnp.sum(keys <= mid, dtype=jnp.int32) >= k
            return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

        lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(2**31 - 1)))
        return keys > lo

    return jax.tree.map(one, params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small trees only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run = Run("mask_time", script=__file__, argv=argv, quick=args.quick)
    sizes = ["1M", "4M"] if args.quick else list(TREES)
    methods = {
        "jcompress layer": ours("layer"),
        "jcompress global": ours("global"),
        "bisect32 layer": jax.jit(bisect_layer),
        "sort layer": jax.jit(sort_layer),
        "sort global": jax.jit(sort_global),
    }
    columns = ["parameters", *(f"{m} (s)" for m in methods), "sort layer / jcompress layer"]
    title = f"magnitude masks at sparsity {SPARSITY}, jitted, median seconds after warm-up"
    with run.table("masks", title, columns) as table:
        for name in sizes:
            params = make_tree(TREES[name])
            n = sum(x.size for x in jax.tree.leaves(params))
            s = jnp.float32(SPARSITY)
            # Check the exact count once.
            masks = methods["jcompress layer"](params, s)
            for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
                kept = int(m.size - np.count_nonzero(m))
                assert kept == round(float(np.float32(SPARSITY)) * w.size)
            calls = bind(methods, params, s)
            big = n > 20e6  # one timed run of a full sort of >20M values is enough
            fast = {m: f for m, f in calls.items() if not (big and m.startswith("sort"))}
            repeats = args.repeats if not big else max(2, args.repeats // 2)
            med = run.interleaved(fast, repeats=repeats, min_sample_s=0.0).wall
            if big:
                slow = {m: f for m, f in calls.items() if m not in fast}
                med.update(run.interleaved(slow, repeats=1, min_repeats=1, min_sample_s=0).wall)
            ratio = med["sort layer"] / med["jcompress layer"]
            table.row([name, *(med[m] for m in methods), ratio], data={"params": int(n), **med})
    run.finish()


if __name__ == "__main__":
    main()
