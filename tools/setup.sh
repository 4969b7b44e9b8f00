#!/usr/bin/env bash
# Create .venv with the pinned stack. Idempotent; `make setup` runs it.
#
# mmcv 2.1.0 has no wheel on PyPI: it is compiled from its sdist (~12 min on 2 cores) once per
# machine into a wheelhouse outside the checkout, keyed by Python and torch version, so every later
# set-up on the same machine (a fresh clone, CI) installs the cached wheel in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=requirements/constraints.txt
TORCH_PIN=$(grep -E '^torch==' "$CONSTRAINTS")
MMCV_PIN=$(grep -E '^mmcv==' "$CONSTRAINTS")
PYTAG=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
CACHE=${CVTK_JOB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cvtk-job}
WHEELHOUSE=${CVTK_JOB_WHEELHOUSE:-$CACHE/wheelhouse/${PYTAG}-${TORCH_PIN#torch==}}
mkdir -p "$WHEELHOUSE"

# pip without its noise about the image's extra index folders. The filter never fails (grep exits 1 when
# it prints nothing); pip's own failure does, under pipefail: nothing after it runs or is marked complete.
pip_quiet() { "$@" --quiet --disable-pip-version-check 2>&1 | { grep -v -E 'is ignored: it is neither' || true; }; }

build_mmcv_wheel() {
  local build_venv="$CACHE/mmcv-build-venv"
  echo "setup: building ${MMCV_PIN} with compiled ops (once per machine, ~12 min on 2 cores)"
  "$PYTHON" -m venv "$build_venv"
  # torch asks for setuptools>=77, mmcv's setup.py for <70: install torch first, then downgrade.
  pip_quiet "$build_venv/bin/pip" install -c "$CONSTRAINTS" "$TORCH_PIN" numpy
  pip_quiet "$build_venv/bin/pip" install -r requirements/mmcv-build.txt
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$build_venv/bin/pip" wheel --no-build-isolation \
    --no-deps "$MMCV_PIN" -w "$WHEELHOUSE" 2>&1 | { grep -v -E 'is ignored: it is neither' || true; }
  rm -rf "$build_venv"
}

if ! ls "$WHEELHOUSE"/mmcv-"${MMCV_PIN#mmcv==}"-*.whl >/dev/null 2>&1; then
  build_mmcv_wheel
fi

# Every pinned wheel goes into the wheelhouse once (keyed by the pin file's hash); later set-ups install
# from it without any index lookups, which is what makes a second set-up take seconds, not minutes.
PINS_HASH=$(cat "$CONSTRAINTS" pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$WHEELHOUSE/.complete-$PINS_HASH" ]; then
  grep -v -E '^\s*(#|$)|^mmcv==' "$CONSTRAINTS" | sed 's/ *#.*//' > "$WHEELHOUSE/.pins"
  pip_quiet "$PYTHON" -m pip download --no-deps --only-binary :all: -d "$WHEELHOUSE" -r "$WHEELHOUSE/.pins"
  touch "$WHEELHOUSE/.complete-$PINS_HASH"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
OFFLINE=(--no-index --find-links "$WHEELHOUSE" --no-compile)  # byte-compiling torch alone takes ~20 s
pip_quiet "$VENV/bin/pip" install "${OFFLINE[@]}" -c "$CONSTRAINTS" setuptools
pip_quiet "$VENV/bin/pip" install "${OFFLINE[@]}" --no-build-isolation -c "$CONSTRAINTS" -e '.[dev]'
"$VENV/bin/python" - <<'PY'
import mmcv, mmdet, mmengine, torch
print(f"setup: ok (torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, "
      f"mmengine {mmengine.__version__})")
PY
