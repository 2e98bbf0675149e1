"""Calibrated compression of a small character-level transformer LM: perplexity table.

The model is ``jcompress.demo._charlm.CharLM`` (2 pre-LN transformer blocks over bytes,
``d_model`` 128, context 64), trained once on Python's standard-library sources; its weights
ship with jcompress (``load_charlm()``), so nothing is trained here. Every ``kernel`` (q/k/v/o,
MLP, output head: input dimensions 128 or 512) is compressed; embeddings and norms stay float.
Calibration uses random windows of the *training* text; perplexity is measured on held-out
modules the model never saw.

* quantization, groups of 64 along the input axis: round to nearest (``quantize``), GPTQ
  (``gptq``: second-order error feedback), AWQ (``awq``: activation-aware input scales);
* pruning: magnitude, Wanda (``|W| · ||X||``) and SparseGPT (pruning with reconstruction).

    python examples/06_llm_compression.py           # 4 and 3 bits, 50 % and 2:4, 512 windows
    python examples/06_llm_compression.py --quick   # 3 bits and 50 % on 64 windows (smoke test)
"""

from __future__ import annotations

import argparse

import jax

from jcompress.demo._charlm import (
    calibrated_variants,
    calibration_windows,
    charlm_perplexity,
    heldout_windows,
    load_charlm,
)
from jcompress.pruning import NM
from jcompress.quantization import PerGroup


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
    sparsity = [0.5] if args.quick else [0.5, NM(2, 4)]
    base = charlm_perplexity(apply, params, windows)
    print(f"held-out windows: {len(windows)} x 64 bytes; calibration: {len(calib)} batches")
    print("| method | perplexity | increase | seconds |")
    print("|---|---:|---:|---:|")
    print(f"| float32 | {base:.3f} | +0.000 | - |")
    rows = calibrated_variants(fn, params, calib, where=r".*kernel", quant=quant, sparsity=sparsity)
    for name, p, sec in rows:
        ppl = charlm_perplexity(apply, p, windows)
        print(f"| {name} | {ppl:.3f} | {ppl - base:+.3f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
