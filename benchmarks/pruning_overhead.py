"""Training throughput with ``prune(...)`` around adam vs the same plain optax loop.

Same model, data, optimizer and number of steps; both steps jitted. Runs are interleaved
(A B, B A, A B, ...) so machine noise hits both sides alike; the ratio ``plain_time /
prune_time`` (1.0 = no overhead) is reported as the median over repeats with a bootstrap 95%
confidence interval. Two phases:

* ``during``: inside a polynomial schedule that changes the target every 10 steps, so one step
  in ten recomputes the masks (under ``lax.cond``: the other steps skip it);
* ``after``: past the schedule's end, masks fixed (the steady state of fine-tuning).

Two models: a wider MLP whose step takes several milliseconds (where fixed costs are small next to
the work) and LeNet-300-100 on digits (tiny steps make every fixed cost visible; jaxpruner reports
0.84 on a digits MLP).

    python benchmarks/pruning_overhead.py           # full
    python benchmarks/pruning_overhead.py --quick   # a few seconds
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.demo import MLP
from jcompress.pruning import polynomial_schedule, prune

UPDATE_EVERY = 10
END_STEP = 1_000_000  # "during": never reached; "after": the count is set past it


def make_problem(name: str):
    if name == "wide-mlp":
        features, inputs, batch = (1024, 1024, 10), 512, 64
    else:  # LeNet-300-100 on digits-sized inputs
        features, inputs, batch = (300, 100, 10), 64, 64
    model = MLP(features)
    x = jax.random.normal(jax.random.key(0), (batch, inputs))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    params = model.init(jax.random.key(2), x[:1])["params"]

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y
        ).mean()

    return params, loss_fn


def make_step(tx, loss_fn):
    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def time_block(step, params, state, n: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of ``n`` steps."""
    jax.block_until_ready((params, state))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        params, state = step(params, state)
    jax.block_until_ready((params, state))
    return time.perf_counter() - wall, time.process_time() - cpu


def bootstrap_ci(ratios: np.ndarray, *, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, (rounds, len(ratios)), replace=True), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


# prune's options: the defaults, and "lean" (no per-step NaN/Inf read of the gradients, no
# gradient masking before the inner optimizer: only the final select is left).
VARIANTS = {"default": {}, "lean": {"check_finite": False, "mask_gradients": False}}


def measure(name: str, phase: str, *, repeats: int, steps: int, variant: str = "default") -> dict:
    params, loss_fn = make_problem(name)
    plain_tx = optax.adam(1e-3)
    schedule = polynomial_schedule(0.9, begin_step=0, end_step=END_STEP, update_every=UPDATE_EVERY)
    prune_tx = prune(optax.adam(1e-3), schedule=schedule, **VARIANTS[variant])
    plain_step, prune_step = make_step(plain_tx, loss_fn), make_step(prune_tx, loss_fn)

    plain_state = plain_tx.init(params)
    prune_state = prune_tx.init(params)
    if phase == "during":
        prune_state = prune_state._replace(count=jnp.int32(1))  # the target changes at step 10
    else:
        prune_state = prune_state._replace(count=jnp.int32(END_STEP))
    # Compile and warm up; for "after", the first step computes the final masks.
    plain_params, plain_state = plain_step(params, plain_state)
    prune_params, prune_state = prune_step(params, prune_state)
    for _ in range(3):
        time_block(plain_step, plain_params, plain_state, 2)
        time_block(prune_step, prune_params, prune_state, 2)

    plain_times, prune_times = [], []
    for r in range(repeats):
        # Every block starts from the same states: "during" blocks cross the same number of
        # target changes (steps // UPDATE_EVERY of them).
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                plain_times.append(time_block(plain_step, plain_params, plain_state, steps))
            else:
                prune_times.append(time_block(prune_step, prune_params, prune_state, steps))
    plain_times, prune_times = np.array(plain_times), np.array(prune_times)
    row = {
        "model": name,
        "phase": phase,
        "variant": variant,
        "steps_per_block": steps,
        "repeats": repeats,
        "update_every": UPDATE_EVERY,
    }
    for i, clock in enumerate(("wall", "cpu")):
        ratios = plain_times[:, i] / prune_times[:, i]
        low, high = bootstrap_ci(ratios)
        row[clock] = {
            "plain_step_ms": 1e3 * float(np.median(plain_times[:, i])) / steps,
            "prune_step_ms": 1e3 * float(np.median(prune_times[:, i])) / steps,
            "ratio_median": float(np.median(ratios)),
            "ratio_ci95": [low, high],
        }
    return row


def format_row(row: dict) -> str:
    parts = [f"{row['model']:>14} {row['phase']:>6} {row['variant']:>7}:"]
    for clock in ("wall", "cpu"):
        c = row[clock]
        parts.append(
            f"{clock} {c['plain_step_ms']:.3f}/{c['prune_step_ms']:.3f} ms ratio "
            f"{c['ratio_median']:.3f} [{c['ratio_ci95'][0]:.3f}, {c['ratio_ci95'][1]:.3f}]"
        )
    return "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, wide_steps, lenet_steps = (4, 10, 50) if args.quick else (31, 40, 400)

    rows = []
    for name, steps in (("wide-mlp", wide_steps), ("lenet-300-100", lenet_steps)):
        for phase in ("during", "after"):
            for variant in VARIANTS:
                rows.append(measure(name, phase, repeats=repeats, steps=steps, variant=variant))
                print(format_row(rows[-1]), flush=True)

    print()
    print(
        "| model | phase | prune options | clock | plain step (ms) | prune step (ms) "
        "| plain/prune median [95% CI] |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for clock in ("wall", "cpu"):
            c = r[clock]
            print(
                f"| {r['model']} | {r['phase']} | {r['variant']} | {clock} | "
                f"{c['plain_step_ms']:.3f} | "
                f"{c['prune_step_ms']:.3f} | {c['ratio_median']:.3f} "
                f"[{c['ratio_ci95'][0]:.3f}, {c['ratio_ci95'][1]:.3f}] |"
            )
    result = {
        "benchmark": "pruning_overhead",
        "quick": args.quick,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()[:1]],
        "machine": platform.machine(),
        "note": "shared, noisy machine: compare ratios, not absolute times. 'cpu' is the "
        "process CPU time of all threads (robust to other jobs), 'wall' the elapsed time; "
        f"'during' recomputes the masks every {UPDATE_EVERY} steps",
        "rows": rows,
    }
    out = pathlib.Path(__file__).parent / "results" / "pruning_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
