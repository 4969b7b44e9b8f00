#!/usr/bin/env bash
# The checks that need a CUDA GPU, which CI and the development machine lack: doctor (mmcv's ops on the
# GPU), the GPU benchmark (its table: RESULTS_DIR/benchmarks-gpu.md, to be copied into docs/) and the GPU
# tests (tests/integration/test_gpu.py).
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
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
step gpus nvidia-smi
# The stack this machine brings, against the one the carried wheels were built for (tools/device_wheels.sh
# writes device.json beside them): a mismatch stops here, in one line, instead of failing every later step.
step stack "$PY" - "${DEVICE_WHEELS_JSON:-.gpu/wheels/device.json}" <<'EOF'
import importlib.util, json, os, sys
import numpy, torch
missing = [m for m in ("scipy", "cv2", "PIL", "matplotlib", "yaml", "packaging")  # the image's, not carried
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"this machine's Python lacks {', '.join(missing)}: tools/device_wheels.sh expects the image to have "
             "them; add their wheels to its list (the carry holds 64 MiB) and carry again")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), numpy {numpy.__version__}")
if os.path.exists(sys.argv[1]):
    with open(sys.argv[1]) as fh:
        built = json.load(fh)
    here = (torch.__version__.split("+")[0], "cu" + (torch.version.cuda or "").replace(".", "")[:3])
    if here != (built["torch"], built["cuda"]):
        sys.exit(f"the wheels were built for torch {built['torch']} {built['cuda']}, this machine has {here[0]} "
                 f"{here[1]}: run tools/device_wheels.sh {sys.version_info[0]}.{sys.version_info[1]} {here[0]} "
                 "on the development machine and carry the new folder")
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if built.get("python", python) != python:
        sys.exit(f"the wheels were built for Python {built['python']}, this machine has {python}: run "
                 f"tools/device_wheels.sh {python} {here[0]} on the development machine and carry the new folder")
    arch = "{}.{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    if arch and built.get("arch", arch) != arch:  # mmcv's CUDA ops run only on the GPU generation compiled for
        sys.exit(f"mmcv's CUDA ops were compiled for sm_{built['arch'].replace('.', '')}, this GPU is "
                 f"sm_{arch.replace('.', '')}: run tools/device_wheels.sh {python} {here[0]} {arch} and carry again")
    print("the carried wheels match this stack")
EOF
[ "$rc" -eq 0 ] || exit 1  # (a failed nvidia-smi alone goes on: doctor says what torch sees)
step doctor "$PY" entrypoint.py doctor
# cvtk-job's own CUDA code (assigner, sampler, mask targets, the RoI extractor under autocast) against mmdet's and
# fp32's, before the benchmark measures a model built from it: seconds, where the training tests take minutes.
OPS_TESTS="equal_mmdets or under_autocast"
step cuda_ops "$PY" -m pytest -p no:cacheprovider tests/integration/test_gpu.py -v -k "$OPS_TESTS"
# The benchmark before the tests: it is what the open issue waits for, and the device's per-command limit
# (10 min) may cut the last step short. Its table is rewritten in RESULTS after every row for that reason.
cp docs/benchmarks-gpu.md "$RESULTS/benchmarks-gpu.md"
# DetInferencer's row is off unless asked for (met at 2.64x on 2026-11-26; ~3 of the session's 15 device minutes).
step bench env BENCH_DIR="${BENCH_DIR:-/tmp/cvtk-job-bench}" BENCH_GPU_TABLE="$RESULTS/benchmarks-gpu.md" \
  BENCH_GPU_DETINFERENCER="${BENCH_GPU_DETINFERENCER:-0}" "$PY" bench/run.py --gpu
step tests "$PY" -m pytest -p no:cacheprovider tests/integration/test_gpu.py -v -k "not ($OPS_TESTS)"
exit $status
