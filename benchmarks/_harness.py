"""What every benchmark script shares: the timer, run metadata, a machine-wide lock, a noise
measure per table, single-thread child runs, and the JSON results the tables of BENCHMARKS.md are
generated from (``benchmarks/tables.py``).

A script builds one :class:`Run`, fills tables inside ``with run.table(...)`` blocks and calls
``run.finish()``::

    run = Run("runtime", script=__file__, quick=args.quick)  # the lock, the machine
    with run.table("linear", "4096² linear layer", ["batch", "int8"]) as t:
        times = run.interleaved({"float32": f, "int8": g}, repeats=9)
        t.row([1, times.ratio("float32", "int8")])
    run.finish()                                     # writes benchmarks/results/runtime.json

**Timer** (:meth:`Run.interleaved`): every variant is warmed up, then sampled in rounds, the
order reversed every other round (A B C, C B A, ...) so that drift and cache state hit every
variant alike; each sample repeats a call until it lasts ``min_sample_s``; the result is the
median per call, wall clock and process CPU time (all threads).

**Noise** (:meth:`Run.table`): over each table, the CPU time that OTHER processes used, in
cores: busy time of the whole machine from ``/proc/stat`` (including time the hypervisor stole)
minus this process's own time (``/proc/self/stat``, threads and waited-for children included),
divided by the table's duration. The load average is not used: it lags by a minute and counts
this process's own threads. A table during which others used more than :data:`NOISY_CORES` is
marked ``"noisy": true`` and ``tables.py`` leaves it out of BENCHMARKS.md; ``finish`` prints
the command that reruns the script. Other processes slow the multi-threaded float baselines far
more than one-thread loops, so ratios taken under load overstate speedups.

**Lock**: one benchmark at a time on the machine (``flock`` on :data:`LOCK`, held for the whole
run; a second script waits and says for whom). ``run_all.py`` runs the scripts one after the
other.

**Single thread** (:meth:`Run.single_thread`): reruns this script in a child process pinned to one
CPU with XLA's multi-threaded Eigen off, for single-thread ratios beside the default ones.

Results: ``benchmarks/results/<name>.json`` (``JC_BENCH_RESULTS`` overrides the directory; a
script that writes a second result, such as a timing kept apart from its quality tables, names
it ``<script>.<part>``)::

    {"meta": {...}, "tables": [{"id", "title", "columns", "rows", "notes", "noise", "noisy",
     "command", "script"}, ...], "extra": {...}}
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"  # JC_BENCH_RESULTS overrides it
LOCK = Path(tempfile.gettempdir()) / "jcompress-bench.lock"  # JC_BENCH_LOCK overrides it
NOISY_CORES = 0.10
SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"
_CHILD = "JC_BENCH_CHILD"  # set in single-thread children: no lock, results to this path
_PIN = "JC_BENCH_PIN_CPU"  # set in single-thread children: the CPU to run on
_TICK = os.sysconf("SC_CLK_TCK")
_PACKAGES = ("jax", "jaxlib", "numpy", "flax", "optax", "orbax-checkpoint", "equinox", "qwix")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "neon")


if os.environ.get(_PIN):  # before any thread pool exists (JAX starts its own on first use)
    os.sched_setaffinity(0, {int(os.environ[_PIN])})


# ------------------------------------------------------------------------------------------------
# machine state
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    wall: float
    busy: int  # ticks the whole machine was busy (user, nice, system, irq, softirq)
    steal: int  # ticks the hypervisor ran something else while this machine wanted the CPU
    own: int  # ticks of this process (all threads) and its waited-for children


def _snapshot() -> _Snapshot:
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]
    steal = cpu[7] if len(cpu) > 7 else 0
    return _Snapshot(time.monotonic(), busy, steal, own)


def others_cores(before: _Snapshot, after: _Snapshot) -> dict[str, float]:
    """Cores used by other processes (and stolen by the hypervisor) between two snapshots."""
    seconds = max(after.wall - before.wall, 1e-9)
    others = (after.busy - before.busy) - (after.own - before.own)
    steal = after.steal - before.steal
    return {
        "others_cores": round(max(others + steal, 0) / _TICK / seconds, 3),
        "steal_cores": round(steal / _TICK / seconds, 3),
        "own_cores": round((after.own - before.own) / _TICK / seconds, 3),
        "seconds": round(seconds, 2),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def _cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return {"model": model, "features": sorted(flags & set(_CPU_FLAGS))}


def _git() -> dict[str, Any]:
    def git(*args):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", "jcompress", "benchmarks"
        )
        return {"commit": commit, "dirty": bool(dirty)}
    return {"commit": None, "dirty": None}


def metadata() -> dict[str, Any]:
    """Versions, CPU, threads, XLA flags, commit and time of this run."""
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "cpu": _cpu_info(),
        "cores": os.cpu_count(),
        "threads": len(os.sched_getaffinity(0)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **_git(),
    }
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        meta["backend"] = jax.default_backend()
        meta["devices"] = [str(d) for d in jax.devices()[:4]]
    return meta


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def _block(x: Any) -> None:
    if "jax" in sys.modules:
        sys.modules["jax"].block_until_ready(x)


@dataclasses.dataclass(frozen=True)
class Timed:
    """A variant to time: ``run(*prepare())`` (``prepare`` untimed, before every sample: fresh
    buffers for a donating step, ...). ``calls`` > 1: ``run`` itself makes that many calls and
    the times are divided by it."""

    run: Callable[..., Any]
    prepare: Callable[[], tuple] | None = None
    calls: int = 1


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call medians (seconds) of interleaved samples, wall clock and process CPU time."""

    wall: dict[str, float]
    cpu: dict[str, float]
    samples: dict[str, list[float]]  # wall seconds per call, one per round, rounds aligned
    cpu_samples: dict[str, list[float]]
    inner: dict[str, int]

    def ratio(self, base: str, other: str, clock: str = "wall") -> float:
        """``time(base) / time(other)``: above 1, ``other`` is faster."""
        t = self.wall if clock == "wall" else self.cpu
        return t[base] / t[other]

    def as_dict(self) -> dict[str, Any]:
        rounds = len(next(iter(self.samples.values()), []))
        return {"wall_s": self.wall, "cpu_s": self.cpu, "inner": self.inner, "rounds": rounds}


