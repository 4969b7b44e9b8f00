#!/usr/bin/env bash
# `make demo`: the tutorial's flow on the shipped sample, on CPU: fine-tuning mmdet's COCO Mask R-CNN R50
# where it can be downloaded, else a tiny model from random init, so it finishes in minutes on a laptop.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
DATA=examples/strawberry
CLI=(.venv/bin/python entrypoint.py)

"${CLI[@]}" doctor
"${CLI[@]}" validate --label $DATA/label.txt --task segm \
  --train $DATA/train/segm.json --valid $DATA/valid/segm.json --test $DATA/test/segm.json
# A connected newcomer should see real predictions: fine-tune mmdet's COCO Mask R-CNN R50 (~170 MB, downloaded
# once into ~/.cache/cvtk-job/checkpoints, or found there / in $CVTK_JOB_PRETRAINED_DIR). Offline (or with
# CVTK_JOB_DEMO_OFFLINE=1), a tiny model from random init, said in one line: its predictions are poor.
MODEL=(--model examples/configs/tiny_mask_rcnn.py --pretrained none --image_size 384 288 --epoch 3 --batch_size 4)
if [ "${CVTK_JOB_DEMO_OFFLINE:-0}" != 1 ] && .venv/bin/python - <<'PY' 2>/dev/null
import socket, sys
from cvtk_job import mmconfig, pretrained
source = pretrained.locate("auto", mmconfig.resolve_model("mask-rcnn_r50_fpn_1x_coco", "segm"))
if source.url:  # not found locally: download only when the server answers within 5 s
    socket.create_connection(("download.openmmlab.com", 443), timeout=5).close()
pretrained.fetch(source)
PY
then
  MODEL=(--model mask-rcnn_r50_fpn_1x_coco --pretrained auto --image_size 512 384 --epoch 2 --batch_size 2)
else
  echo "demo: the COCO checkpoint cannot be downloaded here (offline): training a tiny model from random init instead; its predictions will be poor" >&2
fi
"${CLI[@]}" train --label $DATA/label.txt \
  --train $DATA/train/segm.json --valid $DATA/valid/segm.json --test $DATA/test/segm.json \
  --output_weights "$OUT/strawberry.pth" "${MODEL[@]}" --num_workers 2 --device cpu
"${CLI[@]}" inference --label $DATA/label.txt --data $DATA/test/images \
  --model_weights "$OUT/strawberry.pth" --output "$OUT/inference_results" \
  --score_threshold 0.3 --batch_size 4 --num_workers 2 --device cpu
echo
echo "demo: training outputs in $OUT/, predictions in $OUT/inference_results/ (instances.json + drawn images):"
ls -1 "$OUT" "$OUT/inference_results" | head -30
