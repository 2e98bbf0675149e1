"""The benchmark harness (timer, noise measure, lock, results) and the BENCHMARKS.md generator,
on a fake clock and synthetic results: no assertion depends on real timing."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, str(BENCH))  # the scripts import _harness as a sibling
harness = _load("_harness")
tables = _load("tables")


class FakeClock:
    """``perf_counter`` / ``process_time`` that advance only when a timed function runs."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def run(self, seconds, cpu_share=1.0):
        def fn():
            self.wall += seconds
            self.cpu += seconds * cpu_share

        return fn


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", lambda: c.wall)
    monkeypatch.setattr(harness.time, "process_time", lambda: c.cpu)
    return c


def test_interleaved_medians_order_and_inner(clock):
    order = []

    def tracked(name, seconds, share=1.0):
        run = clock.run(seconds, share)

        def fn():
            order.append(name)
            run()

        return fn

    t = harness.interleaved(
        {"a": tracked("a", 0.004), "b": tracked("b", 0.001, 2.0)}, repeats=4, min_sample_s=0.02
    )
    assert t.inner == {"a": 5, "b": 20}  # each sample lasts ~min_sample_s
    assert t.wall == pytest.approx({"a": 0.004, "b": 0.001})
    assert t.cpu == pytest.approx({"a": 0.004, "b": 0.002})
    assert t.ratio("a", "b") == pytest.approx(4.0) and t.ratio("a", "b", "cpu") == pytest.approx(2)
    assert all(len(v) == 4 for v in (*t.samples.values(), *t.cpu_samples.values()))
    # warm-up (1 + 1 calls each), then rounds alternating a b, b a, a b, b a
    assert order[:4] == ["a", "a", "b", "b"]
    runs = [x for i, x in enumerate(order[4:]) if i == 0 or order[4 + i - 1] != x]
    assert runs == ["a", "b", "a", "b", "a"]  # a b | b a | a b | b a, equal neighbours merged


def test_interleaved_budget_and_prepare(clock):
    prepared = []

    def prepare():
        prepared.append(1)
        clock.wall += 100.0  # untimed: not part of any sample
        return (2,)

    t = harness.interleaved(
        {"x": harness.Timed(lambda n: clock.run(0.5 * n)(), prepare=prepare, calls=2)},
        repeats=10,
        min_sample_s=0.0,
        max_seconds=1.0,
        min_repeats=3,
    )
    assert t.wall["x"] == pytest.approx(0.5)  # per call: the run makes 2 calls of 0.5 s each
    assert len(t.samples["x"]) == 3  # the budget stops after the minimum rounds
    assert len(prepared) == 2 + 3  # warm-up samples and every round prepare afresh


def test_noise_is_other_processes_cpu_time():
    tick = harness._TICK
    before = harness._Snapshot(wall=10.0, busy=1000, steal=5, own=300)
    after = harness._Snapshot(
        wall=12.0, busy=1000 + 3 * tick, steal=5 + tick // 10, own=300 + 2 * tick
    )
    noise = harness.others_cores(before, after)
    # 3 s of busy CPU in 2 s, 2 s of them this process's: others 0.5 core, plus 0.05 stolen
    assert noise["others_cores"] == pytest.approx(0.55, abs=0.01)
    assert noise["own_cores"] == pytest.approx(1.0) and noise["seconds"] == 2.0
    real = harness.others_cores(harness._snapshot(), harness._snapshot())
    assert real["others_cores"] >= 0


def test_tables_noisy_only_when_timed():
    t = harness.Table("t", "title", ["a", "b"])
    t.noise = {"others_cores": 0.5}
    assert t.noisy
    t.noise = {"others_cores": 0.05}
    assert not t.noisy
    u = harness.Table("u", "sizes", ["a"], timed=False)
    u.noise = {"others_cores": 1.5}
    assert not u.noisy
    with pytest.raises(ValueError, match="2 cells for 1 columns"):
        u.row([1, 2])
    t.row([1.23456, float("nan")])
    assert t.rows == [[1.23, "n/a"]]


