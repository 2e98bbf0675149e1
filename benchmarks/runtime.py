"""Runtime speed: ``jit(jc.compressed(f))`` on int8 / int4 weights vs ``jit(f)`` in float32.

CPU mode (default), every table with the noise measure of ``benchmarks/_harness.py``:

* ``decode K x N``: a chain of ``layers`` distinct bias-free ``Dense(N)`` layers on ``(batch, K)``
  inputs, layer i+1 fed ``x0 + 1e-3·max(output i)`` (nothing can be skipped, merged or hoisted),
  ``layers`` chosen so that the float32 weights hold >= 1 GiB (several times the last-level
  cache: each layer's weight comes from memory, as in a model's decode step; one layer timed
  alone would sit in cache and flatter the float baseline), K x N = 4096 x 4096 and
  4096 x 11008, batch 1, 4, 16, 64, 256. Variants, all jit-compiled in one process, trees made
  once with ``runtime_layout`` (int8 containers, output-major per-channel and group-major
  per-group weights on CPU):

  - ``float32``: ``jax.jit(f)`` on the float parameters (the baseline, ratio 1.0);
  - ``int8``, ``int4``: per-channel weight-only; ``int8 g128``, ``int4 g128``: ``PerGroup(128)``;
    ``int4 g32 asym``: ``PerGroup(32)``, asymmetric; all ``jit(compressed(f))``, the weight-only
    dispatch (results equal ``f(dequantize(tree))`` to float rounding);
  - ``int4 packed``: the int4 tree as quantized, without ``runtime_layout``;
  - ``int8 x int8``: ``compressed(f, mode="int8")`` (W8A8, dynamic per-token activation scales);
  - ``qwix int8``: Qwix weight-only PTQ of the same linen model, when Qwix is installed.

  Ratios are float32 time / variant time (> 1: faster than float32), medians of interleaved
  samples. Each table's notes name the formulation ``jc.explain`` reports per variant.
* ``decode, one thread``: batch 1 and 4 of both shapes again in a child process pinned to one
  CPU with XLA's Eigen single-threaded: on a shared machine the multi-threaded float baseline
  suffers most from other jobs, so read both.
* ``MLP block``: a stack of 4096-wide two-layer MLP blocks ``x + W2·gelu(W1·x)``
  (4096 -> 11008 -> 4096), one decode step at batch 1 and 4.
* ``other models``: one 3x3 64->64 convolution on 32x32 maps (``QArray`` convolutions
  dequantize their kernel), the digits MLP (LeNet-300-100, below the dispatch threshold:
  dequantized) and a small transformer block (attention + MLP, ``jc.roles`` for its layouts).

    python benchmarks/runtime.py [--quick]

Writes ``benchmarks/results/runtime.json`` (``--quick``: small shapes, ``results/quick/``).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run

from jcompress.demo import MLP
from jcompress.quantization import PerGroup, QArray, QuantSpec, quantize, runtime_layout
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


_QWIX = (("qwix w-only", None), ("qwix w8a8", "int8"))


def _qwix_ptq(model, params, x, act):
    """Qwix PTQ of a linen model, int8 weights (``act="int8"``: and activations): (apply, tree)."""
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype=act)
    ptq = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
    return (lambda p, x: ptq.apply({"params": p}, x)), qwix.quantize_params(params, abstract)


# ---- CPU mode --------------------------------------------------------------------------------

GIB = 1 << 30
DECODE_SPECS = {  # variant -> (spec, runtime_layout)
    "int8": (QuantSpec(bits=8), True),
    "int4": (QuantSpec(bits=4), True),
    "int8 g128": (QuantSpec(bits=8, granularity=PerGroup(128)), True),
    "int4 g128": (QuantSpec(bits=4, granularity=PerGroup(128)), True),
    "int4 g32 asym": (QuantSpec(bits=4, granularity=PerGroup(32), symmetric=False), True),
    "int4 packed": (QuantSpec(bits=4), False),
}


class Residual(nn.Module):
    """``blocks`` MLP blocks ``x + Dense(width)(gelu(Dense(hidden)(x)))``, bias-free."""

    hidden: int
    blocks: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.blocks):
            h = nn.gelu(nn.Dense(self.hidden, use_bias=False)(x))
            x = x + nn.Dense(x.shape[-1], use_bias=False)(h)
        return x


def _decode_variants(model, params, x, *, w8a8=True, qwix_too=True) -> dict[str, tuple]:
    """``{name: (jitted function, tree)}``: float32 first, then the compressed variants."""
    fn = lambda p, x: model.apply({"params": p}, x)
    out = {"float32": (jax.jit(fn), params)}
    trees = {}
    for name, (spec, laid) in DECODE_SPECS.items():
        q = quantize(params, spec)
        trees[name] = runtime_layout(q) if laid else q
        out[name] = (jax.jit(compressed(fn)), trees[name])
    if w8a8:
        out["int8 x int8"] = (jax.jit(compressed(fn, mode="int8")), trees["int8"])
    if qwix_too and qwix is not None:
        try:
            apply, qp = _qwix_ptq(model, params, x, None)
            out["qwix int8"] = (jax.jit(apply), qp)
        except Exception as e:  # report, do not hide
            print(f"  (qwix unavailable: {type(e).__name__}: {str(e)[:80]})")
    return out


def _calls(variants: dict[str, tuple], x) -> dict[str, Any]:
    """``{name: () -> f(tree, x)}`` for the harness's timer."""
    return {v: (lambda f=f, p=p: f(p, x)) for v, (f, p) in variants.items()}  # its own tree each


