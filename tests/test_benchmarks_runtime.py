"""Smoke test of ``benchmarks/runtime.py --dry-run`` (the GPU mode's code path on CPU) and of its
compiled-HLO reader on hand-written GPU-style HLO (no GPU here)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "runtime.py"


@pytest.fixture(scope="module")
def runtime():
    spec = importlib.util.spec_from_file_location("benchmarks_runtime", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules (dataclasses) look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# the shapes of a K=64, N=32 weight in the two ways a GPU compiler can treat it
FUSED = """HloModule jit_f, entry_computation_layout={(bf16[4,64]{1,0})->bf16[4,32]{1,0}}

%gemm_dot (p0: bf16[4,64], p1: s4[64,32], p2: bf16[1,32]) -> bf16[4,32] {
  %p0 = bf16[4,64]{1,0} parameter(0)
  %p1 = s4[64,32]{1,0:E(4)} parameter(1)
  %convert.1 = bf16[64,32]{1,0} convert(%p1)
  %p2 = bf16[1,32]{1,0} parameter(2)
  %broadcast = bf16[64,32]{1,0} broadcast(%p2), dimensions={0,1}
  %multiply = bf16[64,32]{1,0} multiply(%convert.1, %broadcast)
  ROOT %dot.3 = bf16[4,32]{1,0} dot(%p0, %multiply), lhs_contracting_dims={1}, \
rhs_contracting_dims={0}
}

ENTRY %main.9 (x: bf16[4,64], w: s4[64,32], s: bf16[1,32]) -> bf16[4,32] {
  %x = bf16[4,64]{1,0} parameter(0)
  %w = s4[64,32]{1,0:E(4)} parameter(1)
  %s = bf16[1,32]{1,0} parameter(2)
  ROOT %gemm_fusion_dot.1 = bf16[4,32]{1,0} fusion(%x, %w, %s), kind=kCustom, calls=%gemm_dot, \
backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
}
"""

MATERIALIZED = """HloModule jit_f, entry_computation_layout={(bf16[4,64]{1,0})->bf16[4,32]{1,0}}

%fused_convert (param_0: s8[64,32], param_1: bf16[1,32]) -> bf16[64,32] {
  %param_0 = s8[64,32]{1,0} parameter(0)
  %convert.2 = bf16[64,32]{1,0} convert(%param_0)
  %param_1 = bf16[1,32]{1,0} parameter(1)
  %broadcast.1 = bf16[64,32]{1,0} broadcast(%param_1), dimensions={0,1}
  ROOT %multiply.1 = bf16[64,32]{1,0} multiply(%convert.2, %broadcast.1)
}

ENTRY %main.9 (x: bf16[4,64], w: s8[64,32], s: bf16[1,32]) -> bf16[4,32] {
  %x = bf16[4,64]{1,0} parameter(0)
  %w = s8[64,32]{1,0} parameter(1)
  %s = bf16[1,32]{1,0} parameter(2)
  %loop_fusion = bf16[64,32]{1,0} fusion(%w, %s), kind=kLoop, calls=%fused_convert
  %bitcast.4 = bf16[64,32]{1,0} bitcast(%loop_fusion)
  ROOT %custom-call.1 = bf16[4,32]{1,0} custom-call(%x, %bitcast.4), \
custom_call_target="__cublas$gemm"
}
"""


def test_weight_reads_fused_int4(runtime):
    r = runtime.weight_reads(FUSED, 64, 32)
    assert r["stored"] == ["s4"]
    assert r["matmul_reads"] == ["s4"]
    assert (r["float_copies"], r["int_copies"]) == (0, 0)
    assert r["one_fusion"] is True
    assert len(r["snippets"]) == 1 and "__triton_gemm" in r["snippets"][0]
    assert "body broadcast,convert,dot,multiply" in r["snippets"][0]


def test_weight_reads_materialized_dequantization(runtime):
    r = runtime.weight_reads(MATERIALIZED, 64, 32)
    assert r["stored"] == ["s8"]
    assert r["matmul_reads"] == ["bf16"]  # through the bitcast, from the loop fusion
    assert r["other_reads"] == ["s8"]
    assert (r["float_copies"], r["int_copies"]) == (1, 0)
    assert r["one_fusion"] is False and r["int_in_matmul"] is False


def test_gpu_mode_without_gpu_exits_clearly(runtime, capsys):
    assert runtime.main(["--gpu"]) == 2
    assert "no GPU visible" in capsys.readouterr().out


def test_dry_run(runtime, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert runtime.main(["--dry-run", "--n", "256", "--batches", "1"]) == 0
    data = json.loads((tmp_path / "runtime_gpu_dryrun.json").read_text())
    (row,) = data["rows"]
    assert (row["k"], row["n"], row["batch"], row["layers"]) == (256, 256, 1, 2)
    assert row["errors"] == {}
    v = row["variants"]
    expected = {"bf16", "int8 w-only", "int4 w-only", "int4 widened", "int8 g128 w-only",
                "int8 dequant", "int8 x int8", "int8 x int8 static"}  # fmt: skip
    assert expected <= set(v)
    assert v["bf16"]["ratio"] == 1.0
    assert all(rec["ratio"] > 0 and rec["us"] > 0 for rec in v.values())
    # two layers of 256 x 256: bf16 2 bytes, int8 1 byte, int4 half a byte per weight (+ scales)
    assert v["bf16"]["weight_bytes"] == 2 * 2 * 256 * 256
    assert v["int8 w-only"]["weight_bytes"] - 2 * 256 * 256 == v["int4 w-only"]["weight_bytes"] - (
        256 * 256
    )
    paths = {e["path"] for e in v["int8 w-only"]["explain"]}
    assert paths == {"Dense_0/kernel", "Dense_1/kernel"}
    # on CPU the weight-only int8 path is an s8 x s8 integer dot reading the stored weight
    assert all(e["compiled"] == "integer dot" for e in v["int8 w-only"]["explain"])
    assert v["int8 w-only"]["hlo"]["one_fusion"] is True
    assert v["int8 dequant"]["hlo"]["float_copies"] == 2  # one float weight per layer
    assert v["int4 w-only"]["hlo"]["stored"] == ["s4"]
    out = capsys.readouterr().out
    assert "| K x N | batch | bf16" in out and "| 256x256 | 1 |" in out
