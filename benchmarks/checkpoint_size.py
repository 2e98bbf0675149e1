"""Checkpoint size and speed: ``jc.checkpoint`` vs a plain orbax ``PyTreeCheckpointer``.

For each tree (dense, 90%-pruned, int8, int4, pruned int4, many small arrays) this prints the
in-memory bytes (packed), the encoded payload ``jc.checkpoint.save`` writes, the bytes on disk
for both writers, and median save / load times over interleaved repeats (the machine is shared
and noisy: read the ratios, not the absolute times). Writes ``benchmarks/results/
checkpoint_size.json``.

    python benchmarks/checkpoint_size.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jcompress import checkpoint, report
from jcompress.quantization import QuantSpec, quantize
from jcompress.tree import map_with_paths


def _prune(tree, sparsity):
    """Zero the smallest-magnitude fraction of every kernel (NumPy reference, no jcompress)."""

    def one(path, x):
        if not path.endswith("kernel"):
            return x
        x = np.asarray(x).copy()
        k = round(sparsity * x.size)
        idx = np.argsort(np.abs(x), axis=None)[:k]
        x.reshape(-1)[idx] = 0
        return jnp.asarray(x)

    return map_with_paths(one, tree)


def _mlp(rng, widths):
    tree = {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        tree[f"Dense_{i}"] = {
            "kernel": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(b) * 0.01, jnp.float32),
        }
    return tree


def trees(quick: bool) -> dict:
    rng = np.random.default_rng(0)
    widths = (256, 512, 512, 10) if quick else (1024, 2048, 2048, 1024, 10)
    dense = _mlp(rng, widths)
    pruned = _prune(dense, 0.9)
    int8 = quantize(dense, QuantSpec(bits=8))
    int4 = quantize(dense, QuantSpec(bits=4))
    return {
        "dense float32": dense,
        "dense bfloat16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), dense),
        "pruned 90% float32": pruned,
        "int8 (per-channel)": int8,
        "int4 (per-channel)": int4,
        "pruned 90% int4": quantize(pruned, QuantSpec(bits=4)),
        "200 small arrays": {f"b{i}": jnp.full((16,), i, jnp.float32) for i in range(200)},
    }


def _orbax_save(path: Path, tree) -> None:
    with ocp.PyTreeCheckpointer() as c:
        c.save(path, tree)


def _orbax_load(path: Path):
    with ocp.PyTreeCheckpointer() as c:
        return c.restore(path)


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(name: str, tree, repeats: int, tmp: Path) -> dict:
    times = {"jc_save": [], "jc_load": [], "orbax_save": [], "orbax_load": []}
    for r in range(repeats):  # interleaved
        for writer in ("jc", "orbax"):
            d = tmp / f"{writer}{r}"
            shutil.rmtree(d, ignore_errors=True)
            t = time.perf_counter()
            (checkpoint.save if writer == "jc" else _orbax_save)(d, tree)
            times[f"{writer}_save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            jax.block_until_ready((checkpoint.load if writer == "jc" else _orbax_load)(d))
            times[f"{writer}_load"].append(time.perf_counter() - t)
    s = report.summarize(tree)
    return {
        "tree": name,
        "values": s.size,
        "memory_bytes": s.memory_bytes,
        "encoded_bytes": s.encoded_bytes,
        "jc_disk_bytes": _disk(tmp / "jc0"),
        "orbax_disk_bytes": _disk(tmp / "orbax0"),
        **{k: float(np.median(v)) for k, v in times.items()},
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in trees(args.quick).items():
            rows.append(measure(name, tree, repeats, Path(tmp) / name.replace(" ", "_")))
    dense = rows[0]["jc_disk_bytes"]
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"checkpoint size ({'quick' if args.quick else 'full'}; medians of {repeats})")
    for col in (
        "tree",
        "memory",
        "encoded",
        "jc disk",
        "orbax disk",
        "orbax/jc",
        "vs dense (jc)",
        "save jc/orbax",
        "load jc/orbax",
    ):
        t.add_column(col, justify="left" if col == "tree" else "right")
    fb = report.format_bytes
    for r in rows:
        t.add_row(
            r["tree"],
            fb(r["memory_bytes"]),
            fb(r["encoded_bytes"]),
            fb(r["jc_disk_bytes"]),
            fb(r["orbax_disk_bytes"]),
            f"{r['orbax_disk_bytes'] / r['jc_disk_bytes']:.2f}x",
            f"{dense / r['jc_disk_bytes']:.1f}x" if r["tree"] != "200 small arrays" else "-",
            f"{r['jc_save'] * 1e3:.0f}/{r['orbax_save'] * 1e3:.0f} ms",
            f"{r['jc_load'] * 1e3:.0f}/{r['orbax_load'] * 1e3:.0f} ms",
        )
    Console(width=160).print(t)
    out = Path(__file__).parent / "results" / "checkpoint_size.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "repeats": repeats, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
