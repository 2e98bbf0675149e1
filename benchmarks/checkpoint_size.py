"""Checkpoint size and speed: ``jc.checkpoint`` vs a plain orbax ``PyTreeCheckpointer``.

For each tree (dense, 90%-pruned, int8, int4, pruned int4, many small arrays) this prints the
in-memory bytes (packed), the encoded payload ``jc.checkpoint.save`` writes and the bytes on disk
for both writers (one table), and median save / load times over interleaved repeats (another,
timed with ``benchmarks/_harness.py``). Writes ``benchmarks/results/checkpoint_size.json``.

    python benchmarks/checkpoint_size.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run, Timed

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


def _fresh(directory: Path) -> tuple:
    shutil.rmtree(directory, ignore_errors=True)
    return ()


def save_load_times(run, tree, repeats: int, tmp: Path) -> dict[str, float]:
    """Median seconds of save (into a fresh directory) and load, both writers, interleaved."""
    variants = {}
    for writer, save, load in (
        ("jc", checkpoint.save, checkpoint.load),
        ("orbax", _orbax_save, _orbax_load),
    ):
        saved, fresh = tmp / writer, tmp / f"{writer}_save"
        variants[f"{writer} save"] = Timed(
            lambda save=save, d=fresh: save(d, tree), prepare=lambda d=fresh: _fresh(d)
        )
        variants[f"{writer} load"] = Timed(lambda load=load, d=saved: load(d))
    return run.interleaved(variants, repeats=repeats, min_sample_s=0.0, warmup=1).wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run = Run("checkpoint_size", script=__file__, argv=argv, quick=args.quick)
    repeats = 2 if args.quick else 5
    fb = report.format_bytes
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        columns = ["tree", "memory", "encoded", "jc disk", "orbax disk", "orbax / jc"]
        columns.append("dense / jc")
        with run.table("sizes", "checkpoint bytes", columns, timed=False) as t:
            dense = None
            for name, tree in trees(args.quick).items():
                d = dirs[name] = Path(tmp) / name.replace(" ", "_")
                checkpoint.save(d / "jc", tree)
                _orbax_save(d / "orbax", tree)
                s = report.summarize(tree)
                jc, ob = _disk(d / "jc"), _disk(d / "orbax")
                dense = dense or jc
                small = name == "200 small arrays"
                t.row(
                    [name, fb(s.memory_bytes), fb(s.encoded_bytes), fb(jc), fb(ob), ob / jc,
                     "-" if small else dense / jc],
                    data={"memory": s.memory_bytes, "encoded": s.encoded_bytes, "jc": jc,
                          "orbax": ob},
                )  # fmt: skip
        columns = ["tree", "jc save ms", "orbax save ms", "jc load ms", "orbax load ms"]
        title = f"checkpoint save / load time (medians of {repeats} interleaved repeats)"
        with run.table("times", title, columns) as t:
            for name, tree in trees(args.quick).items():
                times = save_load_times(run, tree, repeats, dirs[name])
                t.row([name, *(1e3 * times[c[:-3]] for c in columns[1:])], data=times)
    run.finish()


if __name__ == "__main__":
    main()
