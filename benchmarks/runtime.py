"""Runtime speed: ``jit(jc.compressed(f))`` on int8 / int4 weights vs ``jit(f)`` in float32.

Cases: one 4096x4096 linear layer at batch 1, 4, 16, 64, 256; the digits MLP (LeNet-300-100);
a small transformer block (attention + MLP). Variants, all jit-compiled in one process:

* ``float32``: ``jax.jit(f)`` on the float parameters (the baseline, ratio 1.0);
* ``int8 w-only`` / ``int4 w-only`` / ``int8 g64 w-only`` (per-group scales, groups of 64):
  ``jit(compressed(f))``, the weight-only dispatch for the backend, batch and weight size (on CPU:
  the looped "limbs" formulation, exact to float rounding, or "chunked" dequantization);
* ``int4 widened``: the int4 tree after ``widen`` (4-bit values in int8 containers: on XLA:CPU
  the same RAM as int4 buffers, no per-call int4 -> int8 conversion);
* ``int8 dequant``: ``compressed(f, formulation="dequantize")`` (what a naive runtime does);
* ``int8 x int8``: ``compressed(f, mode="int8")`` (W8A8, dynamic per-token activation scales);
  ``int8 x int8 static``: the same with a static activation step in ``act_scale``;
* conv: one 3x3 64->64 convolution on 32x32 maps, float vs ``compressed`` (which dequantizes
  convolution kernels);
* ``qwix w-only`` / ``qwix w8a8``: Qwix PTQ of the same linen model, when Qwix is installed.

Ratios are float32 time / variant time (> 1: faster than float32), from medians of interleaved
repeats. The machine is shared with other engineers' jobs: absolute times are noisy, read the
ratios. Writes ``benchmarks/results/runtime.json``.

    python benchmarks/runtime.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from jcompress.demo import MLP
from jcompress.quantization import PerGroup, QArray, QuantSpec, quantize
from jcompress.quantization._qarray import widen
from jcompress.runtime import compressed, explain, roles

try:
    import qwix
except ImportError:  # optional
    qwix = None


class Linear(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, use_bias=False)(x)


class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(64, (3, 3), use_bias=False)(x)


def _static(tree, x):
    """Every QArray with a static activation step: the input's absmax / 127 (a calibration)."""
    step = float(np.abs(np.asarray(x)).max()) / 127
    return jax.tree.map(
        lambda q: (
            QArray(
                q.values,
                q.scale,
                q.zero_point,
                np.full((1,) * q.values.ndim, step, np.float32),
                bits=q.bits,
                dtype=q.dtype,
            )
            if isinstance(q, QArray)
            else q
        ),
        tree,
        is_leaf=lambda q: isinstance(q, QArray),
    )


class Block(nn.Module):
    """A pre-norm transformer block: attention (DenseGeneral q/k/v/o) and a ReLU MLP."""

    heads: int = 8
    hidden: int = 2048

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        x = x + h
        h = nn.Dense(self.hidden)(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1])(nn.relu(h))


def _time(fn, args, inner):
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner


def _qwix_variants(model, params, x):
    if qwix is None:
        return {}
    out = {}
    for name, act in (("qwix w-only", None), ("qwix w8a8", "int8")):
        try:
            rule = qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype=act)
            ptq = qwix.quantize_model(model, qwix.PtqProvider([rule]))
            abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
            qp = qwix.quantize_params(params, abstract)
            fn = jax.jit(lambda p, x, ptq=ptq: ptq.apply({"params": p}, x))
            fn(qp, x)
            out[name] = (fn, qp)
        except Exception as e:  # report, do not hide
            print(f"  ({name} unavailable: {type(e).__name__}: {str(e)[:80]})")
    return out


def bench_case(name, model, x, *, repeats, inner, attention=False, group=None, conv=False):
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)
    role_map = roles(fn, params, x) if attention else None
    q8 = quantize(params, QuantSpec(bits=8), roles=role_map)
    q4 = quantize(params, QuantSpec(bits=4), roles=role_map)
    variants = {
        "float32": (jax.jit(fn), params),
        "int8 w-only": (jax.jit(compressed(fn)), q8),
        "int4 w-only": (jax.jit(compressed(fn)), q4),
        "int4 widened": (jax.jit(compressed(fn)), widen(q4)),
        "int8 dequant": (jax.jit(compressed(fn, formulation="dequantize")), q8),
        "int8 x int8": (jax.jit(compressed(fn, mode="int8")), q8),
    }
    if not conv:
        variants["int8 x int8 static"] = (jax.jit(compressed(fn, mode="int8")), _static(q8, x))
    if group is not None:
        spec = QuantSpec(bits=8, granularity=PerGroup(size=group))
        variants[f"int8 g{group} w-only"] = (jax.jit(compressed(fn)), quantize(params, spec))
    if not conv:
        variants.update(_qwix_variants(model, params, x))
    times = {k: [] for k in variants}
    for _ in range(repeats):  # interleaved
        for k, (f, p) in variants.items():
            times[k].append(_time(f, (p, x), inner))
    med = {k: float(np.median(v)) for k, v in times.items()}
    paths = sorted({r.compiled for r in explain(variants["int8 w-only"][0], q8, x)})
    row = {
        "case": name,
        "float32_ms": med["float32"] * 1e3,
        "ratios": {k: med["float32"] / v for k, v in med.items() if k != "float32"},
        "compiled_paths_int8_w_only": paths,
    }
    cells = "  ".join(f"{k} {r:5.2f}x" for k, r in row["ratios"].items())
    print(f"{name:<24} float32 {row['float32_ms']:8.2f} ms  {cells}  [{', '.join(paths)}]")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = parser.parse_args()
    repeats, inner = (3, 2) if args.quick else (9, 5)
    batches = (1, 16) if args.quick else (1, 4, 16, 64, 256)
    width = 1024 if args.quick else 4096
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({platform.processor() or 'cpu'}); "
        "shared, noisy machine: read the ratios (float32 time / variant time)"
    )
    rows = []
    key = jax.random.key(1)
    for b in batches:
        x = jax.random.normal(key, (b, width))
        rows.append(
            bench_case(
                f"linear {width} b={b}", Linear(width), x, repeats=repeats, inner=inner, group=64
            )
        )
    for b in (1, 16):
        x = jax.random.normal(key, (b, 32, 32, 64))
        rows.append(
            bench_case(f"conv3x3 64 b={b}", Conv(), x, repeats=repeats, inner=inner, conv=True)
        )
    digits = jax.random.normal(key, (256, 64))
    rows.append(
        bench_case("digits MLP b=256", MLP((300, 100, 10)), digits, repeats=repeats, inner=inner)
    )
    seq = jax.random.normal(key, (1, 32 if args.quick else 128, 256 if args.quick else 512))
    block = Block(heads=4, hidden=1024) if args.quick else Block()
    rows.append(
        bench_case(
            f"transformer block {seq.shape}",
            block,
            seq,
            repeats=repeats,
            inner=inner,
            attention=True,
        )
    )
    out = Path(__file__).parent / "results" / "runtime.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "quick": args.quick,
        "note": "shared 2-core CPU with other jobs running: noisy; ratios = float32 / variant",
        "qwix": None if qwix is None else getattr(qwix, "__version__", "installed"),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
