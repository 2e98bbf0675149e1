"""The README as a stranger reads it: its ``python`` blocks and its ``jcompress`` commands run
as written, from an empty temporary working directory."""

import pathlib
import re
import shlex

import numpy as np
import pytest

from jcompress import checkpoint
from jcompress.cli import main

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_blocks_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 6, "the tour lost its code blocks"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "bytes on disk" in out


def readme_commands() -> list[str]:
    """Every ``jcompress ...`` command the README shows (code spans and bash blocks)."""
    text = README.read_text()
    found = re.findall(r"`(jcompress (?:demo|inspect|quantize|prune|budget)[^`]*)`", text)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        found += re.findall(r"(?:^|&& )(jcompress [^\n&#]*)", block, re.M)
    if "`--structure nm:2:4`" in text:  # "(or `--structure nm:2:4`)" after the prune command
        found.append("jcompress prune IN OUT --structure nm:2:4")
    return sorted({c.strip() for c in found})


def test_readme_shows_every_command():
    commands = readme_commands()
    for sub in ("demo", "inspect", "quantize", "prune", "budget"):
        assert any(c.split()[1] == sub for c in commands), sub


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.split()[1] != "demo"])
def test_readme_command_runs_from_an_empty_directory(command, tmp_path, monkeypatch, capsys):
    """``DIR``/``IN`` are a Flax checkpoint in the working directory, ``OUT`` a new one there.
    (``jcompress demo`` itself runs in tests/test_cli.py::test_demo_quick, the same way.)"""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Dense_0": {"kernel": rng.standard_normal((64, 32)).astype(np.float32)},
            "Dense_1": {"kernel": rng.standard_normal((32, 8)).astype(np.float32)},
        }
    }
    checkpoint.save("model", params)
    names = {"DIR": "model", "IN": "model", "OUT": "model-out"}
    argv = [names.get(a, a) for a in shlex.split(command)[1:]]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, (command, err)
    assert out.strip()
    if "OUT" in command:
        assert checkpoint.load("model-out")["params"]["Dense_0"]["kernel"].shape == (64, 32)


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["inspect"], ["quantize"], ["prune"], ["budget"]]
)
def test_help_from_an_empty_directory(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: jcompress")
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


ARCHITECTURE = README.parent / "ARCHITECTURE.md"


def test_architecture_maps_every_module_and_names_only_real_files():
    """ARCHITECTURE.md's module map covers every module, and every file it names exists."""
    text = ARCHITECTURE.read_text()
    package = README.parent / "jcompress"
    table = " ".join(line for line in text.splitlines() if line.startswith("| `"))
    for module in sorted(package.rglob("*.py")):
        if module.name == "__init__.py":
            continue
        rel = module.relative_to(package).as_posix()
        assert f"`{rel}`" in table, f"{rel} is missing from ARCHITECTURE.md's module map"
    for ref in re.findall(r"`((?:tests|benchmarks|studies|examples)/[\w/.-]+\.py)`", text):
        assert (README.parent / ref).is_file(), ref
    for ref in re.findall(
        r"`((?:tree|runtime|calibration|pruning|quantization|structure|checkpoint|distillation)/_\w+\.py)`",
        text,
    ):
        assert (package / ref).is_file(), ref
