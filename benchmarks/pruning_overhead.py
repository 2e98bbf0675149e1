"""Training throughput with ``prune(...)`` around adam vs the same plain optax loop.

Same model, data, optimizer and number of steps; both steps jitted. Runs are interleaved
(A B, B A, A B, ...) so machine noise hits both sides alike; the ratio ``plain_time /
prune_time`` (1.0 = no overhead) is reported as the median over repeats with a bootstrap 95%
confidence interval. Two phases:

* ``during``: inside a polynomial schedule that changes the target every 10 steps, so one step
  in ten recomputes the masks (under ``lax.cond``: the other steps skip it);
* ``after``: past the schedule's end, masks fixed (the steady state of fine-tuning).

Variants of ``prune``: the defaults; ``lean`` (``check_finite=False, mask_gradients=False``);
``fixed`` / ``fixed-lean`` (``masks=`` given instead of a schedule: no ``lax.cond``, "after" only).
Each is measured with both steps jitted plainly ("copied": every output is a new buffer) and with
``donate_argnums=(0, 1)`` on both ("donated": params and state updated in place, unchanged masks
stay where they are). Next to the clocks, ``hlo_traffic_mb`` adds up the operand and result bytes
of the compiled step's top-level instructions: a load-independent estimate of the memory traffic
that explains most of the ratio on these memory-bound steps.

Two models: a wider MLP whose step takes several milliseconds (where fixed costs are small next to
the work) and LeNet-300-100 on digits (tiny steps make every fixed cost visible; jaxpruner reports
0.84 on a digits MLP).

    python benchmarks/pruning_overhead.py           # full
    python benchmarks/pruning_overhead.py --quick   # LeNet after the schedule only (~15 s)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.demo import MLP
from jcompress.pruning import magnitude_masks, polynomial_schedule, prune

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


def make_step(tx, loss_fn, *, donate: bool):
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # Donating params and state lets XLA update them in place (and keep unchanged masks where
    # they are instead of copying them to a new output buffer).
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def fresh(tree):
    """A copy that a donating step may consume, so every block starts from the same state."""
    return jax.tree.map(jnp.copy, tree)


def time_block(step, params, state, n: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of ``n`` steps."""
    params, state = fresh(params), fresh(state)
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


_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*?)\)(?:,|$)")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "conditional"}


def hlo_traffic_mb(compiled) -> float:
    """A load-independent estimate of a step's memory traffic: the bytes of the operands and
    results of every top-level instruction of the compiled HLO (the not-taken branch of a
    ``lax.cond`` is not counted; a gather counts its whole table)."""
    entry = re.search(r"^ENTRY .*?^}", compiled.as_text(), re.M | re.S).group(0)
    sizes, total = {}, 0
    for line in entry.splitlines()[1:]:
        if not (m := _INSTRUCTION.match(line)):
            continue
        name, shape, op, operands = m.groups()
        sizes[name] = sum(
            _BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
            for t, dims in _SHAPE.findall(shape)
        )
        if op not in _FREE:
            total += sizes[name] + sum(sizes.get(o, 0) for o in re.findall(r"%([\w.-]+)", operands))
    return total / 1e6


# prune's options: the defaults; "lean" (no per-step NaN/Inf read of the gradients, no gradient
# masking before the inner optimizer: only the final select is left); "fixed" and "fixed-lean"
# fine-tune with masks= given (no schedule, no lax.cond), measured in the "after" phase only.
LEAN = {"check_finite": False, "mask_gradients": False}
VARIANTS = {"default": {}, "lean": LEAN, "fixed": {}, "fixed-lean": LEAN}


def load() -> float:
    return os.getloadavg()[0]


