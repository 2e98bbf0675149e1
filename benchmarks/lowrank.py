"""Low-rank factorization: plain vs whitened (activation-aware) SVD, and what ``(x@a)@b`` costs.

Part 1 trains LeNet-300-100 (``jcompress.demo.MLP``) on digits for several seeds, factorizes its
kernels with ``jc.structure.low_rank`` at several energies and at equal ranks, plain and whitened
(``stats`` from ``jc.runtime.capture(..., gram=True)`` on the training set, or a direct ``XᵀX``
of each layer's input if the runtime is not available), and reports parameter savings, the
relative error of the logits on the test set, and test accuracy (mean ± std over seeds).

Part 2 times one layer, ``x @ W`` vs ``LowRank.dot_general`` = ``(x @ a) @ b``, jitted, at a
few sizes, batches and ranks: medians of interleaved repeats (``benchmarks/_harness.py``, with
its noise measure).

    python benchmarks/lowrank.py [--quick]

Writes ``benchmarks/results/lowrank.json``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run

from jcompress.demo import MLP, accuracy, batches, load_digits
from jcompress.structure import LowRank, low_rank, low_rank_report
from jcompress.tree import is_compressed

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


def table1(run, seeds, epochs, energies, ranks) -> None:
    title = f"LeNet-300-100 on digits, {len(seeds)} seeds: low rank, plain vs whitened"
    columns = ["setting", "ranks (seed 0)", "kernel params kept", "logit rel. error"]
    columns.append("test accuracy")
    with run.table("digits", title, columns, timed=False) as t:
        res = part1(seeds, epochs, energies, ranks)
        for key, r in res["rows"].items():
            ranks = "dense" if r["ranks_seed0"] is None else str(r["ranks_seed0"])
            acc = f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}%"
            kept = f"{100 * r['kernel_params_kept_mean']:.1f}%"
            t.row([key, ranks, kept, r["logit_rel_err_mean"], acc], data=r)
        t.note(f"Gram statistics from {res['stats_source']}; {epochs} epochs per seed")


# ----------------------------------------------------------------------------------------------
# Part 2: forward time of x @ W vs (x @ a) @ b
# ----------------------------------------------------------------------------------------------


def part2(run, sizes, batches_, fractions, repeats) -> None:
    dn = (((1,), (0,)), ((), ()))
    dense_fn = jax.jit(lambda w, x: x @ w)
    lr_fn = jax.jit(lambda lr, x: lr.dot_general(x, dn))
    rng = np.random.default_rng(0)
    title = "x @ W (n x n, float32) vs LowRank (x @ a) @ b, jitted, medians"
    columns = ["n", "rank", "batch", "MAC ratio", "dense us", "low rank us", "speedup"]
    with run.table("forward", title, columns) as t:
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
                    calls = {"dense": partial(dense_fn, w, x), "lowrank": partial(lr_fn, lr, x)}
                    m = run.interleaved(calls, repeats=repeats).wall
                    t.row(
                        [n, r, b, n * n / (r * 2 * n), 1e6 * m["dense"], 1e6 * m["lowrank"],
                         m["dense"] / m["lowrank"]],
                        data=m,
                    )  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer seeds/sizes")
    args = parser.parse_args(argv)
    run = Run("lowrank", script=__file__, argv=argv, quick=args.quick)
    if args.quick:
        table1(run, [0, 1], 10, [0.7, 0.9], [8])
        part2(run, [512], [1, 64], [1 / 16, 1 / 4], 5)
    else:
        table1(run, [0, 1, 2, 3, 4], 40, [0.7, 0.9, 0.95, 0.99, 0.999], [4, 8, 16, 32])
        part2(run, [1024, 2048], [1, 16, 256], [1 / 32, 1 / 8, 1 / 4, 3 / 8], 15)
    run.finish()


if __name__ == "__main__":
    main()
