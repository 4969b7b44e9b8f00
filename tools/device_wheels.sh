#!/usr/bin/env bash
# Build the wheels a lent GPU machine needs to run tools/gpu_check.sh (docs/gpu-check.md).
#
#   tools/device_wheels.sh [PYTHON_VERSION [TORCH_VERSION [CUDA_ARCH]]]    # defaults: 3.12 2.11.0 9.0
#
# The device machine brings its own Python and CUDA torch, no mm* packages and no package index, so
# everything else travels as wheels: mmcv with its CUDA ops compiled here for that Python, that torch and
# that GPU (nvcc is on this machine; ~40 min on 2 cores), plus pure and binary wheels of what cvtk-job
# imports there, at the versions of requirements/constraints.txt. The result lands in the checkout's
# .gpu/wheels/ (or $DEVICE_WHEELS), ignored by git and carried to the device by `carry: [".gpu"]`: the
# checkout outlives a session where ~/.cache and /tmp did not, and a session lent a device then starts the
# check at once instead of after ~20 minutes of compiling. Written under a temporary name and renamed when
# complete, so a half-built folder is never taken for a good one; device.json says which torch, CUDA and
# Python the wheels are for (tools/gpu_check.sh's first step compares them with the machine's).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
TORCHV=${2:-2.11.0}
ARCH=${3:-9.0}
TAG=cp${PYV/./}
WORK=${DEVICE_WHEELS_WORK:-/tmp/cvtk-job-device-wheels}
pin() { sed -n "s/^$1==//Ip" requirements/constraints.txt; }

python=
for candidate in "python$PYV" "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/"$PYV"*/bin/"python$PYV"; do
  # a pyenv shim is on PATH even where that version is not selected: take only one that runs
  if "$candidate" -c "" 2>/dev/null; then python=$candidate; fi
done
[ -n "$python" ] || { echo "device_wheels: no python$PYV here (pyenv install $PYV, or put it on PATH)" >&2; exit 2; }
command -v nvcc >/dev/null || { echo "device_wheels: nvcc not found (CUDA toolkit needed to compile mmcv's ops)" >&2; exit 2; }

mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ] || ! "$WORK/venv/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCHV'" 2>/dev/null; then
  rm -rf "$WORK/venv"
  "$python" -m venv "$WORK/venv"
  # PyPI's default torch for Linux is a CUDA build; its nvidia-* packages carry the CUDA headers torch's own include.
  "$WORK/venv/bin/pip" install -q "torch==$TORCHV" wheel "setuptools==$(pin setuptools)" ninja "numpy<3"
fi
cu=$("$WORK/venv/bin/python" -c "import torch; print('cu' + (torch.version.cuda or 'none').replace('.', '')[:3])")
[ "$cu" != cunone ] || { echo "device_wheels: torch==$TORCHV from the index is a CPU build" >&2; exit 2; }
DEST=${DEVICE_WHEELS:-$PWD/.gpu/wheels}
OUT="$DEST.partial"
rm -rf "$OUT" && mkdir -p "$OUT"

# mmcv, compiled from its sdist unpacked in $WORK (ninja keeps the objects there: a rerun after a failure
# goes on where it stopped instead of starting the ~40 minutes again).
# Headers: this machine's CUDA toolkit lacks the cuSPARSE/cuBLAS/... headers torch's headers include; the
# nvidia-* packages torch installed have them. The toolkit's own include comes first: mmcv's C++ files are
# compiled without it on the command line, and the packages' cuda_runtime_api.h lacks the crt/ it includes.
# CUDA_HOME, else /usr/local/cuda (nvcc on PATH may be a wrapper script: its folder is no toolkit).
cuda_home=${CUDA_HOME:-/usr/local/cuda}
[ -f "$cuda_home/include/cuda_runtime_api.h" ] \
  || { echo "device_wheels: no CUDA toolkit at $cuda_home (set CUDA_HOME to the toolkit's folder)" >&2; exit 2; }
site=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
headers=$(find "$site/nvidia" -maxdepth 3 -type d -name include 2>/dev/null | paste -sd: -)
mmcv=$(pin mmcv)
built="$WORK/mmcv-$mmcv-$TAG-sm${ARCH/./}"
if [ ! -f "$built.done" ]; then
  src="$built.src"
  if [ ! -f "$src/setup.py" ]; then
    rm -rf "$src" "$WORK/sdist" && mkdir -p "$src" "$WORK/sdist"
    "$WORK/venv/bin/pip" download -q --no-deps --no-binary mmcv -d "$WORK/sdist" "mmcv==$mmcv"
    tar -xzf "$WORK"/sdist/mmcv-"$mmcv".tar.gz -C "$src" --strip-components=1
  fi
  rm -rf "$WORK/build" && mkdir -p "$WORK/build"
  echo "device_wheels: compiling mmcv $mmcv for $TAG, torch $TORCHV ($cu), sm_${ARCH/./} (~40 min on 2 cores)"
  env FORCE_CUDA=1 MMCV_WITH_OPS=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" CUDA_HOME="$cuda_home" \
      CPATH="$cuda_home/include:$headers${CPATH:+:$CPATH}" \
      "$WORK/venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$WORK/build" "$src"
  # Debug sections make the extension ~10x larger than the code; the device copy travels in a 64 MiB carry.
  (cd "$WORK/build" && "$WORK/venv/bin/python" -m wheel unpack -d unpacked mmcv-*.whl \
     && find unpacked -name '_ext*.so' -exec strip --strip-debug {} + \
     && rm mmcv-*.whl && "$WORK/venv/bin/python" -m wheel pack -d . unpacked/mmcv-*)
  rm -f "$WORK"/mmcv-"$mmcv"-"$TAG"-*.whl && mv "$WORK"/build/mmcv-*.whl "$WORK/"
  touch "$built.done"
fi
cp "$WORK"/mmcv-"$mmcv"-"$TAG"-*.whl "$OUT/"

# What cvtk-job, doctor, the GPU tests and bench --gpu import there, beyond what the device image had on
# 2026-11-26 (numpy, scipy, OpenCV, Pillow, matplotlib, PyYAML, packaging; tools/gpu_check.sh's first step checks
# they are still there): mm*'s other requirements included. scipy (mmdet.models imports it) must come from the
# image: its wheel alone (35 MB) would not fit the 64 MiB carry beside the rest. Not awscrt, tifffile,
# imagecodecs (S3 transfers and large TIFFs, which the check does not run).
names="mmdet mmengine pycocotools faster-coco-eval argparse-dataclass addict yapf platformdirs termcolor
       terminaltables shapely six tqdm rich markdown-it-py mdurl pygments setuptools
       boto3 botocore s3transfer jmespath python-dateutil urllib3"
specs=()
for name in $names; do
  version=$(pin "$name")
  [ -n "$version" ] || { echo "device_wheels: $name has no pin in requirements/constraints.txt" >&2; exit 2; }
  specs+=("$name==$version")
done
"$WORK/venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_27_x86_64 --platform linux_x86_64 -d "$OUT" "${specs[@]}"

"$WORK/venv/bin/python" - "$OUT" "$TORCHV" "$cu" "$PYV" "$ARCH" <<'EOF'
import json, pathlib, sys
out, torch_version, cuda, python, arch = pathlib.Path(sys.argv[1]), *sys.argv[2:]
wheels = sorted(p.name for p in out.glob("*.whl"))
(out / "device.json").write_text(json.dumps({"torch": torch_version, "cuda": cuda, "python": python, "arch": arch,
                                              "wheels": wheels}, indent=1))
EOF
rm -rf "$DEST" && mv "$OUT" "$DEST"
echo "device_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
