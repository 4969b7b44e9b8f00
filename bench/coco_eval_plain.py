"""Baseline: pycocotools' COCOeval run directly on two files (what `evaluate` wraps)."""

import json
import sys

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

gt_path, pred_path = sys.argv[1:3]
gt = COCO(gt_path)
with open(pred_path) as fh:
    dets = json.load(fh)["annotations"]
ev = COCOeval(gt, gt.loadRes(dets), "bbox")
ev.params.maxDets = [100, 300, 1000]
ev.evaluate()
ev.accumulate()
ev.summarize()
