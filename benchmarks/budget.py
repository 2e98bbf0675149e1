"""Per-layer budgets (issue 15): allocated mixed precision vs the best uniform setting that fits.

For three models and five seeds, ``jc.budget.sensitivity(method="measure")`` measures, for every
kernel and every option, the KL divergence of the logits when that kernel alone is quantized;
``allocate(..., ratio=r)`` picks one option per kernel (an exact knapsack) for 1/r of the float32
bytes and ``compress`` applies it. The baseline is the BEST uniform setting (the same option for
every kernel) whose bytes fit the same budget, chosen by its measured test accuracy / held-out
perplexity (an oracle choice that favours the baseline). Bytes are the true packed ``nbytes``
(int3 is stored in int4, scales and zero points counted) over the same selected kernels, the
accounting ``allocate`` uses; the allocated bytes are checked against the compressed tree.
A second comparison gives the allocation exactly the bytes of that uniform setting
(``allocate(max_bytes=...)``), so any win there is not bought with more bytes.

* digits LeNet-300-100 (``DigitsTask``; the seed changes the split, initialisation and batch
  order): test accuracy;
* the digits CNN of ``examples/05_shrink_cnn.py`` (``jcompress.demo.CNN``, same seeding): test
  accuracy;
* the committed char LM (``load_charlm``; fixed weights): held-out perplexity; the seed draws the
  calibration windows (sensitivity, SparseGPT) and a random half of the held-out windows.

Options: float, int8/int4/int3/int2 per output channel, int4/int3/int2 per group (the largest
group size in 16..64 that divides the kernel's group axis: 64 for the char LM, 64/60/50 for the
MLP, 16/64/64 for the CNN, none for its 1-input-channel first conv, which then takes the
per-channel setting of the same bits in the uniform "per-group" rows). Symmetric, MSE-calibrated
clipping, round to nearest (no GPTQ) everywhere. Uniform settings: int8, int4, int3, int2 per
channel and int4, int3, int2 per group (float32 never fits).

Sparsity (char LM, 70 % of the kernels' weights): per-layer sparsities allocated from a
magnitude-pruning sensitivity (options 0.5..0.9 and dense), applied by magnitude and by
SparseGPT (which takes the per-layer rules), vs uniform 70 % per layer by magnitude and by
SparseGPT (plus one global magnitude threshold, itself a non-uniform allocation).

Then, as a separate result (``results/budget.timing.json``: a timing, so it needs a quiet
machine), ``sensitivity`` with ``method="measure"`` and ``"fisher"`` vs quantizing once, on a
~100M-parameter stand-in (six 4096² layers).

    python benchmarks/budget.py                # the study, then the timing (~7 min on 2 cores)
    python benchmarks/budget.py --only-timing  # the timing table alone (quiet machine)
    python benchmarks/budget.py --quick        # 1 seed, ratio 8, small data (a smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run

from jcompress import tree as jtree
from jcompress.budget import Sensitivity, allocate, compress, sensitivity
from jcompress.demo import (
    CNN,
    DigitsTask,
    accuracy,
    calibration_windows,
    charlm_perplexity,
    cross_entropy_loss,
    fit,
    heldout_windows,
    load_charlm,
    load_digits,
)
from jcompress.pruning import apply_masks, magnitude_masks, sparsegpt
from jcompress.pruning import sparsity as sparsity_of
from jcompress.quantization import MSE, PerChannel, PerGroup, QuantSpec, dequantize, quantize

KERNELS = r".*kernel"
RATIOS = (6, 8, 10)
CHANNEL_BITS = (8, 4, 3, 2)
GROUP_BITS = (4, 3, 2)
UNIFORM = tuple(f"int{b} ch" for b in CHANNEL_BITS) + tuple(f"int{b} grp" for b in GROUP_BITS)
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
TARGET_SPARSITY = 0.7
_NA = 2**62  # the cost of an option a leaf does not have: never fits a budget


# ------------------------------------------------------------------------------------------------
# options per leaf, sensitivity per leaf group, merged into one Sensitivity
# ------------------------------------------------------------------------------------------------


def group_size(n: int) -> int | None:
    """The largest group size in 16..64 that divides ``n`` (``None``: none does)."""
    return next((g for g in range(64, 15, -1) if n % g == 0), None)


def leaf_options(leaf: Any, role: jtree.Role) -> tuple[dict[str, Any], dict[str, str]]:
    """``({option name: spec}, {uniform setting: option name})`` for one kernel."""
    options: dict[str, Any] = {"float": None}
    family: dict[str, str] = {}
    for b in CHANNEL_BITS:
        options[f"int{b}"] = QuantSpec(bits=b, granularity=PerChannel(), calibration=MSE())
        family[f"int{b} ch"] = f"int{b}"
    g = group_size(leaf.shape[role.group_axis])
    for b in GROUP_BITS:
        if g is None:  # no group size divides this kernel: per-channel at the same bits
            family[f"int{b} grp"] = f"int{b}"
            continue
        name = f"int{b} g{g}"
        options[name] = QuantSpec(bits=b, granularity=PerGroup(g), calibration=MSE())
        family[f"int{b} grp"] = name
    return options, family


@dataclasses.dataclass
class Options:
    """Every selected kernel's options and uniform settings."""

    paths: tuple[str, ...]
    options: dict[str, dict[str, Any]]  # path -> {name: spec}
    family: dict[str, dict[str, str]]  # path -> {uniform setting: option name}

    @classmethod
    def of(cls, params: Any, where: Any) -> Options:
        chosen = jtree.selection(params, where, what="budget")
        options, family = {}, {}
        for p in chosen.paths:
            options[p], family[p] = leaf_options(jtree.unwrap(chosen.leaves[p]), chosen.roles[p])
        return cls(tuple(chosen.paths), options, family)

    def uniform_rules(self, setting: str) -> list[tuple[str, Any]]:
        return [(re.escape(p), self.options[p][self.family[p][setting]]) for p in self.paths]


