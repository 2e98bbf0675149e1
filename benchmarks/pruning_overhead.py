"""Training throughput with ``prune(...)`` around adam vs the same plain optax loop.

Table ``scan`` (the reference measurement): an MLP 64-1024-1024-10 on a fixed batch of 64,
adam(1e-3), ``prune`` with gradual magnitude pruning to 90%
(``polynomial_schedule(0.9, ..., update_every=100)``), 2000 steps in ONE jitted ``lax.scan`` (the
loop carry is updated in place, as in a real training loop; no per-call dispatch), the same
scan for plain adam. Rows:

* ``after``: the count is past the schedule's end and the final masks are in the state (the
  steady state of fine-tuning): the defaults, ``lean`` (``check_finite=False,
  mask_gradients=False``) and ``fixed`` (``masks=`` given instead of a schedule);
* ``during``: the schedule is active and changes its target every 100 steps, so 20 of the 2000
  steps recompute the masks (a ranking of every weight, under ``lax.cond``); reported
  separately, with the cost of one recomputation estimated from the two rows.

Table ``step``: the same with one jitted step per call (blocks of steps, the state copied or
donated with ``donate_argnums=(0, 1)``), on the wide MLP and on LeNet-300-100, where fixed
per-call costs show.

Ratios are ``plain time / prune time`` (1.0 = no overhead): the median over interleaved rounds
of the per-round ratio, with a bootstrap 95% interval, wall clock and process CPU time (all
threads), timed and noise-checked by ``benchmarks/_harness.py``.

    python benchmarks/pruning_overhead.py           # full
    python benchmarks/pruning_overhead.py --quick   # short scans, one model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run, Timed, bootstrap_ci

from jcompress.demo import MLP
from jcompress.pruning import magnitude_masks, polynomial_schedule, prune

UPDATE_EVERY = 100
END_STEP = 1_000_000  # "during": never reached; "after": the count is set past it
LEAN = {"check_finite": False, "mask_gradients": False}


def make_problem(name: str):
    features, inputs = {"mlp": ((1024, 1024, 10), 64), "lenet": ((300, 100, 10), 64)}[name]
    model = MLP(features)
    x = jax.random.normal(jax.random.key(0), (64, inputs))
    y = jax.random.randint(jax.random.key(1), (64,), 0, 10)
    params = model.init(jax.random.key(2), x[:1])["params"]

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss_fn


def contenders(params, phase: str) -> dict[str, tuple]:
    """``{name: (transform, count to start from or None)}``, plain adam first."""
    schedule = polynomial_schedule(0.9, begin_step=0, end_step=END_STEP, update_every=UPDATE_EVERY)
    count = 1 if phase == "during" else END_STEP  # during: the first change comes at step 100
    out = {"plain": (optax.adam(1e-3), None)}
    out["default"] = (prune(optax.adam(1e-3), schedule=schedule), count)
    if phase == "after":
        out["lean"] = (prune(optax.adam(1e-3), schedule=schedule, **LEAN), count)
        masks = magnitude_masks(params, 0.9)
        out["fixed"] = (prune(optax.adam(1e-3), masks=masks), None)
    return out


def _step(tx, loss_fn):
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _start(tx, count, params, run_once):
    """The state to start every timed call from: at ``count``, final masks in place (after)."""
    state = tx.init(params)
    if count is not None:
        state = state._replace(count=jnp.int32(count))
        if count == END_STEP:  # one step computes the final masks; start from them
            _, state = run_once(params, state)
            state = state._replace(count=jnp.int32(count))
    return state


def _ratios(times, name: str) -> dict:
    out = {}
    for clock, samples in (("wall", times.samples), ("cpu", times.cpu_samples)):
        r = np.asarray(samples["plain"]) / np.asarray(samples[name])
        out[clock] = {"median": float(np.median(r)), "ci95": bootstrap_ci(r)}
    return out


def _fmt(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['median']:.3f} [{lo:.3f}, {hi:.3f}]"


def scan_table(run, steps: int, repeats: int) -> None:
    params, loss_fn = make_problem("mlp")
    title = f"MLP 64-1024-1024-10, adam, GMP to 90%: {steps} steps in one lax.scan, plain / prune"
    columns = ["phase", "prune options", "plain ms/step", "prune ms/step", "wall [95% CI]"]
    columns.append("CPU [95% CI]")
    with run.table("scan", title, columns) as t:
        after_ms = None
        for phase in ("after", "during"):
            calls = {}
            for name, (tx, count) in contenders(params, phase).items():
                step = _step(tx, loss_fn)
                scan = jax.jit(lambda p, s, step=step: lax.scan(
                    lambda c, _: (step(*c), None), (p, s), None, length=steps)[0])  # fmt: skip
                state = _start(tx, count, params, jax.jit(step))
                calls[name] = Timed(lambda scan=scan, state=state: scan(params, state))
            times = run.interleaved(calls, repeats=repeats, min_sample_s=0.0)
            for name in calls:
                if name == "plain":
                    continue
                r = _ratios(times, name)
                ms = {k: 1e3 * times.wall[k] / steps for k in ("plain", name)}
                t.row(
                    [phase, name, ms["plain"], ms[name], _fmt(r["wall"]), _fmt(r["cpu"])],
                    data={"ratios": r, **times.as_dict()},
                )
                if phase == "after" and name == "default":
                    after_ms = ms[name]
                if phase == "during":
                    recomputes = steps // UPDATE_EVERY
                    extra = (ms[name] - after_ms) * steps / recomputes
                    t.note(
                        f"during: {recomputes} of the {steps} steps recompute the masks; one "
                        f"recomputation costs about {extra:.1f} ms (from the two default rows)"
                    )


def step_table(run, models: list[tuple[str, int]], repeats: int) -> None:
    title = "one jitted step per call (blocks of steps), after the schedule, plain / prune"
    columns = ["model", "params, state", "prune options", "plain ms/step", "wall [95% CI]"]
    columns.append("CPU [95% CI]")
    with run.table("step", title, columns) as t:
        for model, block in models:
            params, loss_fn = make_problem(model)
            for donate in (False, True):
                calls = {}
                for name, (tx, count) in contenders(params, "after").items():
                    step = jax.jit(_step(tx, loss_fn), donate_argnums=(0, 1) if donate else ())
                    state = _start(tx, count, params, jax.jit(_step(tx, loss_fn)))

                    def run_block(p, s, step=step, block=block):
                        for _ in range(block):
                            p, s = step(p, s)
                        return p, s

                    fresh = lambda p=params, s=state: jax.tree.map(jnp.copy, (p, s))
                    calls[name] = Timed(run_block, prepare=fresh, calls=block)
                times = run.interleaved(calls, repeats=repeats, min_sample_s=0.0)
                for name in calls:
                    if name == "plain":
                        continue
                    r = _ratios(times, name)
                    t.row(
                        [model, "donated" if donate else "copied", name,
                         1e3 * times.wall["plain"], _fmt(r["wall"]), _fmt(r["cpu"])],
                        data={"ratios": r, **times.as_dict()},
                    )  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run = Run("pruning_overhead", script=__file__, argv=argv, quick=args.quick)
    if args.quick:
        scan_table(run, steps=200, repeats=3)
        step_table(run, [("lenet", 20)], repeats=3)
    else:
        scan_table(run, steps=2000, repeats=5)
        step_table(run, [("mlp", 40), ("lenet", 400)], repeats=9)
    run.finish()


if __name__ == "__main__":
    main()
