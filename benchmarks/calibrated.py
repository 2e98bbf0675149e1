"""Calibrated compression: RTN vs GPTQ vs AWQ, magnitude vs Wanda vs SparseGPT.

Two models:

* the committed character-level transformer LM (``jcompress.demo._charlm``): held-out
  perplexity on standard-library sources the model never saw, weights quantized in groups of
  64 (every kernel's input dimension is 128 or 512) at 4 and 3 bits, or pruned to 50 % and 2:4;
  plus W8A8 (int8 weights, int8 activations) through ``jc.runtime.compressed(fn,
  mode="int8")``: dynamic per-token activation scales vs static steps from
  ``calibrate_activations`` (abs-max, 99.99th percentile); and GPTQ's calibration time with one
  layer's Gram matrix alive at a time (the default: one walk over the batches per layer) vs
  every layer's at once. Embeddings, positions and norms stay float.
* LeNet-300-100 on digits: test accuracy over 5 seeds (mean ± std), per-channel 3 and 2 bits,
  70 % and 2:4.

Calibration: 256 random training windows (char LM) / 512 training images (digits). Quality and
time are separate tables: times are wall-clock seconds per method, compile time included, with
the noise measure of ``benchmarks/_harness.py``. Usage: ``python benchmarks/calibrated.py
[--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run

from jcompress.demo import DigitsTask, fit
from jcompress.demo._charlm import (
    calibrated_variants,
    calibration_windows,
    charlm_perplexity,
    heldout_windows,
    load_charlm,
)
from jcompress.pruning import NM
from jcompress.quantization import (
    AbsMax,
    Percentile,
    PerChannel,
    PerGroup,
    QuantSpec,
    calibrate_activations,
    dequantize,
    gptq,
    quantize,
)
from jcompress.runtime import compressed

KERNELS = r".*kernel"


def charlm_rows(quick: bool) -> list[dict]:
    model, params = load_charlm()

    def fn(p, x):
        return model.apply({"params": p}, x)

    apply = jax.jit(fn)
    windows = heldout_windows(128 if quick else 1024)
    calib = calibration_windows(32 if quick else 256)
    ppl = charlm_perplexity(apply, params, windows)
    rows = [{"model": "charlm", "method": "float32", "ppl": ppl, "seconds": 0.0}]
    quant = [(4, PerGroup(64)), (3, PerGroup(64))]
    sparsity = [0.5, NM(2, 4)]
    if quick:
        quant, sparsity = quant[1:], sparsity[:1]
    for name, p, sec in calibrated_variants(
        fn, params, calib, where=KERNELS, quant=quant, sparsity=sparsity
    ):
        rows.append(
            {
                "model": "charlm",
                "method": name,
                "ppl": charlm_perplexity(apply, p, windows),
                "seconds": sec,
            }
        )
        print(f"  {name:<16} ppl {rows[-1]['ppl']:.3f}  ({sec:.1f} s)", flush=True)
    # W8A8: dynamic per-token activation scales vs static steps (calibrate_activations)
    int8 = compressed(fn, mode="int8")
    start = time.perf_counter()
    q8 = jax.block_until_ready(quantize(params, QuantSpec(bits=8), where=KERNELS))
    variants = [("W8A8 dynamic (compressed, mode='int8')", q8, time.perf_counter() - start)]
    for label, calibration in (("abs-max", AbsMax()), ("p99.99", Percentile(99.99))):
        start = time.perf_counter()
        static = calibrate_activations(fn, q8, calib, calibration=calibration)
        sec = time.perf_counter() - start
        variants.append((f"W8A8 static {label} (calibrate_activations)", static, sec))
    for name, q, sec in variants:
        ppl_q = charlm_perplexity(int8, q, windows)
        rows.append({"model": "charlm", "method": name, "ppl": ppl_q, "seconds": sec})
        print(f"  {name:<16} ppl {ppl_q:.3f}  ({sec:.1f} s)", flush=True)
    # memory vs passes: GPTQ holding one layer's Gram (default) vs every layer's at once;
    # both timed warm (compiled programs cached by a first run), so the difference is the
    # extra walks over the calibration batches
    spec = QuantSpec(bits=3, granularity=PerGroup(64))
    for per_pass, label in ((1, "1 Gram alive, 1 walk per layer"), (None, "all Grams, 1 walk")):

        def run(per_pass=per_pass):
            return jax.block_until_ready(
                gptq(fn, params, calib, spec, where=KERNELS, quiet=True, layers_per_pass=per_pass)
            )

        run()
        start = time.perf_counter()
        q = run()
        sec = time.perf_counter() - start
        ppl_q = charlm_perplexity(apply, dequantize(q), windows)
        rows.append(
            {"model": "charlm", "method": f"GPTQ w3 ({label}; warm)", "ppl": ppl_q, "seconds": sec}
        )
        print(f"  GPTQ w3 {label}: ppl {ppl_q:.3f}  ({sec:.1f} s)", flush=True)
    for r in rows:
        r["increase"] = r["ppl"] - ppl
    return rows


def digits_rows(quick: bool) -> list[dict]:
    seeds = [0] if quick else [0, 1, 2, 3, 4]
    quant = [(3, PerChannel()), (2, PerChannel())]
    sparsity = [0.7, NM(2, 4)]
    if quick:
        quant, sparsity = quant[:1], sparsity[:1]
    acc: dict[str, list[float]] = {}
    sec: dict[str, list[float]] = {}
    for seed in seeds:
        task = DigitsTask.load(seed=seed)
        params, _ = fit(
            task.loss,
            optax.adam(1e-3),
            task.init(seed),
            task.data,
            epochs=3 if quick else 30,
            seed=seed,
        )
        apply = jax.jit(task.apply)
        x = jnp.asarray(task.data.x_train)
        calib = [(x[i : i + 128],) for i in range(0, 512, 128)]
        acc.setdefault("float32", []).append(task.accuracy(params, apply))
        sec.setdefault("float32", []).append(0.0)
        for name, p, s in calibrated_variants(
            task.apply, params, calib, where=KERNELS, quant=quant, sparsity=sparsity, awq_too=False
        ):
            acc.setdefault(name, []).append(task.accuracy(p, apply))
            sec.setdefault(name, []).append(s)
        print(f"  digits seed {seed} done", flush=True)
    return [
        {
            "model": "digits LeNet-300-100",
            "method": k,
            "accuracy_mean": statistics.mean(v),
            "accuracy_std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "seconds": statistics.median(sec[k]),
            "seeds": len(v),
        }
        for k, v in acc.items()
    ]


def goals(rows: list[dict]) -> dict:
    by = {r["method"]: r["increase"] for r in rows if r["model"] == "charlm"}
    out = {}
    if "GPTQ w3" in by:
        out["gptq_w3_increase_le_half_rtn"] = by["GPTQ w3"] <= by["RTN w3"] / 2
    for m in ("SparseGPT 50%", "Wanda 50%"):
        if m in by:
            out[f"{m.split()[0].lower()}_50_increase_le_half_magnitude"] = (
                by[m] <= by["magnitude 50%"] / 2
            )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny subset (seconds)")
    args = ap.parse_args(argv)
    run = Run("calibrated", script=__file__, argv=argv, quick=args.quick)
    title = "char LM: seconds per method (wall clock, compile included)"
    with run.table("charlm_seconds", title, ["method", "seconds"]) as t:
        lm = charlm_rows(args.quick)
        for r in lm:
            t.row([r["method"], r["seconds"]])
    title = "char LM: held-out perplexity (lower is better)"
    with run.table("charlm", title, ["method", "perplexity", "increase"], timed=False) as t:
        for r in lm:
            t.row([r["method"], f"{r['ppl']:.3f}", f"{r['increase']:+.3f}"], data=r)
    title = "digits LeNet-300-100: seconds per method (median over seeds, compile included)"
    with run.table("digits_seconds", title, ["method", "seconds"]) as t:
        dg = digits_rows(args.quick)
        for r in dg:
            t.row([r["method"], r["seconds"]])
    seeds = dg[0]["seeds"] if dg else 0
    title = f"digits LeNet-300-100: test accuracy over {seeds} seeds"
    with run.table("digits", title, ["method", "accuracy"], timed=False) as t:
        for r in dg:
            acc = f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}%"
            t.row([r["method"], acc], data=r)
    run.extra["goals"] = goals(lm)
    print("\ngoals:", run.extra["goals"])
    run.finish()


if __name__ == "__main__":
    main()
