"""Weight quantization: reconstruction error, quantize time and stored bytes, jcompress vs Qwix.

Part 1, reconstruction error on the same weights (a Gaussian and a heavy-tailed Student-t
``(in, out)`` kernel): relative squared error ``|w - deq|^2 / |w|^2`` per bit width, granularity
and calibration, for ``jc.quantization.quantize`` (AbsMax, MSE clipping search, symmetric and
asymmetric) and ``qwix.quantize`` (``absmax`` and ``minmax``; Qwix has no clipping search and no
3-bit type). Note the level conventions differ: jcompress's symmetric grid is
``-(2^(b-1)-1) .. 2^(b-1)-1`` (int4: 15 levels, int2: ternary), Qwix's symmetric scale is
``absmax / (2^(b-1) - 0.5)`` over ``-2^(b-1) .. 2^(b-1)-1`` (int4: 16 levels).

Part 2, quantize time of a >= 100M-parameter tree of Dense kernels (``--quick``: a small tree),
``jax.jit`` compiled, after a warm-up, medians of interleaved repeats: jcompress vs
``jax.jit(qwix.quantize_params)`` for the same linen model.

Part 3, stored bytes per parameter: ``QArray.nbytes`` (packed) vs the ideal packed values alone,
and what the device buffers really hold on this backend (XLA:CPU keeps one byte per int4/int2
element in buffers; compiled programs use packed layouts internally).

Timed with ``benchmarks/_harness.py`` (interleaved medians, the noise measure per table).

    python benchmarks/quantize.py [--quick]

Writes ``benchmarks/results/quantize.json``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run

import jcompress.quantization as jq
from jcompress.quantization import MSE, AbsMax, PerChannel, PerGroup, QuantSpec

try:
    import qwix
except ImportError:  # pragma: no cover - reported in the output
    qwix = None

QWIX_TYPES = {8: jnp.int8, 4: jnp.int4, 2: jnp.int2}


def _container(bits: int) -> int:
    return 2 if bits == 2 else 4 if bits <= 4 else 8


# ----------------------------------------------------------------------------------------------
# Part 1: reconstruction error
# ----------------------------------------------------------------------------------------------


def _weights(kind: str, shape, seed=0) -> jax.Array:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape) if kind == "gaussian" else rng.standard_t(3.0, size=shape)
    return jnp.asarray(w * 0.02, jnp.float32)


def _rel_err(w, deq) -> float:
    w = np.asarray(w, np.float64)
    return float(np.sum((np.asarray(deq, np.float64) - w) ** 2) / np.sum(w**2))


def reconstruction(shape, group: int, grid: int):
    rows = []
    for kind in ("gaussian", "student_t3"):
        w = _weights(kind, shape)
        for bits in (8, 4, 3, 2):
            for gname, gran in (("channel", PerChannel()), (f"group{group}", PerGroup(group))):
                row = {"weights": kind, "bits": bits, "granularity": gname}
                for sym in (True, False):
                    for cname, cal in (("absmax", AbsMax()), ("mse", MSE(grid=grid))):
                        spec = QuantSpec(
                            bits=bits, granularity=gran, calibration=cal, symmetric=sym
                        )
                        q = jq.quantize({"kernel": w}, spec)["kernel"]
                        row[f"jc {cname} {'sym' if sym else 'asym'}"] = _rel_err(w, q.dequantize())
                if qwix is not None and bits in QWIX_TYPES:
                    tiled = {} if gname == "channel" else {0: group}
                    for method in ("absmax", "minmax"):
                        try:
                            qa = qwix.quantize(
                                w,
                                QWIX_TYPES[bits],
                                channelwise_axes=(1,),
                                tiled_axes=tiled,
                                calibration_method=method,
                            )
                            row[f"qwix {method}"] = _rel_err(w, qwix.dequantize(qa))
                        except Exception as e:  # report, do not hide
                            row[f"qwix {method}"] = f"n/a ({type(e).__name__})"
                rows.append(row)
    return rows


def reconstruction_table(run, shape, group, grid) -> None:
    title = f"relative squared error |w - deq|^2 / |w|^2 of a {shape} kernel (lower is better)"
    with run.table("reconstruction", title, [], timed=False) as t:
        rows = reconstruction(shape, group, grid)
        _fill(t, rows)


def _fill(t, rows) -> None:
    cols = [k for k in rows[0] if k not in ("weights", "bits", "granularity")]
    for r in rows[1:]:
        cols += [k for k in r if k not in cols and k not in ("weights", "bits", "granularity")]
    t.columns = ["weights", "bits", "granularity", *cols]
    for r in rows:
        t.row([r["weights"], r["bits"], r["granularity"], *(r.get(c, "-") for c in cols)])


# ----------------------------------------------------------------------------------------------
# Part 2: quantize time of a large tree
# ----------------------------------------------------------------------------------------------


class Stack(nn.Module):
    """Dense layers with the given widths (only the parameter tree is used)."""

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.widths):
            x = nn.Dense(f, name=f"Dense_{i}")(x)
        return x


def _big_tree(d_in: int, widths: tuple[int, ...]):
    model = Stack(widths)
    x = jnp.zeros((1, d_in))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    keys = iter(jax.random.split(jax.random.key(1), 2 * len(widths)))

    @jax.jit
    def make(keys):
        leaves, treedef = jax.tree.flatten(shapes)
        out = [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]
        return jax.tree.unflatten(treedef, out)

    params = make(jnp.stack([next(keys) for _ in jax.tree.leaves(shapes)]))
    return model, x, params


def quantize_time(run, d_in: int, widths: tuple[int, ...], repeats: int, mse_grid: int):
    model, x, params = _big_tree(d_in, widths)
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    specs = {
        "jc int8 per-channel": QuantSpec(bits=8),
        "jc int4 per-channel": QuantSpec(bits=4),
        "jc int4 PerGroup(128)": QuantSpec(bits=4, granularity=PerGroup(128)),
    }
    fns, args = {}, {}
    for name, spec in specs.items():
        fns[name] = jax.jit(lambda p, spec=spec: jq.quantize(p, spec))
        args[name] = (params,)
    qwix_note = None
    if qwix is None:
        qwix_note = "qwix not installed"
    else:
        for qtype in ("int8", "int4"):
            try:
                rule = qwix.QuantizationRule(module_path=".*", weight_qtype=qtype)
                ptq = qwix.quantize_model(model, qwix.PtqProvider([rule]))
                abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)["params"]
                fn = jax.jit(qwix.quantize_params)
                fns[f"qwix {qtype} per-channel"] = lambda p, a=abstract, fn=fn: fn(p, a)
                args[f"qwix {qtype} per-channel"] = (params,)
            except Exception as e:  # report, do not hide
                qwix_note = f"qwix {qtype} failed: {type(e).__name__}: {str(e)[:120]}"
    calls = {name: (lambda fn=fn, a=args[name]: fn(*a)) for name, fn in fns.items()}
    times = run.interleaved(calls, repeats=repeats, min_sample_s=0.0).wall
    # The MSE search once (it is grid x the work of absmax).
    mse = jax.jit(lambda p: jq.quantize(p, QuantSpec(bits=4, calibration=MSE(grid=mse_grid))))
    jax.block_until_ready(mse(params))
    t0 = time.perf_counter()
    jax.block_until_ready(mse(params))
    times[f"jc int4 per-channel MSE(grid={mse_grid})"] = time.perf_counter() - t0
    return n, times, qwix_note, params


# ----------------------------------------------------------------------------------------------
# Part 3: bytes per parameter
# ----------------------------------------------------------------------------------------------


def _device_bytes(x) -> int:
    return sum(s.data.on_device_size_in_bytes() for s in x.addressable_shards)


def stored_bytes(params):
    rows = []
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    kernels = {k: v for k, v in params.items()}
    for name, spec in (
        ("int8 per-channel", QuantSpec(bits=8)),
        ("int4 PerGroup(128)", QuantSpec(bits=4, granularity=PerGroup(128))),
        ("int4 PerGroup(32)", QuantSpec(bits=4, granularity=PerGroup(32))),
        ("int3 PerGroup(32)", QuantSpec(bits=3, granularity=PerGroup(32))),
        ("int2 PerGroup(32) asym", QuantSpec(bits=2, granularity=PerGroup(32), symmetric=False)),
    ):
        q = jq.quantize(kernels, spec)
        leaves = jax.tree.leaves(q, is_leaf=jq.QArray.__instancecheck__)
        qas = [x for x in leaves if isinstance(x, jq.QArray)]
        floats = [x for x in leaves if not isinstance(x, jq.QArray)]
        nq = sum(int(np.prod(x.shape)) for x in qas)
        packed = sum(x.nbytes for x in qas)
        device = sum(_device_bytes(c) for x in qas for c in jax.tree.leaves(x))
        rows.append(
            {
                "config": name,
                "bytes/param (nbytes)": packed / nq,
                "ideal values only": spec.bits / 8,
                "container values": _container(spec.bits) / 8,
                "device buffers (this backend)": device / nq,
                "float leaves bytes": int(sum(x.nbytes for x in floats)),
            }
        )
    return n, rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small weights and tree")
    args = parser.parse_args(argv)
    run = Run("quantize", script=__file__, argv=argv, quick=args.quick)
    if args.quick:
        shape, group, grid = (256, 64), 32, 20
        d_in, widths, repeats, mse_grid = 256, (512, 256, 512, 256), 3, 10
    else:
        shape, group, grid = (2048, 512), 128, 100
        # 12 Dense layers 4096 <-> 2048: 100.7M parameters (403 MB in float32).
        d_in, widths, repeats, mse_grid = 4096, (2048, 4096) * 6, 5, 20
    print(f"qwix {'installed' if qwix is not None else 'NOT installed'}")
    reconstruction_table(run, shape, group, grid)
    sizes = (d_in, *widths)
    n = sum(a * b + b for a, b in itertools.pairwise(sizes))
    title = f"jitted quantize time of a {n / 1e6:.1f}M-parameter tree (median seconds, warm)"
    with run.table("quantize_time", title, ["method", "seconds", "vs qwix int8"]) as t:
        n, times, qwix_note, params = quantize_time(run, d_in, widths, repeats, mse_grid)
        ref = times.get("qwix int8 per-channel")
        for k, v in times.items():
            t.row([k, v, v / ref if ref else "-"])
        if qwix_note:
            t.note(qwix_note)
        t.note(f"the MSE row is one timed run (grid {mse_grid})")
    title = "bytes per quantized parameter (kernels only; biases stay float)"
    with run.table("bytes", title, [], timed=False) as t:
        _, byte_rows = stored_bytes(params)
        t.columns = list(byte_rows[0])[:-1]
        for r in byte_rows:
            t.row([r[c] for c in t.columns])
    run.finish()


if __name__ == "__main__":
    main()
