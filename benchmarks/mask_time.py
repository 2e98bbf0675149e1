"""Magnitude-mask time vs tree size: jcompress (histogram threshold) vs plain-JAX baselines.

Methods, all jitted, timed after a warm-up, medians of interleaved repeats in one process:

* ``jcompress``: ``jc.pruning.magnitude_masks(params, s)`` (exact counts, two histogram passes
  over the float32 bit patterns, no sort), ``scope="layer"`` and ``scope="global"``;
* ``sort``: the usual plain-JAX recipe: ``jnp.sort`` of ``|w|`` (per layer, or of all weights
  concatenated for global) and a threshold at index ``k`` (not exact with ties);
* ``bisect32``: 32 counting passes of a bisection over the int32 keys (per layer).

Trees are made of realistic kernel shapes (4096x4096, 1024x4096, ...), from ~1M to ~51M
parameters. The machine is shared and noisy: read the ratios, not the absolute times.

Usage: ``python benchmarks/mask_time.py [--quick]``; writes ``benchmarks/results/mask_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

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


def timed(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small trees only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = ["1M", "4M"] if args.quick else list(TREES)
    methods = {
        "jcompress layer": ours("layer"),
        "jcompress global": ours("global"),
        "bisect32 layer": jax.jit(bisect_layer),
        "sort layer": jax.jit(sort_layer),
        "sort global": jax.jit(sort_global),
    }
    rows = []
    print(f"magnitude masks at sparsity {SPARSITY}; median seconds (jitted, after warm-up)")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    header = f"{'params':>8} " + " ".join(f"{m:>17}" for m in methods) + "  sort/ours(layer)"
    print(header)
    for name in sizes:
        params = make_tree(TREES[name])
        n = sum(x.size for x in jax.tree.leaves(params))
        s = jnp.float32(SPARSITY)
        # Check the exact count once.
        masks = methods["jcompress layer"](params, s)
        for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
            assert int(m.size - np.count_nonzero(m)) == round(float(np.float32(SPARSITY)) * w.size)
        for fn in methods.values():
            timed(fn, params, s)  # warm-up (compile)
        repeats = args.repeats if n < 20e6 else max(2, args.repeats // 2)
        times = {m: [] for m in methods}
        for r in range(repeats):
            for m, fn in methods.items():
                if m.startswith("sort") and n > 20e6 and r > 0:
                    continue  # one timed run of a full sort of >20M values is enough
                times[m].append(timed(fn, params, s))
        med = {m: float(np.median(t)) for m, t in times.items()}
        ratio = med["sort layer"] / med["jcompress layer"]
        print(f"{name:>8} " + " ".join(f"{med[m]:17.3f}" for m in methods) + f"  {ratio:8.1f}x")
        for m in methods:
            rows.append(
                {
                    "tree": name,
                    "params": int(n),
                    "method": m,
                    "median_s": med[m],
                    "runs": len(times[m]),
                    "vs_jcompress_layer": med[m] / med["jcompress layer"],
                }
            )
    out = pathlib.Path(__file__).parent / "results" / "mask_time.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "mask_time",
                "sparsity": SPARSITY,
                "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, {jax.default_backend()}",
                "load_average_end": os.getloadavg()[0],
                "note": "shared machine, noisy: compare ratios within a row",
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