def bind(fns: Mapping[str, Callable[..., Any]], *args: Any) -> dict[str, Callable[[], Any]]:
    """``{name: () -> fn(*args)}``: the same arguments for every variant."""
    return {name: (lambda fn=fn: fn(*args)) for name, fn in fns.items()}


def interleaved(
    variants: Mapping[str, Callable[[], Any] | Timed],
    *,
    repeats: int = 9,
    min_sample_s: float = 0.02,
    max_inner: int = 1000,
    warmup: int = 1,
    max_seconds: float | None = None,
    min_repeats: int = 3,
) -> Timing:
    """Median wall and CPU seconds per call of every variant, sampled in interleaved rounds.

    Args:
      variants: name -> a zero-argument callable (its result is waited for), or a :class:`Timed`.
      repeats: rounds; each round takes one sample of every variant, in alternating order.
      min_sample_s: a sample repeats the call until it lasts about this long (set from the
        warm-up), so that short calls are not dominated by the clock and dispatch.
      max_inner: the most calls in one sample.
      warmup: untimed calls before sampling (the first compiles).
      max_seconds: stop starting rounds after this long (at least ``min_repeats`` rounds).
      min_repeats: rounds taken whatever ``max_seconds`` says.
    """
    timed = {k: v if isinstance(v, Timed) else Timed(v) for k, v in variants.items()}

    def sample(t: Timed, n: int) -> tuple[float, float]:
        args = t.prepare() if t.prepare else ()
        _block(args)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            out = t.run(*args)
        _block(out)
        return time.perf_counter() - wall, time.process_time() - cpu

    inner = {}
    for name, t in timed.items():
        for _ in range(max(warmup, 1)):
            sample(t, 1)
        once = sample(t, 1)[0]
        inner[name] = max(1, min(max_inner, round(min_sample_s / max(once, 1e-7))))
    walls = {k: [] for k in timed}
    cpus = {k: [] for k in timed}
    names = list(timed)
    start = time.perf_counter()
    for r in range(repeats):
        if r >= min_repeats and max_seconds and time.perf_counter() - start > max_seconds:
            break
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = sample(timed[name], inner[name])
            per = inner[name] * timed[name].calls
            walls[name].append(wall / per)
            cpus[name].append(cpu / per)

    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        mid = len(xs) // 2
        return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2

    return Timing(
        wall={k: median(v) for k, v in walls.items()},
        cpu={k: median(v) for k, v in cpus.items()},
        samples=walls,
        cpu_samples=cpus,
        inner=inner,
    )


# ------------------------------------------------------------------------------------------------
# tables and runs
# ------------------------------------------------------------------------------------------------


