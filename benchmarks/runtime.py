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

GPU mode (``--gpu``, chosen automatically when ``jax.default_backend() == "gpu"``): the
bfloat16 rows of issue #4. ONE unattended command on the device machine (repository root):

    bash benchmarks/runtime_gpu.sh    # = PYTHONPATH=. python3 benchmarks/runtime.py --gpu

About 3-5 minutes on an H200, compiles included: no cell starts after ``--budget-s`` (240 s);
the wrapper prints the GPU and versions, tees a log to ``$OUT`` and stops at 420 s. The script
prints ``jax.devices()`` first and exits with status 2 and a message if no GPU is visible (then
install a CUDA build of JAX, e.g. ``pip install -U "jax[cuda12]"``, and rerun).

Shapes: K=8192, N in {8192, 28672}, batch 1/4/16/64/256, weights and activations bfloat16.
Each timed call runs a chain of ``layers`` distinct layers (8 for N=8192, 4 for N=28672:
>= 0.5 GB of bf16 weights, far beyond the 50 MB L2, launch overhead amortised), layer i+1 fed
``x0 + 1e-3·max(output i)`` so that no layer can be skipped, merged or hoisted. Variants:
``jit(f)`` in bf16 (baseline), int8 / int4 (packed, and ``widen``ed) weight-only, int8 per-group
128, the dequantize-then-matmul formulation, int8 x int8 (dynamic and static step), Qwix when
importable. Reports ratios (bf16 time / variant time, medians of interleaved repeats, a fixed
time budget per cell; cells past the budget are recorded as skipped), the achieved weight-read
bandwidth (weight bytes of all layers / time) against 4.25 TB/s, and per variant ``jc.explain``
plus the compiled HLO lines that touch the weight (which dtype the matmul reads: s8 / s4 / bf16,
and whether a weight-sized float or widened copy is written to memory). Writes
``$OUT/runtime_gpu.json`` (and the markdown tables for BENCHMARKS.md, ``runtime_gpu.md``) when
``OUT`` is set, else under ``benchmarks/results/``, after every cell (errors are recorded per
cell and variant, never fatal), and prints the tables at the end. ``--dry-run``: the same code
path on any backend with K=256, N in {256, 512}, batch 1 and 16, 2 repeats
(``runtime_gpu_dryrun.json`` / ``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
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


_QWIX = (("qwix w-only", None), ("qwix w8a8", "int8"))


def _qwix_ptq(model, params, x, act):
    """Qwix PTQ of a linen model, int8 weights (``act="int8"``: and activations): (apply, tree)."""
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype=act)
    ptq = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
    return (lambda p, x: ptq.apply({"params": p}, x)), qwix.quantize_params(params, abstract)


def _qwix_variants(model, params, x):
    if qwix is None:
        return {}
    out = {}
    for name, act in _QWIX:
        try:
            apply, qp = _qwix_ptq(model, params, x, act)
            fn = jax.jit(apply)
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


# ---- GPU mode (bfloat16 rows of issue #4) --------------------------------------------------

H200_TBPS = 4.25  # measured H200 HBM bandwidth (issue #4)
_HLO_TYPE = re.compile(r"^(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_HLO_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$"
)
_HLO_COMP = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$")
_HLO_CALLS = re.compile(r"calls=%(?P<callee>[\w.\-]+)")
_HLO_KIND = re.compile(r"kind=(?P<kind>k\w+)")
_INT_TYPES = ("s8", "s4", "s2", "u8", "u4", "u2")
_WIDE_INT_TYPES = ("s16", "s32", "s64", "u16", "u32", "u64")
_FLOAT_TYPES = ("bf16", "f16", "f32", "f64")
_RELABEL = ("bitcast", "copy", "transpose", "reshape")
_CONTROL = ("parameter", "tuple", "get-tuple-element", "while", "call", "conditional")


class Chain(nn.Module):
    """``layers`` bias-free bf16 Dense(``features``) layers; layer i+1 reads ``x0 + 1e-3·max(y_i)``
    (a full reduction of the previous output: nothing can be skipped, merged or hoisted)."""

    features: int
    layers: int

    @nn.compact
    def __call__(self, x):
        x0 = x
        for _ in range(self.layers):
            dense = nn.Dense(
                self.features, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
            )
            y = dense(x)
            x = x0 + 1e-3 * jnp.max(y, axis=-1, keepdims=True)
        return y


