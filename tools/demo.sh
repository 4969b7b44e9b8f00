#!/usr/bin/env bash
# `make demo`: the tutorial's flow on the shipped sample, on CPU, with random init.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
DATA=examples/strawberry
CLI=(.venv/bin/python entrypoint.py)

"${CLI[@]}" doctor
"${CLI[@]}" validate --label $DATA/label.txt --task segm \
  --train $DATA/train/segm.json --valid $DATA/valid/segm.json --test $DATA/test/segm.json
echo "demo: validate and doctor passed (train/inference arrive with their issues)"