def _formulations(fn, tree, x) -> str:
    """What ``jc.explain`` reports for a variant: ``formulation (compiled path)``, deduplicated."""
    try:
        found = {f"{r.formulation} ({r.compiled})" for r in explain(fn, tree, x)}
    except Exception as e:  # report, never fatal
        return f"explain failed: {type(e).__name__}"
    return ", ".join(sorted(found)) or "-"


def decode_table(run, k, n, batches, *, layers, repeats, budget_s, explain_batches=()) -> None:
    """One ``decode K x N`` table: rows are batches, columns float32 time per layer and ratios."""
    model = Chain(n, layers, dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, k)))["params"]
    variants = _decode_variants(model, params, jnp.zeros((1, k)))
    names = [v for v in variants if v != "float32"]
    gib = layers * k * n * 4 / GIB
    title = f"decode {k}x{n}: {layers} distinct layers ({gib:.2f} GiB float32), float32 / variant"
    found: dict[str, list[str]] = {}
    table_id = "decode_square" if k == n else "decode_wide"
    with run.table(table_id, title, ["batch", "float32 ms/layer", *names]) as t:
        for b in batches:
            x = jax.random.normal(jax.random.key(b), (b, k))
            fns = _calls(variants, x)
            times = run.interleaved(fns, repeats=repeats, min_sample_s=0.0, max_seconds=budget_s)
            ratios = [times.ratio("float32", v) for v in names]
            t.row([b, 1e3 * times.wall["float32"] / layers, *ratios], data=times.as_dict())
            for v in names if b in explain_batches else ():
                if not v.startswith("qwix"):
                    found.setdefault(v, []).append(f"{_formulations(*variants[v], x)} at {b}")
        for v, where in found.items():
            t.note(f"{v}: {'; '.join(where)}")


def mlp_block_table(run, width, hidden, blocks, batches, *, repeats, budget_s) -> None:
    model = Residual(hidden, blocks)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, width)))["params"]
    variants = _decode_variants(model, params, jnp.zeros((1, width)), qwix_too=False)
    keep = ("float32", "int8", "int4", "int4 g128", "int8 x int8")
    variants = {v: variants[v] for v in keep}
    gib = blocks * 2 * width * hidden * 4 / GIB
    title = (
        f"MLP block {width}->{hidden}->{width} (gelu, residual), {blocks} blocks ({gib:.2f} GiB "
        "float32): one decode step, float32 / variant"
    )
    names = list(keep[1:])
    with run.table("mlp_block", title, ["batch", "float32 ms/step", *names]) as t:
        for b in batches:
            x = jax.random.normal(jax.random.key(b), (b, width))
            fns = _calls(variants, x)
            times = run.interleaved(fns, repeats=repeats, min_sample_s=0.0, max_seconds=budget_s)
            ratios = [times.ratio("float32", v) for v in names]
            t.row([b, 1e3 * times.wall["float32"], *ratios], data=times.as_dict())


def _model_variants(model, params, x, *, attention=False, conv=False) -> dict[str, tuple]:
    fn = lambda p, x: model.apply({"params": p}, x)
    role_map = roles(fn, params, x) if attention else None
    q8 = quantize(params, QuantSpec(bits=8), roles=role_map)
    q4 = quantize(params, QuantSpec(bits=4), roles=role_map)
    out = {
        "float32": (jax.jit(fn), params),
        "int8": (jax.jit(compressed(fn)), runtime_layout(q8, roles=role_map)),
        "int4 packed": (jax.jit(compressed(fn)), q4),
        "int4": (jax.jit(compressed(fn)), runtime_layout(q4, roles=role_map)),
        "int8 dequantize": (jax.jit(compressed(fn, formulation="dequantize")), q8),
        "int8 x int8": (jax.jit(compressed(fn, mode="int8")), q8),
    }
    if not conv and qwix is not None:
        for name, act in _QWIX:
            try:
                apply, qp = _qwix_ptq(model, params, x, act)
                out[name] = (jax.jit(apply), qp)
            except Exception as e:  # report, do not hide
                print(f"  ({name} unavailable: {type(e).__name__}: {str(e)[:80]})")
    return out