def _parse_hlo(hlo: str) -> dict[str, list[dict]]:
    """Computations of compiled HLO text: ``{name: [{name, dtype, size, op, operands, line}]}``."""
    comps: dict[str, list[dict]] = {}
    current = None
    for raw in hlo.splitlines():
        line = re.sub(r"/\*.*?\*/", "", raw)
        m = _HLO_COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = comps.setdefault(m.group("name"), [])
            continue
        m = _HLO_INSTR.match(line)
        if m is None or current is None:
            continue
        t = _HLO_TYPE.match(m.group("type"))
        dims = [int(d) for d in t.group("dims").split(",") if d] if t else []
        current.append(
            {
                "name": m.group("name"),
                "dtype": t.group("dtype") if t else "tuple",
                "size": math.prod(dims) if t else -1,
                "op": m.group("op"),
                "operands": re.findall(r"%([\w.\-]+)", m.group("rest")),
                "line": raw.strip(),
            }
        )
    return comps


def _is_matmul(comps, instr, depth=0) -> bool:
    """A dot/convolution/GEMM custom call, or a fusion whose computation holds one."""
    if instr["op"] in ("dot", "convolution"):
        return True
    if instr["op"] == "custom-call":
        return bool(re.search(r"gemm|matmul|cublas", instr["line"], re.IGNORECASE))
    m = _HLO_CALLS.search(instr["line"])
    if instr["op"] != "fusion" or m is None or depth > 4:
        return False
    return any(_is_matmul(comps, i, depth + 1) for i in comps.get(m.group("callee"), []))


def weight_reads(hlo: str, k: int, n: int, max_lines: int = 8) -> dict:
    """Which instructions of compiled HLO read a ``k x n`` weight, and as which dtype.

    Follows every ``k·n``-element array (parameters and anything computed, outside fused
    computations) through layout-only ops to its consumers. ``stored``: the weight parameters'
    dtypes; ``matmul_reads``: the dtypes a matmul (dot, GEMM custom call, or a fusion containing
    a dot) reads the weight as; ``float_copies`` / ``int_copies``: instructions writing a float
    (dequantized) / integer (e.g. int4 -> int8 widened) ``k·n`` array to memory; ``one_fusion``:
    the matmul reads the stored integer weight itself and no weight-sized copy exists.
    ``snippets``: those HLO lines (truncated), deduplicated, up to ``max_lines``.
    """
    comps = _parse_hlo(hlo)
    fused = {
        m.group("callee")
        for instrs in comps.values()
        for i in instrs
        if i["op"] == "fusion" and (m := _HLO_CALLS.search(i["line"]))
    }
    size = k * n
    matmul_reads, other_reads, stored, snippets = set(), set(), set(), {}
    copies = {"float": 0, "int": 0}
    for cname, instrs in comps.items():
        if cname in fused:
            continue
        by_name = {i["name"]: i for i in instrs}
        for i in instrs:
            notes = []
            if i["size"] == size and i["op"] == "parameter":
                stored.add(i["dtype"])
            elif i["size"] == size and i["op"] not in (*_RELABEL, *_CONTROL):
                if i["dtype"] in (*_FLOAT_TYPES, *_INT_TYPES, *_WIDE_INT_TYPES):
                    kind = "float" if i["dtype"] in _FLOAT_TYPES else "int"
                    copies[kind] += 1
                    notes.append(f"writes a {kind} weight-sized array")
            read = []
            if i["op"] not in (*_RELABEL, *_CONTROL):
                for a in dict.fromkeys(i["operands"]):
                    src = by_name.get(a)
                    while src is not None and src["op"] in _RELABEL and src["operands"]:
                        src = by_name.get(src["operands"][0]) if src["size"] == size else None
                    if src is not None and src["size"] == size and src["dtype"] != "tuple":
                        read.append(src["dtype"])
            if read:
                (matmul_reads if _is_matmul(comps, i) else other_reads).update(read)
                notes.insert(0, f"reads {','.join(read)}")
            if not notes:
                continue
            kind = _HLO_KIND.search(i["line"])
            callee = _HLO_CALLS.search(i["line"])
            body = comps.get(callee.group("callee"), []) if callee else []
            ops = ",".join(sorted({b["op"] for b in body} - {"parameter"}))
            tag = (
                f"[{i['op']}{'/' + kind.group('kind') if kind else ''} {'; '.join(notes)}"
                f"{'; body ' + ops if ops else ''}] "
            )
            line = re.sub(r",? stack_frame_id=\d+", "", i["line"])
            # one example per distinct instruction (the layers differ only in numbers)
            key = re.sub(r"\d+", "#", re.sub(r"(\.\d+)+\b", "", line))
            snippets.setdefault(tag + key[:500], tag + line[:500])
    snippets = list(snippets.values())
    return {
        "stored": sorted(stored),
        "matmul_reads": sorted(matmul_reads),
        "other_reads": sorted(other_reads),
        "float_copies": copies["float"],
        "int_copies": copies["int"],
        "int_in_matmul": bool(matmul_reads) and matmul_reads <= set(_INT_TYPES),
        # the stored integer weight read by the matmul itself, no weight-sized copy in memory
        "one_fusion": bool(matmul_reads)
        and matmul_reads <= stored & set(_INT_TYPES)
        and not any(copies.values()),
        "snippets": snippets[:max_lines],
        "n_snippets": len(snippets),
    }