class Table:
    """One table of results: columns, formatted rows, optional raw data per row, notes."""

    def __init__(self, table_id: str, title: str, columns: Sequence[str], timed: bool = True):
        self.id, self.title, self.columns, self.timed = table_id, title, list(columns), timed
        self.rows: list[list[Any]] = []
        self.data: list[Any] = []
        self.notes: list[str] = []
        self.noise: dict[str, float] = {}

    def row(self, cells: Sequence[Any], data: Any = None) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.id}: {len(cells)} cells for {len(self.columns)} columns")
        if not self.rows:
            print("  " + " | ".join(self.columns), flush=True)
        self.rows.append([_cell(c) for c in cells])
        self.data.append(data)
        print("  " + " | ".join(str(c) for c in self.rows[-1]), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def noisy(self) -> bool:
        """Other processes used more than :data:`NOISY_CORES` while a timed table ran."""
        return self.timed and self.noise.get("others_cores", 0.0) > NOISY_CORES

    def as_dict(self, command: str, script: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "data": self.data,
            "notes": self.notes,
            "noise": self.noise,
            "noisy": self.noisy,
            "timed": self.timed,
            "command": command,
            "script": script,
        }


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return float(f"{value:.3g}") if abs(value) < 1000 else round(value)
    return value


def markdown(table: Mapping[str, Any]) -> str:
    """A table (as stored in the JSON) in Markdown."""
    lines = [
        "| " + " | ".join(str(c) for c in table["columns"]) + " |",
        "|" + "---|" * len(table["columns"]),
    ]
    for row in table["rows"]:
        lines.append("| " + " | ".join(_fmt(c) for c in row) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class Run:
    """One run of a benchmark script: lock, metadata, tables, JSON results."""

    def __init__(
        self, name: str, *, script: str, argv: Sequence[str] | None = None, quick: bool = False
    ):
        self.name = name
        self.quick = quick
        path = Path(script).resolve()
        self.script = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        args = list(sys.argv[1:] if argv is None else argv)
        self.command = shlex.join(["python", self.script, *args])
        self.child_out = os.environ.get(_CHILD)
        self.tables: list[Table | dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self._lock = None if self.child_out else _acquire(self.command)
        self.meta = metadata()
        self.meta["quick"] = quick
        self.meta["single_thread_child"] = bool(self.child_out)

    @property
    def is_child(self) -> bool:
        return bool(self.child_out)

    interleaved = staticmethod(interleaved)

    @contextlib.contextmanager
    def table(
        self, table_id: str, title: str, columns: Sequence[str], *, timed: bool = True
    ) -> Iterator[Table]:
        """A table whose noise (other processes' CPU use) is measured while its body runs;
        ``timed=False``: its numbers do not depend on time (sizes, errors, accuracy), so it is
        never noisy."""
        t = Table(table_id, title, columns, timed)
        print(f"\n{title}", flush=True)
        before = _snapshot()
        try:
            yield t
        finally:
            t.noise = others_cores(before, _snapshot())
            flag = " NOISY" if t.noisy else ""
            print(
                f"  [others used {t.noise['others_cores']:.2f} cores over "
                f"{t.noise['seconds']:.0f} s{flag}]",
                flush=True,
            )
            self.tables.append(t)

    def adopt(self, table: dict[str, Any], note: str | None = None) -> None:
        """Add a table measured elsewhere (a single-thread child's), as stored in its JSON; it
        is rerun by this run's command."""
        notes = [*table["notes"], *([note] if note else [])]
        table = {**table, "command": self.command, "notes": notes}
        self.tables.append(table)

    def single_thread(self, args: Sequence[str], *, cpu: int | None = None) -> dict[str, Any]:
        """Rerun this script with ``args`` pinned to one CPU, XLA's Eigen single-threaded; returns
        the child's results (``{"meta", "tables", "extra"}``). The child's CPU time counts as this
        process's own in the noise measure."""
        cpus = sorted(os.sched_getaffinity(0))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            env = dict(os.environ)
            env[_CHILD] = str(out)
            env[_PIN] = str(cpus[-1] if cpu is None else cpu)
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}".strip()
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
            )
            cmd = [sys.executable, str(ROOT / self.script), *args]
            print(f"  (single-thread child: {shlex.join(cmd[1:])})", flush=True)
            subprocess.run(cmd, env=env, check=True)
            return json.loads(out.read_text())

    def finish(self) -> Path:
        """Write the JSON results; print which tables were noisy and how to rerun."""
        tables = [
            t if isinstance(t, dict) else t.as_dict(self.command, self.script) for t in self.tables
        ]
        result = {"meta": self.meta, "tables": tables, "extra": self.extra}
        result["meta"]["elapsed_s"] = round(time.monotonic() - _STARTED, 1)
        if self.child_out:
            Path(self.child_out).write_text(json.dumps(result, default=_json_default))
            return Path(self.child_out)
        results = results_dir()
        results.mkdir(parents=True, exist_ok=True)
        path = (results / "quick" if self.quick else results) / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
        noisy = [t["id"] for t in tables if t["noisy"]]
        print(f"\nwrote {path}")
        if self.quick:
            print("(--quick: a smoke test; its numbers never go into BENCHMARKS.md)")
        elif noisy:
            print(
                f"NOISY (other processes used > {NOISY_CORES} cores): {', '.join(noisy)}; these "
                "tables stay out of BENCHMARKS.md. Rerun on a quiet machine, alone:\n"
                f"    {self.command}\nthen: python benchmarks/tables.py"
            )
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        return path


_STARTED = time.monotonic()


def results_dir() -> Path:
    return Path(os.environ.get("JC_BENCH_RESULTS", RESULTS))


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _acquire(command: str):
    """Hold the machine-wide benchmark lock (waiting for whoever holds it)."""
    lock = Path(os.environ.get("JC_BENCH_LOCK", LOCK))
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another benchmark"
        print(f"waiting for the benchmark lock {lock} (held by: {holder})", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: {command}\n")
    f.flush()
    return f


def bootstrap_ci(values: Sequence[float], *, rounds: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap confidence interval of the median of ``values``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = np.asarray(values)
    medians = np.median(rng.choice(values, (rounds, len(values)), replace=True), axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]