def measure(fn: Callable, params: Any, batches: list, opts: Options) -> Sensitivity:
    """``sensitivity(method="measure")`` once per set of kernels sharing the same options
    (a group size must divide each kernel), merged into one :class:`Sensitivity` whose options
    are the union; a kernel lacks the others (cost ``_NA``: ``allocate`` never picks them)."""
    by_options: dict[tuple[str, ...], list[str]] = {}
    for p in opts.paths:
        by_options.setdefault(tuple(opts.options[p]), []).append(p)
    parts = []
    for paths in by_options.values():
        where = "|".join(re.escape(p) for p in paths)
        options = opts.options[paths[0]]
        parts.append(sensitivity(fn, params, batches, options, where=where, quiet=True))
    union: dict[str, Any] = {}
    for s in parts:
        for name, spec in s.options.items():
            union.setdefault(name, spec)
    increase = {p: {n: math.inf for n in union} for p in opts.paths}
    cost = {p: {n: _NA for n in union} for p in opts.paths}
    float_bytes, sizes = {}, {}
    for s in parts:
        for p in s.paths:
            increase[p].update(s.increase[p])
            cost[p].update(s.cost[p])
            float_bytes[p], sizes[p] = s.float_bytes[p], s.sizes[p]
    return Sensitivity("quantization", union, opts.paths, increase, cost, float_bytes, sizes)


def stored_bytes(tree: Any, paths: tuple[str, ...]) -> int:
    """True packed bytes of the leaves ``paths`` of a (partly) quantized tree."""
    leaves = dict(jtree.leaves_with_paths(tree))
    return sum(int(leaves[p].nbytes) for p in paths)