class _Precompiled:
    """Hands an already compiled executable to ``explain`` (``.lower(...).compile()``)."""

    def __init__(self, compiled):
        self._compiled = compiled

    def lower(self, *args, **kwargs):
        return self

    def compile(self):
        return self._compiled


def _bits(dtype) -> int:
    dtype = np.dtype(dtype)
    sub = {
        np.dtype(t): b for t, b in ((jnp.int4, 4), (jnp.uint4, 4), (jnp.int2, 2), (jnp.uint2, 2))
    }
    return sub.get(dtype, 8 * dtype.itemsize)


def _nominal_bytes(tree) -> int:
    """Bytes of every array leaf at its element width (int4: half a byte)."""
    return sum(x.size * _bits(x.dtype) // 8 for x in jax.tree.leaves(tree))


def _device_bytes(tree) -> int | None:
    try:
        return sum(
            s.data.on_device_size_in_bytes()
            for x in jax.tree.leaves(tree)
            for s in x.addressable_shards
        )
    except Exception:  # not every backend reports it
        return None


def _gpu_variants(model, params, x) -> dict[str, tuple]:
    """``{name: (function to jit, tree)}``; the first is the bf16 baseline."""
    fn = lambda p, x: model.apply({"params": p}, x)
    q8 = quantize(params, QuantSpec(bits=8))
    q4 = quantize(params, QuantSpec(bits=4))
    g128 = quantize(params, QuantSpec(bits=8, granularity=PerGroup(size=128)))
    out = {
        "bf16": (fn, params),
        "int8 w-only": (compressed(fn), q8),
        "int4 w-only": (compressed(fn), q4),
        "int4 widened": (compressed(fn), widen(q4)),
        "int8 g128 w-only": (compressed(fn), g128),
        "int8 dequant": (compressed(fn, formulation="dequantize"), q8),
        "int8 x int8": (compressed(fn, mode="int8"), q8),
        "int8 x int8 static": (compressed(fn, mode="int8"), jax.device_put(_static(q8, x))),
    }
    for name, act in _QWIX if qwix is not None else ():
        try:
            out[name] = _qwix_ptq(model, params, x, act)
        except Exception as e:  # recorded, never fatal
            out[name] = (None, f"{type(e).__name__}: {str(e)[:300]}")
    return out


def _sample(fn, args, inner) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner


def gpu_cell(k, n, batch, variants_for, *, layers, repeats, cell_s) -> dict:
    """One (K, N, batch) cell: compile, explain and time every variant, interleaved."""
    x = jax.random.normal(jax.random.key(batch), (batch, k), jnp.bfloat16)
    variants = variants_for(x)
    row = {"k": k, "n": n, "batch": batch, "layers": layers, "variants": {}, "errors": {}}
    ready = {}
    for name, (fn, tree) in variants.items():
        rec = row["variants"][name] = {}
        if fn is None:
            row["errors"][name] = tree
            continue
        try:
            jitted = jax.jit(fn)
            t0 = time.perf_counter()
            jax.block_until_ready(jitted(tree, x))
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            print(f"    {name}: compiled and ran in {rec['compile_s']} s", flush=True)
            rec["weight_bytes"] = _nominal_bytes(tree)
            rec["device_bytes"] = _device_bytes(tree)
        except Exception as e:  # recorded, the cell goes on
            row["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"    {name}: FAILED {row['errors'][name][:160]}", flush=True)
            continue
        ready[name] = (jitted, tree)
        try:  # what it compiled to; a failure here loses no timing
            # the same program again (a persistent-cache hit on GPU), for its HLO and explain
            compiled = jitted.lower(tree, x).compile()
            rec["hlo"] = weight_reads(compiled.as_text(), k, n)
            if not name.startswith(("bf16", "qwix")):
                ex = explain(_Precompiled(compiled), tree, x)
                rec["explain"] = [dataclasses.asdict(e) for e in ex]
        except Exception as e:
            rec["explain_error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"    {name}: explain failed {rec['explain_error'][:160]}", flush=True)
    inner, times = {}, {}
    for name, (f, tree) in ready.items():  # ~5 ms per sample
        try:
            t = _sample(f, (tree, x), 3)
        except Exception as e:
            row["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
            continue
        inner[name] = 1 if repeats else max(1, min(500, math.ceil(5e-3 / max(t, 1e-7))))
        times[name] = []
    t_end = time.perf_counter() + cell_s
    rounds = 0
    while rounds < (repeats or 25) and (repeats or rounds < 3 or time.perf_counter() < t_end):
        for name in list(times):  # interleaved
            f, tree = ready[name]
            try:
                times[name].append(_sample(f, (tree, x), inner[name]))
            except Exception as e:
                row["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
                times.pop(name)
        rounds += 1
    row["rounds"] = rounds
    base = float(np.median(times["bf16"])) if times.get("bf16") else None
    for name, ts in times.items():
        rec = row["variants"][name]
        med = float(np.median(ts))
        rec["us"] = med * 1e6
        rec["ratio"] = None if base is None else base / med
        rec["tbps"] = rec["weight_bytes"] / med / 1e12
        rec["of_peak"] = rec["tbps"] / H200_TBPS
    return row


def _cell_text(rec: dict) -> str:
    if "ratio" not in rec or rec["ratio"] is None:
        return "error"
    return f"{rec['ratio']:.2f}x {rec['tbps']:.3g}TB/s"


def gpu_markdown(rows: list[dict]) -> str:
    """Markdown tables: ratios with weight-read bandwidth, then what each variant compiled to."""
    rows = [r for r in rows if "variants" in r]
    if not rows:
        return "(no rows)"
    names = list(dict.fromkeys(name for r in rows for name in r["variants"] if name != "bf16"))
    head = "| K x N | batch | bf16 µs (TB/s) | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for r in sorted(rows, key=lambda r: (r["n"], r["batch"])):
        b = r["variants"].get("bf16", {})
        base = f"{b['us']:.0f} ({b['tbps']:.3g})" if "us" in b else "error"
        cells = [_cell_text(r["variants"].get(name, {})) for name in names]
        lines.append(f"| {r['k']}x{r['n']} | {r['batch']} | {base} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| variant | jc.explain (intended → compiled, formulation) | stored | matmul reads |"
        " float / int weight copies | int read in one fusion |",
        "|---|---|---|---|---|---|",
    ]
    first = min(rows, key=lambda r: r["batch"])
    for name, rec in first["variants"].items():
        ex = sorted(
            {
                f"{e['intended']} → {e['compiled']} ({e['formulation']})"
                for e in rec.get("explain", [])
            }
        )
        h = rec.get("hlo", {})
        lines.append(
            f"| {name} | {'; '.join(ex) or '-'} | {','.join(h.get('stored', [])) or '?'} | "
            f"{','.join(h.get('matmul_reads', [])) or '?'} | "
            f"{h.get('float_copies', '?')} / {h.get('int_copies', '?')} | "
            f"{h.get('one_fusion', '?')} |"
        )
    return "\n".join(lines)


def gpu_main(args) -> int:
    print(f"jax {jax.__version__}; devices: {jax.devices()}", flush=True)
    if not args.dry_run and jax.default_backend() != "gpu":
        print(
            "runtime.py --gpu: no GPU visible to JAX (backend "
            f"{jax.default_backend()!r}). Install a CUDA build of JAX (pip install -U "
            "'jax[cuda12]' or 'jax[cuda13]') and rerun, or use --dry-run for the CPU smoke path.",
            flush=True,
        )
        return 2
    if args.dry_run:
        k, sizes, batches, repeats, cell_s = 256, (256, 512), (1, 16), 2, 0.0
    else:
        k, sizes, batches, repeats, cell_s = 8192, (8192, 28672), (1, 16, 4, 64, 256), 0, 2.5
    if args.n:
        sizes = tuple(args.n)
    if args.batches:
        batches = tuple(args.batches)
    out_dir = (
        Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    )
    out = out_dir / ("runtime_gpu_dryrun.json" if args.dry_run else "runtime_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "dry_run": args.dry_run,
        "peak_tbps": H200_TBPS,
        "qwix": None if qwix is None else getattr(qwix, "__version__", "installed"),
        "note": "ratio = bf16 jit(f) time / variant time (median of interleaved samples); tbps ="
        " weight bytes (all layers, int4 at 4 bits, scales included) / time",
    }
    if not args.dry_run:  # explain's second compile of each program becomes a cache hit
        try:  # (a global setting: not in the dry run, which tests run in-process)
            jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jc_gpu_"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        except Exception as e:  # only slower without it
            print(f"(no persistent compilation cache: {e})", flush=True)
    rows: list[dict] = []
    t_start = time.perf_counter()
    setups: dict[int, Any] = {}

    def write():
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(gpu_markdown(rows) + "\n")

    cells = [(n, b) for b in batches for n in sizes]  # most wanted first (batch order)
    for n, b in cells:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            rows.append({"k": k, "n": n, "batch": b, "skipped": f"time budget ({elapsed:.0f} s)"})
            print(f"K={k} N={n} b={b}: skipped (budget {args.budget_s} s spent)", flush=True)
            write()
            continue
        layers = 2 if args.dry_run else (8 if k * n <= 1 << 26 else 4)
        print(f"K={k} N={n} b={b} layers={layers} (t={elapsed:.0f} s) ...", flush=True)
        try:
            if n not in setups:
                model = Chain(n, layers)
                x1 = jnp.zeros((1, k), jnp.bfloat16)
                params = jax.jit(model.init)(jax.random.key(0), x1)["params"]
                setups[n] = (model, params, {})
            model, params, cache = setups[n]

            def variants_for(x, model=model, params=params, cache=cache):
                if "trees" not in cache:  # trees do not depend on x, except the static step
                    cache["trees"] = _gpu_variants(model, params, x)
                v = dict(cache["trees"])
                fn, q8 = v["int8 x int8"]
                v["int8 x int8 static"] = (fn, jax.device_put(_static(q8, x)))
                return v

            row = gpu_cell(k, n, b, variants_for, layers=layers, repeats=repeats, cell_s=cell_s)
        except Exception as e:  # recorded, the run goes on
            row = {"k": k, "n": n, "batch": b, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        rows.append(row)
        write()
        if "variants" in row:
            b0 = row["variants"].get("bf16", {})
            cellsum = "  ".join(
                f"{name} {_cell_text(rec)}"
                for name, rec in row["variants"].items()
                if name != "bf16"
            )
            print(f"  bf16 {b0.get('us', float('nan')):.1f} us  {cellsum}", flush=True)
        else:
            print(f"  ERROR {row['error'][:200]}", flush=True)
    print(gpu_markdown(rows), flush=True)
    print(f"wrote {out} and .md ({time.perf_counter() - t_start:.0f} s)", flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--gpu", action="store_true", help="bf16 GPU rows (default on a GPU)")
    parser.add_argument("--dry-run", action="store_true", help="GPU mode, tiny shapes, any device")
    parser.add_argument("--n", type=int, nargs="+", help="GPU mode: override the N sizes")
    parser.add_argument("--batches", type=int, nargs="+", help="GPU mode: override the batches")
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="GPU mode: start no cell after this"
    )
    args = parser.parse_args(argv)
    if args.gpu or args.dry_run or jax.default_backend() == "gpu":
        return gpu_main(args)
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
    sys.exit(main())
