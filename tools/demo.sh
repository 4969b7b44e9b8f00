#!/usr/bin/env bash
# `make demo`: the tutorial's flow on the shipped sample, on CPU, with random init and a tiny model,
# so it finishes in a few minutes on a laptop. Drop --model/--image_size/--pretrained on a GPU node.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
DATA=examples/strawberry
CLI=(.venv/bin/python entrypoint.py)

"${CLI[@]}" doctor
"${CLI[@]}" validate --label $DATA/label.txt --task segm \
  --train $DATA/train/segm.json --valid $DATA/valid/segm.json --test $DATA/test/segm.json
"${CLI[@]}" train --label $DATA/label.txt \
  --train $DATA/train/segm.json --valid $DATA/valid/segm.json --test $DATA/test/segm.json \
  --output_weights "$OUT/strawberry.pth" \
  --model examples/configs/tiny_mask_rcnn.py --pretrained none --image_size 384 288 \
  --epoch 3 --batch_size 4 --num_workers 2 --device cpu
"${CLI[@]}" inference --label $DATA/label.txt --data $DATA/test/images \
  --model_weights "$OUT/strawberry.pth" --output "$OUT/inference_results" \
  --score_threshold 0.3 --batch_size 4 --num_workers 2 --device cpu
echo
echo "demo: training outputs in $OUT/, predictions in $OUT/inference_results/ (instances.json + drawn images):"
ls -1 "$OUT" "$OUT/inference_results" | head -30
