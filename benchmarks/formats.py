"""Number formats beyond integers: NF4, learned codebooks and FP8 against the integer grids.

Three tables:

* ``charlm``: the committed char LM (every ``kernel``; embeddings and norms float), held-out
  perplexity over 5 seeds (each seed: a random half of the held-out windows and its own GPTQ
  calibration windows), and the kernels' stored bytes: NF4 vs int4 in groups of 64 (round to
  nearest and GPTQ), a 4-bit ``Codebook`` vs int4 per output channel, E4M3 vs int8 per output
  channel.
* ``deep_compression``: Deep Compression's recipe on LeNet-300-100 (digits), 5 seeds: the
  study of ``examples/09_deep_compression.py`` (prune 92 %, 5-bit per-layer codebooks with
  centroid fine-tuning vs 5-bit integers per channel with scale fine-tuning).
* ``speed``: ``jc.compressed`` on a 4096² layer at batch 1 / 16 / 256 for each format, against
  float32 and int8 per channel (interleaved medians; a speed table, so it needs a quiet
  machine: the harness marks it noisy otherwise).

    python benchmarks/formats.py                 # everything (~10 min on 2 cores)
    python benchmarks/formats.py --only speed    # the speed table alone (quiet machine)
    python benchmarks/formats.py --quick         # 1 seed, small data (a smoke test)
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, Run, bind

import jcompress as jc
from jcompress.demo._charlm import (
    calibration_windows,
    charlm_perplexity,
    heldout_windows,
    load_charlm,
)
from jcompress.quantization import (
    E4M3,
    NF4,
    Codebook,
    PerChannel,
    PerGroup,
    QuantSpec,
    dequantize,
    gptq,
    quantize,
    runtime_layout,
)

KERNELS = r".*kernel"
G64 = PerGroup(64)
VARIANTS = {  # name: (spec, GPTQ?)
    "int4 g64, RTN": (QuantSpec(bits=4, granularity=G64), False),
    "NF4 g64, RTN": (QuantSpec(format=NF4(), granularity=G64), False),
    "int4 g64, GPTQ": (QuantSpec(bits=4, granularity=G64), True),
    "NF4 g64, GPTQ": (QuantSpec(format=NF4(), granularity=G64), True),
    "int4 per channel": (QuantSpec(bits=4, granularity=PerChannel()), False),
    "Codebook 4-bit per channel": (
        QuantSpec(bits=4, format=Codebook(init="density", iters=20), granularity=PerChannel()),
        False,
    ),
    "int8 per channel": (QuantSpec(bits=8, granularity=PerChannel()), False),
    "E4M3 per channel": (QuantSpec(format=E4M3(), granularity=PerChannel()), False),
}


def kernel_bytes(tree) -> int:
    return sum(int(x.nbytes) for p, x in jc.tree.leaves_with_paths(tree) if p.endswith("kernel"))


def charlm(run: Run, seeds: list[int], quick: bool) -> None:
    model, params = load_charlm()

    def fn(p, x):
        return model.apply({"params": p}, x)

    apply = jax.jit(fn)
    everything = heldout_windows()
    results: dict[str, list[float]] = {name: [] for name in ("float32", *VARIANTS)}
    sizes: dict[str, int] = {"float32": kernel_bytes(params)}
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        n = 128 if quick else len(everything) // 2
        windows = everything[np.sort(rng.choice(len(everything), n, replace=False))]
        batches = calibration_windows(16 if quick else 128, batch=16, seed=seed)
        results["float32"].append(charlm_perplexity(apply, params, windows))
        for name, (spec, calibrated) in VARIANTS.items():
            if calibrated:
                q = gptq(fn, params, batches, spec, where=KERNELS, quiet=True)
            else:
                q = quantize(params, spec, where=KERNELS)
            results[name].append(charlm_perplexity(apply, dequantize(q), windows))
            sizes[name] = kernel_bytes(q)
            print(f"  seed {seed} {name}: {results[name][-1]:.4f}", flush=True)
    title = (
        f"char LM: held-out perplexity by number format ({len(seeds)} seed(s), mean ± std) "
        "and the kernels' stored bytes"
    )
    base = np.asarray(results["float32"])
    with run.table(
        "charlm", title, ["format", "perplexity", "increase", "bytes"], timed=False
    ) as t:
        for name, values in results.items():
            v = np.asarray(values)
            t.row(
                [
                    name,
                    f"{v.mean():.4f} ± {v.std():.4f}",
                    f"{(v - base).mean():+.4f}",
                    sizes[name],
                ],
                data={"values": values, "bytes": sizes[name]},
            )
        t.note(
            "each seed: a random half of the held-out windows, and its own 128 calibration "
            "windows for GPTQ; bytes: every kernel's stored nbytes (indices/values in their "
            "containers plus tables/scales)"
        )


def deep_compression(run: Run, seeds: list[int], quick: bool) -> None:
    study = runpy.run_path(str(ROOT / "examples" / "09_deep_compression.py"))
    steps, tune_steps = (60, 20) if quick else (2000, 300)
    rows = [study["run"](seed, steps=steps, tune_steps=tune_steps) for seed in seeds]
    keys = {
        "float, 92% pruned": ("float", "float_bytes"),
        "5-bit codebook per layer": ("codebook_rtn", "codebook_bytes"),
        "5-bit codebook, centroids fine-tuned": ("codebook_tuned", "codebook_bytes"),
        "int5 per channel": ("int_rtn", "int_bytes"),
        "int5, scales fine-tuned": ("int_tuned", "int_bytes"),
    }
    title = (
        f"Deep Compression on LeNet-300-100 (digits): test accuracy ({len(seeds)} seed(s), "
        "mean ± std) and the Dense kernels' bytes"
    )
    columns = ["model", "accuracy %", "codebook ≥ int5 (seeds)", "bytes", "encoded bytes"]
    with run.table("deep_compression", title, columns, timed=False) as t:
        for name, (acc, size) in keys.items():
            v = 100 * np.asarray([r[acc] for r in rows])
            wins = ""
            if acc.startswith("int"):  # the codebook row of the same stage vs this one
                other = "codebook" + acc[3:]
                wins = f"{sum(r[other] >= r[acc] for r in rows)}/{len(rows)}"
            memory, encoded = rows[0][size]
            t.row([name, f"{v.mean():.2f} ± {v.std():.2f}", wins, memory, encoded], data=v.tolist())
        t.note(
            f"`python examples/09_deep_compression.py`: GMP to 92% during {steps} adamw steps, "
            f"then {tune_steps} adam steps of fine-tuning (tables or scales, and biases) through "
            "jc.compressed; pruned weights stay exactly zero (asserted); encoded bytes: what a "
            "checkpoint stores (jc.report: zeros and pruned indices sparse-encoded)"
        )


def speed(run: Run, quick: bool) -> None:
    n = 1024 if quick else 4096
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.standard_normal((n, n), np.float32) / np.sqrt(n))}

    def fn(p, x):
        return x @ p["kernel"]

    fast = jax.jit(jc.compressed(fn))
    trees = {
        "int8": runtime_layout(quantize(params, QuantSpec(bits=8))),
        "NF4 g64": quantize(params, VARIANTS["NF4 g64, RTN"][0]),
        "Codebook 4-bit": quantize(params, VARIANTS["Codebook 4-bit per channel"][0]),
        "E4M3": quantize(params, VARIANTS["E4M3 per channel"][0]),
    }
    title = f"jc.compressed on a {n}x{n} layer: float32 time / variant time (and vs int8)"
    columns = ["batch", *[f"{k} (vs float32)" for k in trees], *[f"{k} (vs int8)" for k in trees]]
    with run.table("speed", title, columns) as t:
        for batch in (1, 16, 256):
            x = jnp.asarray(rng.standard_normal((batch, n), np.float32))
            fns = {"float32": jax.jit(fn)}
            fns.update({k: fast for k in trees})
            args = {"float32": (params, x), **{k: (q, x) for k, q in trees.items()}}
            timing = run.interleaved(
                {k: bind({k: f}, *args[k])[k] for k, f in fns.items()}, repeats=5 if quick else 15
            )
            t.row(
                [
                    batch,
                    *[timing.ratio("float32", k) for k in trees],
                    *[timing.ratio("int8", k) for k in trees],
                ],
                data=timing.as_dict(),
            )
        for k, q in trees.items():
            (record,) = jc.explain(jc.compressed(fn), q, jnp.ones((1, n)))
            t.note(f"{k}: jc.explain names {record.formulation!r} ({record.compiled})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, small data, a 1024² layer")
    ap.add_argument(
        "--only",
        choices=("quality", "speed"),
        help="only the quality tables (results/formats.json) or the speed table "
        "(results/formats.speed.json); default: both, one after the other",
    )
    args = ap.parse_args(argv)
    if args.only != "speed":
        run = Run("formats", script=__file__, argv=argv, quick=args.quick)
        seeds = list(range(1 if args.quick else 5))
        charlm(run, seeds, args.quick)
        deep_compression(run, seeds, args.quick)
        run.finish()
    if args.only != "quality":
        run = Run("formats.speed", script=__file__, argv=argv, quick=args.quick)
        speed(run, args.quick)
        run.finish()


if __name__ == "__main__":
    main()
