"""Run every benchmark script, one after the other, then rebuild the tables of BENCHMARKS.md.

    python benchmarks/run_all.py            # the full set, alone on a quiet machine
    python benchmarks/run_all.py --quick    # every script's --quick mode: a smoke test
    python benchmarks/run_all.py --only runtime pruning_overhead

Each script takes the machine-wide benchmark lock itself, measures other processes' CPU use per
table and writes ``benchmarks/results/<name>.json`` (``--quick``: ``results/quick/``). After a
full run, ``tables.py`` copies the tables that were not noisy into BENCHMARKS.md; after
``--quick`` it renders them into a temporary file only (quick numbers are not evidence). Runs from
any working directory. Start it with nothing else running: other jobs slow the multi-threaded
float baselines far more than the loops they are compared with.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Cheap and robust first, the long runtime tables last.
SCRIPTS = (
    "mask_time",
    "quantize",
    "checkpoint_size",
    "shrink",
    "lowrank",
    "distill",
    "pruning_overhead",
    "calibrated",
    "runtime",
    "budget",
    "formats",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script's --quick mode")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    started, failed, took = time.perf_counter(), [], {}
    for name in args.only or SCRIPTS:
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if args.quick else [])]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(cmd, env=env).returncode != 0:
            failed.append(name)
        took[name] = time.perf_counter() - t0
        print(f"=== {name}: {took[name]:.0f} s", flush=True)
    tables = [sys.executable, str(HERE / "tables.py")]
    if args.quick:  # render the quick results, but never into BENCHMARKS.md
        out = Path(tempfile.mkdtemp(prefix="jc_bench_")) / "BENCHMARKS.md"
        out.write_text((ROOT / "BENCHMARKS.md").read_text())
        tables += ["--results", str(HERE / "results" / "quick"), "--markdown", str(out)]
    if subprocess.run(tables, env=env).returncode != 0:
        failed.append("tables")
    total = time.perf_counter() - started
    print("\n" + "  ".join(f"{k} {v:.0f}s" for k, v in took.items()))
    print(f"total {total / 60:.1f} min; " + (f"FAILED: {', '.join(failed)}" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