def picked(sens: Sensitivity, rules: list[tuple[str, Any]]) -> dict[str, str]:
    """``{path: option name}`` of allocated rules (one exact-path rule per leaf, in order)."""
    out = {}
    for p, (_, spec) in zip(sens.paths, rules):
        out[p] = next(n for n, o in sens.options.items() if o == spec and sens.cost[p][n] < _NA)
    return out


# ------------------------------------------------------------------------------------------------
# the models
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """One trained (or loaded) model of one seed: ``fn(params, x)``, calibration batches and the
    quality measure ``evaluate(float params) -> float`` (higher is better unless ``lower``)."""

    name: str
    fn: Callable
    params: Any
    batches: list
    evaluate: Callable[[Any], float]
    metric: str
    lower: bool
    where: Any = None


def digits_mlp(seed: int, quick: bool) -> Model:
    task = DigitsTask.load(seed=seed)
    params, _ = fit(
        task.loss,
        optax.adam(1e-3),
        task.init(seed),
        task.data,
        epochs=5 if quick else 30,
        seed=seed,
    )
    apply = jax.jit(task.apply)
    x = jnp.asarray(task.data.x_train)
    batches = [(x[i : i + 256],) for i in range(0, 512, 256)]
    return Model(
        "digits MLP",
        task.apply,
        params,
        batches,
        lambda p: 100 * task.accuracy(p, apply),
        "accuracy %",
        False,
    )


def digits_cnn(seed: int, quick: bool) -> Model:
    data = load_digits(seed=seed)
    model = CNN()
    x_test = jnp.asarray(data.images("test"))

    def fn(p, x):
        return model.apply({"params": p}, x)

    params = jax.jit(model.init)(jax.random.key(seed), x_test[:1])["params"]
    params, _ = fit(
        cross_entropy_loss(fn),
        optax.adam(3e-3),
        params,
        (data.images("train"), data.y_train),
        steps=100 if quick else 800,
        seed=seed,
    )
    apply = jax.jit(fn)
    x = jnp.asarray(data.images("train"))
    batches = [(x[i : i + 256],) for i in range(0, 512, 256)]

    def evaluate(p):
        return 100 * float(accuracy(apply(p, x_test), data.y_test))

    return Model("digits CNN", fn, params, batches, evaluate, "accuracy %", False)


def charlm(seed: int, quick: bool) -> Model:
    model, params = load_charlm()

    def fn(p, x):
        return model.apply({"params": p}, x)

    apply = jax.jit(fn)
    everything = heldout_windows()
    rng = np.random.default_rng(1000 + seed)
    n = 128 if quick else len(everything) // 2
    windows = everything[np.sort(rng.choice(len(everything), n, replace=False))]
    batches = calibration_windows(32 if quick else 64, batch=16, seed=seed)
    return Model(
        "char LM",
        fn,
        params,
        batches,
        lambda p: charlm_perplexity(apply, p, windows),
        "perplexity",
        True,
        where=KERNELS,
    )


MODELS = {"mlp": digits_mlp, "cnn": digits_cnn, "charlm": charlm}


# ------------------------------------------------------------------------------------------------
# the bit-width study
# ------------------------------------------------------------------------------------------------


