#!/usr/bin/env bash
# The GPU rows of benchmarks/runtime.py (issue #4) in one unattended call, from any directory:
#
#     bash benchmarks/runtime_gpu.sh [extra runtime.py arguments]
#
# Prints the GPU and package versions, runs `runtime.py --gpu` (no cell starts after 240 s;
# killed at 420 s), tees the log to $OUT/runtime_gpu.log and the JSON to $OUT/runtime_gpu.json
# when OUT is set (else benchmarks/results/). Expected: 3-5 minutes on an H200.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-benchmarks/results}/runtime_gpu.log"
mkdir -p "$(dirname "$log")"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import sys, jax, flax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__)" 2>&1
} | tee "$log"
timeout 420 python3 benchmarks/runtime.py --gpu "$@" 2>&1 | tee -a "$log"