def test_run_writes_results_holds_the_lock_and_adopts(tmp_path, monkeypatch, capsys):
    import fcntl

    monkeypatch.setenv("JC_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("JC_BENCH_LOCK", str(tmp_path / "lock"))
    monkeypatch.delenv("JC_BENCH_CHILD", raising=False)
    run = harness.Run("demo", script=str(BENCH / "demo.py"), argv=["--x"])
    with open(tmp_path / "lock") as other:  # a second benchmark would have to wait
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert "pid" in (tmp_path / "lock").read_text()
    with run.table("t1", "a table", ["k", "v"]) as t:
        t.row(["x", 1.0], data={"raw": 1})
        t.note("a note")
    run.adopt({**t.as_dict("child cmd", "s"), "id": "t1_one_thread"}, "one thread")
    path = run.finish()
    assert path == tmp_path / "results" / "demo.json"
    data = json.loads(path.read_text())
    assert data["meta"]["versions"]["python"] and data["meta"]["cores"] >= 1
    assert "xla_flags" in data["meta"] and "cpu" in data["meta"]
    first, second = data["tables"]
    assert first["command"] == "python benchmarks/demo.py --x" == second["command"]
    assert first["rows"] == [["x", 1.0]] and first["data"] == [{"raw": 1}]
    assert second["notes"] == ["a note", "one thread"] and "others_cores" in first["noise"]
    with open(tmp_path / "lock") as other:  # released
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    quick = harness.Run("demo", script=str(BENCH / "demo.py"), argv=[], quick=True)
    assert quick.finish() == tmp_path / "results" / "quick" / "demo.json"
    assert "smoke test" in capsys.readouterr().out


def _result(noisy: bool, timed: bool = True) -> dict:
    table = {
        "id": "t",
        "title": "T",
        "columns": ["batch", "ratio"],
        "rows": [[1, 1.5], [4, 2.25]],
        "notes": ["int8: limbs_nk"],
        "noise": {"others_cores": 0.5 if noisy else 0.02, "seconds": 30},
        "noisy": noisy,
        "timed": timed,
        "command": "python benchmarks/x.py",
        "script": "benchmarks/x.py",
    }
    meta = {"date": "2026-12-05T00:00:00", "versions": {"jax": "0.10.2"}, "threads": 2}
    return {"meta": {**meta, "cpu": {"model": "CPU"}, "commit": "abc"}, "tables": [table]}


def test_tables_rebuild_only_quiet_tables(tmp_path):
    text = "intro\n<!-- table x/t -->\nold\n<!-- /table -->\nmiddle\n"
    text += "<!-- table y/t -->\n<!-- /table -->\n"
    quiet, _ = tables.rebuild(text, {"x": _result(False)})
    assert quiet.startswith("intro\n<!-- table x/t -->\n**T**") and "\nmiddle\n" in quiet
    assert "| 4 | 2.25 |" in quiet and "- int8: limbs_nk" in quiet
    assert "`python benchmarks/x.py` · 2026-12-05 · commit abc" in quiet
    assert "other processes used 0.02 cores over 30 s" in quiet
    assert "Not measured yet (no table `t` in `benchmarks/results/y.json`)" in quiet
    again, _ = tables.rebuild(quiet, {"x": _result(False)})
    assert again == quiet  # idempotent
    noisy, unplaced = tables.rebuild(text, {"x": _result(True), "z": _result(False)})
    assert "Not copied" in noisy and "0.50 cores" in noisy and "| 4 |" not in noisy
    assert unplaced == ["z/t"]
    untimed, _ = tables.rebuild(text, {"x": _result(False, timed=False)})
    assert "not a timing" in untimed
    # the command line: --check fails on a stale file, the rewrite fixes it
    results = tmp_path / "results"
    results.mkdir()
    (results / "x.json").write_text(json.dumps(_result(False)))
    (results / "old.json").write_text(json.dumps({"rows": []}))  # not written by the harness
    md = tmp_path / "B.md"
    md.write_text(text)
    args = ["--results", str(results), "--markdown", str(md)]
    assert tables.main([*args, "--check"]) == 1
    assert tables.main(args) == 0 and tables.main([*args, "--check"]) == 0


def test_benchmarks_md_is_generated_from_the_committed_results():
    """Every marker in BENCHMARKS.md names a script that exists (``script`` or, for a script
    that writes several result files, ``script.part``), and the file is what ``tables.py``
    makes of ``benchmarks/results``."""
    text = (BENCH.parent / "BENCHMARKS.md").read_text()
    names = {m.group("name") for m in tables.MARKER.finditer(text)}
    assert names and all((BENCH / f"{n.split('.')[0]}.py").exists() for n in names)
    assert tables.main(["--check"]) == 0


def test_every_benchmark_uses_the_harness():
    run_all = _load("run_all")
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"_harness", "tables", "run_all"}
    assert scripts == set(run_all.SCRIPTS)
    for name in scripts:
        source = (BENCH / f"{name}.py").read_text()
        assert "from _harness import" in source and "Run(" in source, name
        assert "def median_times" not in source and "def _time(" not in source, name
