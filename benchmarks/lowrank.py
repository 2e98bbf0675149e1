"""Low-rank factorization: plain vs whitened (activation-aware) SVD, and what ``(x@a)@b`` costs.

Part 1 trains LeNet-300-100 (``jcompress.demo.MLP``) on digits for several seeds, factorizes its
kernels with ``jc.structure.low_rank`` at several energies and at equal ranks, plain and whitened
(``stats`` from ``jc.runtime.capture(..., gram=True)`` on the training set, or a direct ``XᵀX``
of each layer's input if the runtime is not available), and reports parameter savings, the
relative error of the logits on the test set, and test accuracy (mean ± std over seeds).

Part 2 times one layer, ``x @ W`` vs ``LowRank.dot_general`` = ``(x @ a) @ b``, jitted, at a
few sizes, batches and ranks: medians of interleaved repeats. The machine is shared and noisy:
read the ratios, not the absolute times.

    python benchmarks/lowrank.py [--quick]

Writes ``benchmarks/results/lowrank.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.demo import MLP, accuracy, batches, load_digits
from jcompress.structure import LowRank, low_rank, low_rank_report
from jcompress.tree import is_compressed

RESULTS = Path(__file__).parent / "results" / "lowrank.json"


# ----------------------------------------------------------------------------------------------
# Part 1: accuracy and error on a trained digits MLP
# ----------------------------------------------------------------------------------------------


def train(seed: int, data, epochs: int):
    model = MLP()
    params = model.init(jax.random.key(seed), data.x_train[:1])["params"]
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for x, y in batches(data.x_train, data.y_train, 64, seed=seed, epochs=epochs):
        params, state = step(params, state, x, y)
    return model, params


def gram_stats(model, params, x):
    """``{path: stats with .gram}``: jc.runtime.capture, or a direct XᵀX per layer input."""
    try:
        from jcompress.runtime import capture

        return capture(lambda p, x: model.apply({"params": p}, x), params, x, gram=True), "capture"
    except ImportError:
        pass
    from types import SimpleNamespace

    stats, h = {}, jnp.asarray(x)
    n = len(model.features)
    for i in range(n):
        layer = params[f"Dense_{i}"]
        stats[f"Dense_{i}/kernel"] = SimpleNamespace(gram=h.T @ h)
        h = h @ layer["kernel"] + layer["bias"]
        h = jax.nn.relu(h) if i < n - 1 else h
    return stats, "direct"


def dense_tree(tree):
    return jax.tree.map(
        lambda v: v.dequantize() if is_compressed(v) else v, tree, is_leaf=is_compressed
    )


def part1(seeds: list[int], epochs: int, energies: list[float], ranks: list[int]) -> dict:
    data = load_digits(seed=0)
    rows: dict[str, dict] = {}
    source = None
    settings = [("energy", e) for e in energies] + [("rank", r) for r in ranks]
    for seed in seeds:
        model, params = train(seed, data, epochs)
        apply = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
        ref = apply(params, data.x_test)
        base_acc = float(accuracy(ref, data.y_test))
        rows.setdefault("dense", {"acc": [], "err": [], "params": [], "ranks": []})
        rows["dense"]["acc"].append(base_acc)
        rows["dense"]["err"].append(0.0)
        stats, source = gram_stats(model, params, data.x_train)
        for kind, value in settings:
            for method in ("plain", "whitened"):
                kw = {kind: value, "stats": stats if method == "whitened" else None}
                fac = low_rank(params, **kw)
                rep = low_rank_report(params, fac)
                out = apply(dense_tree(fac), data.x_test)
                key = f"{method} {kind}={value}"
                row = rows.setdefault(key, {"acc": [], "err": [], "params": [], "ranks": []})
                row["acc"].append(float(accuracy(out, data.y_test)))
                row["err"].append(float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)))
                row["params"].append(rep.params_after / rep.params)
                row["ranks"].append([x.rank for x in rep.layers])
    summary = {}
    for key, row in rows.items():
        summary[key] = {
            "acc_mean": float(np.mean(row["acc"])),
            "acc_std": float(np.std(row["acc"])),
            "logit_rel_err_mean": float(np.mean(row["err"])),
            "kernel_params_kept_mean": float(np.mean(row["params"])) if row["params"] else 1.0,
            "ranks_seed0": row["ranks"][0] if row["ranks"] else None,
        }
    return {"seeds": seeds, "epochs": epochs, "stats_source": source, "rows": summary}


def print_part1(res: dict) -> None:
    print(
        f"\nLeNet-300-100 on digits, {len(res['seeds'])} seeds, stats: {res['stats_source']}\n"
        f"{'setting':<26} {'ranks (seed 0)':<22} {'kernel params':>13} {'logit err':>10} "
        f"{'test acc':>16}"
    )
    for key, r in res["rows"].items():
        ranks = "dense" if r["ranks_seed0"] is None else str(r["ranks_seed0"])
        print(
            f"{key:<26} {ranks:<22} {r['kernel_params_kept_mean']:>12.1%} "
            f"{r['logit_rel_err_mean']:>10.4f} {r['acc_mean']:>9.4f} ± {r['acc_std']:.4f}"
        )


# ----------------------------------------------------------------------------------------------
# Part 2: forward time of x @ W vs (x @ a) @ b
# ----------------------------------------------------------------------------------------------


def _time(fn, args, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return out


def part2(sizes: list[int], batches_: list[int], fractions: list[float], repeats: int) -> list:
    dn = (((1,), (0,)), ((), ()))
    dense_fn = jax.jit(lambda w, x: x @ w)
    lr_fn = jax.jit(lambda lr, x: lr.dot_general(x, dn))
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        w = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
        for frac in fractions:
            r = max(1, int(frac * n))
            lr = LowRank(
                jnp.asarray(rng.standard_normal((n, r)), jnp.float32),
                jnp.asarray(rng.standard_normal((r, n)), jnp.float32),
            )
            for b in batches_:
                x = jnp.asarray(rng.standard_normal((b, n)), jnp.float32)
                jax.block_until_ready((dense_fn(w, x), lr_fn(lr, x)))  # compile
                td, tl = [], []
                for _ in range(repeats):  # interleaved
                    td += _time(dense_fn, (w, x), 1)
                    tl += _time(lr_fn, (lr, x), 1)
                d, low = float(np.median(td)), float(np.median(tl))
                rows.append(
                    {
                        "n": n,
                        "rank": r,
                        "batch": b,
                        "flops_ratio": n * n / (r * 2 * n),
                        "dense_us": d * 1e6,
                        "lowrank_us": low * 1e6,
                        "speedup": d / low,
                    }
                )
    return rows


def print_part2(rows: list) -> None:
    print(
        f"\nx @ W (n x n, float32) vs (x @ a) @ b, jitted, median of interleaved repeats, "
        f"backend {jax.default_backend()}\n"
        f"{'n':>6} {'rank':>5} {'batch':>6} {'MAC ratio':>9} {'dense us':>10} {'lowrank us':>11} "
        f"{'speedup':>8}"
    )
    for r in rows:
        print(
            f"{r['n']:>6} {r['rank']:>5} {r['batch']:>6} {r['flops_ratio']:>8.1f}x "
            f"{r['dense_us']:>10.1f} {r['lowrank_us']:>11.1f} {r['speedup']:>7.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer seeds/sizes")
    args = parser.parse_args()
    if args.quick:
        p1 = part1([0, 1], 10, [0.7, 0.9], [8])
        p2 = part2([512], [1, 64], [1 / 16, 1 / 4], 20)
    else:
        p1 = part1([0, 1, 2, 3, 4], 40, [0.7, 0.9, 0.95, 0.99, 0.999], [4, 8, 16, 32])
        p2 = part2([1024, 2048], [1, 16, 256], [1 / 32, 1 / 8, 1 / 4, 3 / 8], 30)
    print_part1(p1)
    print_part2(p2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "quick": args.quick,
        "backend": jax.default_backend(),
        "note": "shared, noisy machine: read ratios; accuracy = mean ± std over seeds",
        "digits_mlp": p1,
        "forward": p2,
    }
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
