"""Rebuild the tables of BENCHMARKS.md from the JSON results of the benchmark scripts.

BENCHMARKS.md holds prose and markers; everything between a pair of markers is generated::

    <!-- table runtime/decode_4096x4096 -->
    (generated: the table, the command that made it, the machine, its noise measure)
    <!-- /table -->

``runtime/decode_4096x4096`` names ``results/runtime.json`` and the table ``decode_4096x4096``
in it. A table whose run was noisy (other processes used more than ``_harness.NOISY_CORES``
cores while it ran) or that has no results yet is not copied: the markers then hold a line
saying so and how to measure it. Nothing else in the file changes.

    python benchmarks/tables.py                  # rewrite BENCHMARKS.md in place
    python benchmarks/tables.py --check          # exit 1 if BENCHMARKS.md is out of date
    python benchmarks/tables.py --results DIR --markdown FILE
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import NOISY_CORES, ROOT, markdown, results_dir

MARKER = re.compile(
    r"(<!-- table (?P<name>[\w.\-]+)/(?P<table>[\w.\-]+) -->\n)(?P<body>.*?)(<!-- /table -->)",
    re.S,
)
RERUN = "python benchmarks/run_all.py"


def provenance(result: dict[str, Any], table: dict[str, Any]) -> str:
    """One line: the command, the machine and the noise measure of a table."""
    meta = result["meta"]
    versions = meta.get("versions", {})
    noise = table["noise"]
    if not table.get("timed", True):
        load = "not a timing (the noise measure does not apply)"
    else:
        load = (
            f"other processes used {noise.get('others_cores', float('nan')):.2f} cores over "
            f"{noise.get('seconds', 0):.0f} s"
        )
    cpu = meta.get("cpu", {})
    commit = meta.get("commit") or "?"
    if meta.get("dirty"):
        commit += " + local changes"
    return (
        f"`{table['command']}` · {meta.get('date', '?')[:10]} · commit {commit} · "
        f"jax {versions.get('jax', '?')} on {cpu.get('model', '?')}, "
        f"{meta.get('threads', '?')} threads · {load}"
    )


def render(result: dict[str, Any] | None, name: str, table_id: str) -> str:
    """The generated text between one pair of markers."""
    table = None
    if result is not None:
        table = next((t for t in result.get("tables", []) if t["id"] == table_id), None)
    if table is None:
        return (
            f"_Not measured yet (no table `{table_id}` in `benchmarks/results/{name}.json`): "
            f"run `{RERUN}` alone on a quiet machine, then `python benchmarks/tables.py`._\n"
        )
    if table["noisy"]:
        return (
            f"_Not copied: while the last run of `{table['command']}` measured this table, other "
            f"processes used {table['noise']['others_cores']:.2f} cores (more than "
            f"{NOISY_CORES}). Rerun `{RERUN}` alone on a quiet machine, then "
            "`python benchmarks/tables.py`._\n"
        )
    lines = [f"**{table['title']}**", "", markdown(table), ""]
    lines += [f"- {note}" for note in table.get("notes", [])]
    lines += [f"- {provenance(result, table)}", ""]
    return "\n".join(lines)


def load(results: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "tables" in data:  # written by _harness.Run
            out[path.stem] = data
    return out


def rebuild(text: str, results: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """``text`` with every marked table regenerated, and the result tables no marker names."""
    placed = set()

    def one(m: re.Match) -> str:
        name, table_id = m.group("name"), m.group("table")
        placed.add((name, table_id))
        return m.group(1) + render(results.get(name), name, table_id) + m.group(5)

    new = MARKER.sub(one, text)
    unplaced = [
        f"{name}/{t['id']}"
        for name, result in results.items()
        for t in result["tables"]
        if (name, t["id"]) not in placed
    ]
    return new, unplaced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None, help="results directory")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    results = load(args.results or results_dir())
    text = args.markdown.read_text()
    new, unplaced = rebuild(text, results)
    if unplaced:
        print(f"tables without a marker in {args.markdown.name}: {', '.join(unplaced)}")
    if args.check:
        if new != text:
            print(f"{args.markdown} is out of date: run python benchmarks/tables.py")
            return 1
        return 0
    if new != text:
        args.markdown.write_text(new)
    print(f"{args.markdown}: {len(MARKER.findall(new))} tables from {len(results)} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