def measure(name: str, phase: str, *, donate: bool, repeats: int, steps: int) -> list[dict]:
    """One plain step against every prune variant of ``phase``, interleaved."""
    params, loss_fn = make_problem(name)
    schedule = polynomial_schedule(0.9, begin_step=0, end_step=END_STEP, update_every=UPDATE_EVERY)
    contenders = {"plain": (optax.adam(1e-3), None)}
    for variant, options in VARIANTS.items():
        if variant.startswith("fixed"):
            if phase == "after":
                masks = magnitude_masks(params, 0.9)
                contenders[variant] = (prune(optax.adam(1e-3), masks=masks, **options), None)
        else:
            # "during": the target changes at step 10; "after": the count is past the end.
            count = jnp.int32(1 if phase == "during" else END_STEP)
            contenders[variant] = (prune(optax.adam(1e-3), schedule=schedule, **options), count)
    starts, steps_of, traffic = {}, {}, {}
    for key, (tx, count) in contenders.items():
        state = tx.init(params)
        if count is not None:
            state = state._replace(count=count)
        step = make_step(tx, loss_fn, donate=donate)
        traffic[key] = hlo_traffic_mb(step.lower(params, state).compile())
        # Compile and warm up; for "after", the first step computes the final masks.
        starts[key], steps_of[key] = step(fresh(params), state), step
        for _ in range(3):
            time_block(step, *starts[key], 2)

    times = {key: [] for key in contenders}
    load_before = load()
    for r in range(repeats):
        # Every block starts from the same states: "during" blocks cross the same number of
        # target changes (steps // UPDATE_EVERY of them).
        order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for key in order:
            times[key].append(time_block(steps_of[key], *starts[key], steps))
    loads = [round(load_before, 2), round(load(), 2)]
    plain_times = np.array(times.pop("plain"))
    rows = []
    for variant, prune_times in times.items():
        prune_times = np.array(prune_times)
        row = {
            "model": name,
            "phase": phase,
            "variant": variant,
            "donate": donate,
            "steps_per_block": steps,
            "repeats": repeats,
            "update_every": UPDATE_EVERY,
            "load_average_1min": loads,
            "hlo_traffic_mb": {"plain": traffic["plain"], "prune": traffic[variant]},
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
        rows.append(row)
    return rows


def format_row(row: dict) -> str:
    donate = "donated" if row["donate"] else "copied"
    parts = [f"{row['model']:>14} {row['phase']:>6} {row['variant']:>10} {donate:>7}:"]
    for clock in ("wall", "cpu"):
        c = row[clock]
        parts.append(
            f"{clock} {c['plain_step_ms']:.3f}/{c['prune_step_ms']:.3f} ms ratio "
            f"{c['ratio_median']:.3f} [{c['ratio_ci95'][0]:.3f}, {c['ratio_ci95'][1]:.3f}]"
        )
    traffic = row["hlo_traffic_mb"]
    parts.append(f"HLO {traffic['plain']:.1f}/{traffic['prune']:.1f} MB")
    parts.append(f"load {row['load_average_1min']}")
    return "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, wide_steps, lenet_steps = (4, 10, 50) if args.quick else (31, 40, 400)

    rows = []
    for name, steps in (("wide-mlp", wide_steps), ("lenet-300-100", lenet_steps)):
        if args.quick and name == "wide-mlp":
            continue  # --quick: LeNet after the schedule only (each variant is a compilation)
        for phase in ("after",) if args.quick else ("during", "after"):
            for donate in (False, True):
                for row in measure(name, phase, donate=donate, repeats=repeats, steps=steps):
                    rows.append(row)
                    print(format_row(row), flush=True)

    print()
    print(
        "| model | phase | prune options | params, state | clock | plain step (ms) "
        "| prune step (ms) | plain/prune median [95% CI] | HLO traffic plain/prune (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for clock in ("wall", "cpu"):
            c, traffic = r[clock], r["hlo_traffic_mb"]
            print(
                f"| {r['model']} | {r['phase']} | {r['variant']} | "
                f"{'donated' if r['donate'] else 'copied'} | {clock} | "
                f"{c['plain_step_ms']:.3f} | {c['prune_step_ms']:.3f} | {c['ratio_median']:.3f} "
                f"[{c['ratio_ci95'][0]:.3f}, {c['ratio_ci95'][1]:.3f}] | "
                f"{traffic['plain']:.1f} / {traffic['prune']:.1f} |"
            )
    result = {
        "benchmark": "pruning_overhead",
        "quick": args.quick,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()[:1]],
        "machine": platform.machine(),
        "note": "shared, noisy machine: compare ratios, not absolute times. 'cpu' is the "
        "process CPU time of all threads (robust to other jobs), 'wall' the elapsed time; "
        f"'during' recomputes the masks every {UPDATE_EVERY} steps; 'donated': both steps are "
        "jitted with donate_argnums=(0, 1); hlo_traffic_mb: operand + result bytes of the "
        "compiled step's top-level instructions (a load-independent estimate)",
        "rows": rows,
    }
    out = pathlib.Path(__file__).parent / "results" / "pruning_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