def models_table(run, quick: bool, *, repeats: int) -> None:
    key = jax.random.key(1)
    seq = (1, 32, 256) if quick else (1, 128, 512)
    cases = [
        ("conv3x3 64, b=1", Conv(), jax.random.normal(key, (1, 32, 32, 64)), {"conv": True}),
        ("conv3x3 64, b=16", Conv(), jax.random.normal(key, (16, 32, 32, 64)), {"conv": True}),
        ("digits MLP, b=256", MLP((300, 100, 10)), jax.random.normal(key, (256, 64)), {}),
        (
            f"transformer block {seq}",
            Block(heads=4, hidden=1024) if quick else Block(),
            jax.random.normal(key, seq),
            {"attention": True},
        ),
    ]
    columns = ["model", "float32 ms", "int8", "int4 packed", "int4", "int8 dequantize"]
    columns += ["int8 x int8", *(name for name, _ in _QWIX if qwix is not None)]
    with run.table("models", "other models: float32 / variant", columns) as t:
        for name, model, x, kw in cases:
            params = jax.jit(model.init)(jax.random.key(0), x)["params"]
            variants = _model_variants(model, params, x, **kw)
            fns = _calls(variants, x)
            times = run.interleaved(fns, repeats=repeats)
            cells = [times.ratio("float32", c) if c in variants else "-" for c in columns[2:]]
            t.row([name, 1e3 * times.wall["float32"], *cells], data=times.as_dict())
            f, p = variants["int8"]
            t.note(f"{name}, int8: {_formulations(f, p, x)}")


def _layers(k: int, n: int, quick: bool) -> int:
    """Enough distinct layers for >= 1 GiB of float32 weights (quick: 2)."""
    return 2 if quick else max(2, math.ceil(GIB / (4 * k * n)))


def cpu_main(args) -> int:
    run = Run("runtime", script=__file__, argv=args.argv, quick=args.quick)
    width, wide = (512, 1536) if args.quick else (4096, 11008)
    shapes = [(width, width), (width, wide)]
    repeats, budget = (3, 5.0) if args.quick else (7, 60.0)
    if args.single_thread_rows:  # the child of run.single_thread
        for k, n in shapes:
            decode_table(
                run, k, n, (1, 4), layers=_layers(k, n, args.quick), repeats=repeats,
                budget_s=budget,
            )  # fmt: skip
        run.finish()
        return 0
    print(f"jax {jax.__version__} on {jax.default_backend()}: float32 time / variant time")
    batches = (1, 16) if args.quick else (1, 4, 16, 64, 256)
    for k, n in shapes:
        layers = _layers(k, n, args.quick)
        decode_table(
            run, k, n, batches, layers=layers, repeats=repeats, budget_s=budget,
            explain_batches=(batches[0], batches[-1]),
        )  # fmt: skip
    child = run.single_thread([*(["--quick"] if args.quick else []), "--single-thread-rows"])
    for table in child["tables"]:
        table["id"] += "_one_thread"
        table["title"] += ", one thread"
        run.adopt(table, "one thread: a child process pinned to one CPU, Eigen single-threaded")
    blocks = 1 if args.quick else 3
    mlp_block_table(
        run, width, wide, blocks, (1, 4), repeats=repeats, budget_s=budget
    )  # fmt: skip
    models_table(run, args.quick, repeats=repeats)
    run.finish()
    return 0


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
    """``layers`` bias-free Dense(``features``) layers (bf16 by default); layer i+1 reads
    ``x0 + 1e-3·max(y_i)`` (a full reduction of the previous output: nothing can be skipped,
    merged or hoisted)."""

    features: int
    layers: int
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x):
        x0 = x
        for _ in range(self.layers):
            dense = nn.Dense(
                self.features, use_bias=False, dtype=self.dtype, param_dtype=self.dtype
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
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--gpu", action="store_true", help="bf16 GPU rows (default on a GPU)")
    parser.add_argument("--dry-run", action="store_true", help="GPU mode, tiny shapes, any device")
    parser.add_argument("--n", type=int, nargs="+", help="GPU mode: override the N sizes")
    parser.add_argument("--batches", type=int, nargs="+", help="GPU mode: override the batches")
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="GPU mode: start no cell after this"
    )
    parser.add_argument("--single-thread-rows", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.gpu or args.dry_run or jax.default_backend() == "gpu":
        return gpu_main(args)
    return cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
