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

The machine is shared and noisy (2 cores, other jobs running): read the ratios, not the absolute
times.

    python benchmarks/quantize.py [--quick]

Writes ``benchmarks/results/quantize.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jcompress.quantization as jq
from jcompress.quantization import MSE, AbsMax, PerChannel, PerGroup, QuantSpec

try:
    import qwix
except ImportError:  # pragma: no cover - reported in the output
    qwix = None

RESULTS = Path(__file__).parent / "results" / "quantize.json"
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


def print_reconstruction(rows):
    cols = [k for k in rows[0] if k not in ("weights", "bits", "granularity")]
    for r in rows[1:]:
        cols += [k for k in r if k not in cols and k not in ("weights", "bits", "granularity")]
    print("\nPart 1: relative squared error |w - deq|^2 / |w|^2 (lower is better)")
    print("| weights    | bits | granularity | " + " | ".join(f"{c:>14}" for c in cols) + " |")
    print("|" + "---|" * (3 + len(cols)))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "-")
            cells.append(f"{v:14.3e}" if isinstance(v, float) else f"{v!s:>14}")
        print(
            f"| {r['weights']:<10} | {r['bits']:>4} | {r['granularity']:<11} | "
            + " | ".join(cells)
            + " |"
        )


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


def _median_times(fns: dict, args: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for fn_name, fn in fns.items():  # warm-up (compile)
        jax.block_until_ready(fn(*args[fn_name]))
    for _ in range(repeats):  # interleaved
        for fn_name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[fn_name]))
            times[fn_name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def quantize_time(d_in: int, widths: tuple[int, ...], repeats: int, mse_grid: int):
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
    times = _median_times(fns, args, repeats)
    # The MSE search once (it is grid x the work of absmax).
    mse = jax.jit(lambda p: jq.quantize(p, QuantSpec(bits=4, calibration=MSE(grid=mse_grid))))
    jax.block_until_ready(mse(params))
    t0 = time.perf_counter()
    jax.block_until_ready(mse(params))
    times[f"jc int4 per-channel MSE(grid={mse_grid})"] = time.perf_counter() - t0
    return n, times, qwix_note, params


def print_times(n, times, qwix_note):
    print(f"\nPart 2: jitted quantize time of a {n / 1e6:.1f}M-parameter tree (median, warm)")
    ref = times.get("qwix int8 per-channel")
    print("| method                              | seconds | vs qwix int8 |")
    print("|-------------------------------------|---------|--------------|")
    for k, v in times.items():
        ratio = f"{v / ref:12.2f}" if ref else "           -"
        print(f"| {k:<35} | {v:7.3f} | {ratio} |")
    if qwix_note:
        print(f"({qwix_note})")


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


def print_bytes(rows):
    print("\nPart 3: bytes per quantized parameter (kernels only; biases stay float)")
    cols = list(rows[0])[1:-1]
    print("| config                 | " + " | ".join(f"{c:>29}" for c in cols) + " |")
    print("|" + "---|" * (1 + len(cols)))
    for r in rows:
        print(f"| {r['config']:<22} | " + " | ".join(f"{r[c]:29.4f}" for c in cols) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small weights and tree")
    args = parser.parse_args()
    if args.quick:
        shape, group, grid = (256, 64), 32, 20
        d_in, widths, repeats, mse_grid = 256, (512, 256, 512, 256), 3, 10
    else:
        shape, group, grid = (2048, 512), 128, 100
        # 12 Dense layers 4096 <-> 2048: 100.7M parameters (403 MB in float32).
        d_in, widths, repeats, mse_grid = 4096, (2048, 4096) * 6, 5, 20
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or '?'}; "
        f"qwix {'installed' if qwix is not None else 'NOT installed'}"
    )
    recon = reconstruction(shape, group, grid)
    print_reconstruction(recon)
    n, times, qwix_note, params = quantize_time(d_in, widths, repeats, mse_grid)
    print_times(n, times, qwix_note)
    _, byte_rows = stored_bytes(params)
    print_bytes(byte_rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "jax": jax.__version__,
                "backend": jax.devices()[0].platform,
                "qwix": None if qwix is None else "installed",
                "qwix_note": qwix_note,
                "reconstruction": {"shape": shape, "group": group, "mse_grid": grid, "rows": recon},
                "quantize_time": {"parameters": n, "repeats": repeats, "seconds": times},
                "bytes_per_param": byte_rows,
                "note": "shared, noisy 2-core machine: compare ratios, not absolute times",
            },
            indent=1,
        )
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
