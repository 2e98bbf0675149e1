"""Benchmark: cost of a distillation step relative to a plain training step of the student.

Three jitted steps (value_and_grad + Adam update) of the same student, timed side by side in
one process with interleaved repeats (medians reported):

* ``plain``: cross-entropy on labels, no teacher;
* ``distill``: ``jc.distillation.distillation_loss`` (alpha=0.5), the teacher's forward pass
  inside the step (its backward pass is skipped: stop_gradient);
* ``precomputed``: the same loss with ``teacher_logits=`` (stored once for a fixed transfer
  set), so no teacher runs in the step.

The expected extra cost of ``distill`` over ``plain`` is one teacher forward pass, timed alone
as ``teacher_fwd``. The machine is shared and noisy: read the ratios, not the absolute times.

    python benchmarks/distill.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jcompress import distillation as jd
from jcompress.demo import MLP

TEACHER = (1200, 1200, 10)


def build(student_features, batch, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.uniform(k[0], (batch, 64))
    y = jax.random.randint(k[1], (batch,), 0, 10)
    student, teacher = MLP(student_features), MLP(TEACHER)
    sp = student.init(k[2], x)["params"]
    tp = teacher.init(k[3], x)["params"]
    sfn = lambda p, x: student.apply({"params": p}, x)
    tfn = lambda p, x: teacher.apply({"params": p}, x)
    opt = optax.adam(1e-3)

    def plain_loss(p, _, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sfn(p, x), y)), {}

    plain = jd.make_train_step(plain_loss, opt)
    distill = jd.make_train_step(jd.distillation_loss(sfn, tfn, temperature=4.0, alpha=0.5), opt)
    teacher_fwd = jax.jit(tfn)
    logits = teacher_fwd(tp, x)
    state = opt.init(sp)
    runs = {
        "plain": lambda: plain(sp, state, None, x, y),
        "distill": lambda: distill(sp, state, tp, x, y),
        "precomputed": lambda: distill(sp, state, None, x, y, teacher_logits=logits),
        "teacher_fwd": lambda: teacher_fwd(tp, x),
    }
    return runs


def time_runs(runs, *, repeats, inner):
    for fn in runs.values():  # compile and warm up
        jax.block_until_ready(fn())
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():  # interleaved: noise hits every variant alike
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / inner)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    minima = {name: min(v) for name, v in samples.items()}
    return medians, minima


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    args = parser.parse_args()
    repeats, inner = (3, 5) if args.quick else (15, 20)
    configs = [((30, 10), 64), ((30, 10), 512), ((300, 100, 10), 64), ((300, 100, 10), 512)]
    if args.quick:
        configs = configs[:1]
    rows = []
    for features, batch in configs:
        runs = build(features, batch)
        med, low = time_runs(runs, repeats=repeats, inner=inner)
        rows.append(
            {
                "student": "64-" + "-".join(map(str, features)),
                "teacher": "64-" + "-".join(map(str, TEACHER)),
                "batch": batch,
                "median_s": med,
                "min_s": low,
                "distill_over_plain": med["distill"] / med["plain"],
                "precomputed_over_plain": med["precomputed"] / med["plain"],
                "teacher_fwd_over_plain": med["teacher_fwd"] / med["plain"],
            }
        )
    header = (
        f"{'student':>16} {'batch':>5} {'plain ms':>9} {'distill ms':>10} {'precomp ms':>10} "
        f"{'teacher fwd ms':>14} {'distill/plain':>13} {'precomp/plain':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        m = r["median_s"]
        print(
            f"{r['student']:>16} {r['batch']:>5} {1e3 * m['plain']:9.3f} "
            f"{1e3 * m['distill']:10.3f} {1e3 * m['precomputed']:10.3f} "
            f"{1e3 * m['teacher_fwd']:14.3f} {r['distill_over_plain']:13.2f} "
            f"{r['precomputed_over_plain']:13.2f}"
        )
    result = {
        "benchmark": "distill",
        "quick": args.quick,
        "repeats": repeats,
        "inner": inner,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()[:1]],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "note": "shared, noisy machine: compare ratios, not absolute times",
        "rows": rows,
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distill.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