def bitwidth_seed(m: Model, ratios: tuple[int, ...]) -> dict[str, Any]:
    """One seed of one model: the float quality, every uniform setting, the allocation per
    ratio."""
    opts = Options.of(m.params, m.where)
    sens = measure(m.fn, m.params, m.batches, opts)
    float_bytes = sum(sens.float_bytes.values())
    out: dict[str, Any] = {"float": m.evaluate(m.params), "float_bytes": float_bytes}
    uniform = {}
    for setting in UNIFORM:
        rules = opts.uniform_rules(setting)
        q = compress(m.params, rules)
        nbytes = stored_bytes(q, opts.paths)
        predicted = sum(sens.cost[p][opts.family[p][setting]] for p in opts.paths)
        assert nbytes == predicted, (setting, nbytes, predicted)
        uniform[setting] = {"bytes": nbytes, "value": m.evaluate(dequantize(q))}
    out["uniform"] = uniform
    out["ratios"] = {}
    for r in ratios:
        budget = int(float_bytes / r)  # what allocate(ratio=r) computes
        rules = allocate(sens, ratio=r)
        q = compress(m.params, rules)
        nbytes = stored_bytes(q, opts.paths)
        choice = picked(sens, rules)
        predicted = sum(sens.cost[p][choice[p]] for p in opts.paths)
        assert nbytes == predicted <= budget, (r, nbytes, predicted, budget)
        fits = {k: v for k, v in uniform.items() if v["bytes"] <= budget}
        best = None
        if fits:
            sign = 1 if m.lower else -1
            best = min(fits, key=lambda k, fits=fits: sign * fits[k]["value"])
        same = None
        if best is not None:  # the allocation given exactly the uniform setting's bytes
            rules = allocate(sens, max_bytes=uniform[best]["bytes"])
            q_same = compress(m.params, rules)
            same_bytes = stored_bytes(q_same, opts.paths)
            assert same_bytes <= uniform[best]["bytes"], (r, same_bytes, uniform[best])
            same = {
                "bytes": same_bytes,
                "value": m.evaluate(dequantize(q_same)),
                "choice": picked(sens, rules),
            }
        out["ratios"][r] = {
            "budget": budget,
            "allocated": {"bytes": nbytes, "value": m.evaluate(dequantize(q)), "choice": choice},
            "uniform": best,
            "allocated_at_uniform_bytes": same,
        }
    return out


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}" if xs[0] < 100 else f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def worse(value: float, reference: float, lower: bool) -> bool:
    """``value`` is strictly worse than ``reference`` (ties are not)."""
    return value > reference if lower else value < reference


def summarize_bitwidth(model: str, m: Model, seeds: list[dict], ratios) -> list[dict]:
    """One row per ratio: means over seeds; wins counted per seed."""
    rows = []
    base = [s["float"] for s in seeds]
    for r in ratios:
        alloc = [s["ratios"][r]["allocated"] for s in seeds]
        best = [s["ratios"][r]["uniform"] for s in seeds]
        uni = [s["uniform"][b] if b else None for s, b in zip(seeds, best)]
        same = [s["ratios"][r]["allocated_at_uniform_bytes"] for s in seeds]
        wins, wins_same, half = 0, 0, 0
        for s, a, u, e in zip(seeds, alloc, uni, same):
            if u is None:
                wins += 1
                continue
            wins += not worse(a["value"], u["value"], m.lower)
            wins_same += not worse(e["value"], u["value"], m.lower)
            if m.lower:
                half += (a["value"] - s["float"]) <= 0.5 * (u["value"] - s["float"])
        ratio_a = [s["float_bytes"] / a["bytes"] for s, a in zip(seeds, alloc)]
        ratio_u = [s["float_bytes"] / u["bytes"] for s, u in zip(seeds, uni) if u]
        row = {
            "model": model,
            "ratio": r,
            "metric": m.metric,
            "float": base,
            "allocated": [a["value"] for a in alloc],
            "allocated_bytes": [a["bytes"] for a in alloc],
            "allocated_ratio": ratio_a,
            "uniform_setting": best,
            "uniform": [u["value"] if u else None for u in uni],
            "uniform_bytes": [u["bytes"] if u else None for u in uni],
            "uniform_ratio": ratio_u,
            "wins": wins,
            "seeds": len(seeds),
            "choices": [a["choice"] for a in alloc],
            "allocated_at_uniform_bytes": [e["value"] if e else None for e in same],
            "allocated_at_uniform_bytes_bytes": [e["bytes"] if e else None for e in same],
            "wins_at_uniform_bytes": wins_same,
        }
        if m.lower:
            inc_a = [a["value"] - s["float"] for s, a in zip(seeds, alloc)]
            inc_u = [u["value"] - s["float"] for s, u in zip(seeds, uni) if u]
            row["allocated_increase"], row["uniform_increase"] = inc_a, inc_u
            row["allocated_at_uniform_bytes_increase"] = [
                e["value"] - s["float"] for s, e in zip(seeds, same) if e
            ]
            row["increase_le_half"] = half
        rows.append(row)
    return rows


