#!/usr/bin/env bash
# The checks that need a CUDA GPU, which CI and the development machine lack: doctor (mmcv's ops on the
# GPU), the GPU tests (tests/integration/test_gpu.py) and the GPU benchmark (docs/benchmarks-gpu.md).
#
#   tools/gpu_check.sh [RESULTS_DIR]      # on a GPU machine where `make setup` (or the image) ran
#
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3). Each step's
# output is kept in RESULTS_DIR (default outputs/gpu-check) even when a later step fails.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-outputs/gpu-check}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run it, keep its output, remember a failure and go on
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$RESULTS/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
step gpus nvidia-smi
step doctor "$PY" entrypoint.py doctor
step tests "$PY" -m pytest -p no:cacheprovider tests/integration/test_gpu.py -v
step bench env BENCH_DIR="${BENCH_DIR:-/tmp/cvtk-job-bench}" "$PY" bench/run.py --gpu
cp docs/benchmarks-gpu.md "$RESULTS/" 2>/dev/null
exit $status
