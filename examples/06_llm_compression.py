"""Calibrated compression of a small character-level transformer LM: perplexity table.

The model is ``jcompress.demo.CharLM`` (2 pre-LN transformer blocks over bytes,
``d_model`` 128, context 64), trained once on Python's standard-library sources; its weights
ship with jcompress (``load_charlm()``), so nothing is trained here. Every ``kernel`` (q/k/v/o,
MLP, output head: input dimensions 128 or 512) is compressed; embeddings and norms stay float.
Calibration uses random windows of the *training* text; perplexity is measured on held-out
modules the model never saw.

* quantization, groups of 64 along the input axis: round to nearest (``quantize``), GPTQ
  (``gptq``: second-order error feedback, one layer's Hessian in memory at a time), AWQ
  (``awq``: activation-aware input scales);
* pruning: magnitude, Wanda (``|W| · ||X||``) and SparseGPT (pruning with reconstruction);
* W8A8 (int8 weights per channel, int8 activations, ``jc.compressed(fn, mode="int8")``):
  dynamic per-token activation scales vs static steps from ``calibrate_activations``
  (abs-max, and the 99.99th percentile of ``|x|``).

    python examples/06_llm_compression.py           # 4 and 3 bits, 50 % and 2:4, 512 windows
    python examples/06_llm_compression.py --quick   # 3-bit RTN/GPTQ and W8A8 (smoke test)
"""

from __future__ import annotations

import argparse
import time

import jax

from jcompress.demo import (
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
    PerGroup,
    QuantSpec,
    calibrate_activations,
    quantize,
)
from jcompress.runtime import compressed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small subset (seconds)")
    args = ap.parse_args()
    model, params = load_charlm()

    def fn(p, tokens):
        return model.apply({"params": p}, tokens)

    apply = jax.jit(fn)
    windows = heldout_windows(64 if args.quick else 512)
    calib = calibration_windows(32 if args.quick else 256)
    quant = [(3, PerGroup(64))] if args.quick else [(4, PerGroup(64)), (3, PerGroup(64))]
    sparsity = [] if args.quick else [0.5, NM(2, 4)]
    base = charlm_perplexity(apply, params, windows)
    print(f"held-out windows: {len(windows)} x 64 bytes; calibration: {len(calib)} batches")
    print("| method | perplexity | increase | seconds |")
    print("|---|---:|---:|---:|")
    print(f"| float32 | {base:.3f} | +0.000 | - |")

    def row(name, ppl, sec):
        print(f"| {name} | {ppl:.3f} | {ppl - base:+.3f} | {sec:.1f} |", flush=True)

    for name, p, sec in calibrated_variants(
        fn, params, calib, where=r".*kernel", quant=quant, sparsity=sparsity, awq_too=not args.quick
    ):
        row(name, charlm_perplexity(apply, p, windows), sec)

    # W8A8: int8 x int8 matmuls; activation scales per token (dynamic) or calibrated (static)
    int8 = compressed(fn, mode="int8")
    q8 = quantize(params, QuantSpec(bits=8), where=r".*kernel")
    row("W8A8 dynamic", charlm_perplexity(int8, q8, windows), 0.0)
    for label, calibration in (("abs-max", AbsMax()), ("p99.99", Percentile(99.99))):
        start = time.perf_counter()
        static = jax.block_until_ready(
            calibrate_activations(fn, q8, calib, calibration=calibration)
        )
        row(
            f"W8A8 static {label}",
            charlm_perplexity(int8, static, windows),
            time.perf_counter() - start,
        )


if __name__ == "__main__":
    main()