def bitwidth(run: Run, quick: bool, seeds: list[int], ratios: tuple[int, ...]) -> list[dict]:
    summary = []
    for key, make in MODELS.items():
        per_seed = []
        for seed in seeds:
            start = time.perf_counter()
            m = make(seed, quick)
            per_seed.append(bitwidth_seed(m, ratios))
            s = per_seed[-1]
            line = "  ".join(
                f"{r}x alloc {s['ratios'][r]['allocated']['value']:.3f} vs "
                f"{s['ratios'][r]['uniform']} "
                f"{s['uniform'][s['ratios'][r]['uniform']]['value']:.3f}"
                if s["ratios"][r]["uniform"]
                else f"{r}x alloc {s['ratios'][r]['allocated']['value']:.3f} (no uniform fits)"
                for r in ratios
            )
            print(
                f"  {m.name} seed {seed}: float {s['float']:.3f}  {line}  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        summary += summarize_bitwidth(key, m, per_seed, ratios)
        run.extra.setdefault("bitwidth_per_seed", {})[key] = per_seed
    title = (
        f"allocated mixed precision vs the best uniform setting that fits the same bytes "
        f"({len(seeds)} seed(s), mean ± std; RTN, MSE clipping)"
    )
    cols = [
        "model",
        "vs float32",
        "metric",
        "float32",
        "allocated",
        "alloc. bytes (ratio)",
        "best fitting uniform",
        "uniform",
        "unif. bytes (ratio)",
        "allocated ≥ uniform (seeds)",
        "allocated at the uniform's bytes",
        "≥ uniform at the same bytes (seeds)",
    ]
    with run.table("bitwidth", title, cols, timed=False) as t:
        for r in summary:
            uni = [u for u in r["uniform"] if u is not None]
            ub = [b for b in r["uniform_bytes"] if b is not None]
            same = [v for v in r["allocated_at_uniform_bytes"] if v is not None]
            t.row(
                [
                    r["model"],
                    f"{r['ratio']}x",
                    r["metric"],
                    mean_std(r["float"]),
                    mean_std(r["allocated"]),
                    f"{statistics.mean(r['allocated_bytes']):.0f} "
                    f"({statistics.mean(r['allocated_ratio']):.2f}x)",
                    ", ".join(sorted(set(u or "none fits" for u in r["uniform_setting"]))),
                    mean_std(uni) if uni else "n/a",
                    f"{statistics.mean(ub):.0f} ({statistics.mean(r['uniform_ratio']):.2f}x)"
                    if ub
                    else "n/a",
                    f"{r['wins']}/{r['seeds']}",
                    mean_std(same) if same else "n/a",
                    f"{r['wins_at_uniform_bytes']}/{len(same)}" if same else "n/a",
                ],
                data=r,
            )
        t.note(
            "ratio = float32 bytes of the selected kernels / packed bytes; the uniform setting "
            "is the one with the best test metric among those whose bytes fit 1/ratio (an "
            "oracle pick among 7 settings, which favours it); '≥ uniform' counts seeds where "
            "allocated is at least as good (ties count); 'allocated at the uniform's bytes' is "
            "allocate(max_bytes=) with exactly that setting's bytes"
        )
    lm = [r for r in summary if r["model"] == "charlm"]
    cols = [
        "vs float32",
        "allocated increase",
        "best fitting uniform increase",
        "alloc. ≤ half of uniform (seeds)",
        "mean ratio of increases",
        "allocated at the uniform's bytes increase",
    ]
    title = "char LM: perplexity increase over float32, allocated vs best fitting uniform"
    with run.table("charlm_goal", title, cols, timed=False) as t:
        for r in lm:
            pairs = [
                (a, u)
                for a, u in zip(r["allocated_increase"], r["uniform_increase"])
                if u is not None
            ]
            frac = statistics.mean(a / u for a, u in pairs) if pairs else float("nan")
            t.row(
                [
                    f"{r['ratio']}x",
                    mean_std(r["allocated_increase"]),
                    mean_std(r["uniform_increase"]),
                    f"{r['increase_le_half']}/{r['seeds']}",
                    f"{frac:.2f}",
                    mean_std(r["allocated_at_uniform_bytes_increase"]),
                ],
                data=r,
            )
        t.note("goal (issue 15): at 8x the allocated increase is at most half the uniform one")
    return summary


# ------------------------------------------------------------------------------------------------
# the sparsity study
# ------------------------------------------------------------------------------------------------


def sparsity_seed(m: Model) -> dict[str, Any]:
    options = {f"{s:.0%}": s for s in SPARSITIES} | {"dense": None}
    sens = sensitivity(m.fn, m.params, m.batches, options, where=m.where, quiet=True)
    rules = allocate(sens, sparsity=TARGET_SPARSITY)
    choice = {p: (f"{o:.0%}" if o is not None else "dense") for p, (_, o) in zip(sens.paths, rules)}
    t = TARGET_SPARSITY
    variants = {
        "magnitude, uniform 70% per layer": apply_masks(
            m.params, magnitude_masks(m.params, t, where=m.where)
        ),
        "magnitude, one global threshold": apply_masks(
            m.params, magnitude_masks(m.params, t, scope="global", where=m.where)
        ),
        "magnitude, allocated per layer": compress(m.params, rules),
        "SparseGPT, uniform 70% per layer": sparsegpt(
            m.fn, m.params, m.batches, t, where=m.where, quiet=True
        )[0],
        "SparseGPT, allocated per layer": sparsegpt(
            m.fn, m.params, m.batches, rules, where=m.where, quiet=True
        )[0],
    }
    out = {"float": m.evaluate(m.params), "choice": choice, "variants": {}}
    for name, p in variants.items():
        out["variants"][name] = {
            "value": m.evaluate(p),
            "sparsity": float(sparsity_of(p, where=m.where)),
        }
    return out


def sparsity_study(run: Run, quick: bool, seeds: list[int]) -> dict:
    per_seed = []
    for seed in seeds:
        start = time.perf_counter()
        per_seed.append(sparsity_seed(charlm(seed, quick)))
        v = per_seed[-1]["variants"]
        print(
            f"  char LM sparsity seed {seed}: "
            + "  ".join(f"{k}: {x['value']:.3f}" for k, x in v.items())
            + f"  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    run.extra["sparsity_per_seed"] = per_seed
    title = (
        f"char LM, 70% of the kernels' weights pruned: held-out perplexity "
        f"({len(seeds)} seed(s), mean ± std; no fine-tuning)"
    )
    cols = ["method", "perplexity", "increase", "sparsity", "better than its uniform (seeds)"]
    base = [s["float"] for s in per_seed]
    with run.table("sparsity", title, cols, timed=False) as t:
        t.row(["float32", mean_std(base), "0", "0", ""])
        for name in per_seed[0]["variants"]:
            vals = [s["variants"][name]["value"] for s in per_seed]
            inc = [v - b for v, b in zip(vals, base)]
            sp = statistics.mean(s["variants"][name]["sparsity"] for s in per_seed)
            wins = ""
            if "allocated" in name:
                ref = name.replace("allocated per layer", "uniform 70% per layer")
                n = sum(
                    s["variants"][name]["value"] <= s["variants"][ref]["value"] for s in per_seed
                )
                wins = f"{n}/{len(per_seed)}"
            t.row([name, mean_std(vals), mean_std(inc), f"{sp:.4f}", wins], data=vals)
        t.note(
            "allocation from a magnitude-pruning sensitivity (options 50..90% and dense per "
            "kernel), used for both magnitude and SparseGPT; calibration: the seed's windows"
        )
    return {"choices": [s["choice"] for s in per_seed]}


# ------------------------------------------------------------------------------------------------
# timing (a separate result: its numbers are only meaningful on a quiet machine)
# ------------------------------------------------------------------------------------------------


def timing(run: Run, quick: bool) -> None:
    """Seconds of ``sensitivity(method="measure")`` and ``method="fisher"`` vs one
    ``quantize(params, QuantSpec(bits=4))`` on a stand-in of six 4096² layers (~100M
    parameters; 1024² with ``--quick``), two synthetic batches of 8 rows, options
    int8/int4/int2 per channel (abs-max)."""
    width, layers = (1024, 6) if quick else (4096, 6)
    keys = jax.random.split(jax.random.key(0), layers + 2)
    params = {
        f"layer_{i}": {"kernel": jax.random.normal(keys[i], (width, width)) / math.sqrt(width)}
        for i in range(layers)
    }

    def fn(p, x):
        for i in range(layers):
            x = jax.nn.gelu(x @ p[f"layer_{i}"]["kernel"])
        return x

    batches = [(jax.random.normal(k, (8, width)),) for k in keys[layers:]]
    options = {f"int{b}": QuantSpec(bits=b) for b in (8, 4, 2)}
    n = sum(x.size for x in jax.tree.leaves(params))
    title = (
        f"sensitivity vs one quantize: {layers} x {width}² dense layers ({n / 1e6:.0f}M "
        "parameters), 2 batches of 8, options int8/int4/int2"
    )
    with run.table("timing", title, ["what", "seconds", "x one quantize"]) as t:
        jax.block_until_ready(quantize(params, QuantSpec(bits=4)))  # warm-up
        start = time.perf_counter()
        jax.block_until_ready(quantize(params, QuantSpec(bits=4)))
        once = time.perf_counter() - start
        t.row(["quantize(params, QuantSpec(bits=4)) (warm)", once, 1.0])
        for method in ("measure", "fisher"):
            start = time.perf_counter()
            sensitivity(fn, params, batches, options, method=method, quiet=True)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            sensitivity(fn, params, batches, options, method=method, quiet=True)
            sec = time.perf_counter() - start
            t.row([f'sensitivity(method="{method}") (warm)', sec, sec / once])
            t.row([f'sensitivity(method="{method}") (first call: compiles)', cold, cold / once])
        t.note(
            "one wall-clock run each (not interleaved medians: each call takes seconds); "
            "quantize is warm; 'warm' sensitivity reuses the compiled forward/backward"
        )


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, ratio 8, small data")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 5; --quick: 1)")
    ap.add_argument(
        "--only-timing",
        action="store_true",
        help="only the timing table (results/budget.timing.json; with --quick: a small "
        "stand-in, into results/quick/)",
    )
    args = ap.parse_args(argv)
    if not args.only_timing:
        study(argv, args)
    run = Run("budget.timing", script=__file__, argv=argv, quick=args.quick)
    timing(run, args.quick)
    run.finish()


def study(argv, args) -> None:
    run = Run("budget", script=__file__, argv=argv, quick=args.quick)
    seeds = list(range(args.seeds or (1 if args.quick else 5)))
    ratios = (8,) if args.quick else RATIOS
    summary = bitwidth(run, args.quick, seeds, ratios)
    run.extra["sparsity"] = sparsity_study(run, args.quick, seeds)
    goal = [r for r in summary if r["model"] == "charlm" and r["ratio"] == 8]
    if goal:
        g = goal[0]
        run.extra["goals"] = {
            "charlm_8x_increase_le_half_uniform_all_seeds": g["increase_le_half"] == g["seeds"],
            "allocated_wins_everywhere": all(r["wins"] == r["seeds"] for r in summary),
        }
        print("\ngoals:", run.extra["goals"])
    run.finish()


if __name__ == "__main__":
    main()
