"""COCO metrics with pycocotools: the tutorial's 12 keys, overall and per class.

Used by `train`'s test step and by `evaluate`, so both report identical numbers. Predictions are
matched to the ground truth by image file name and category name, so files whose ids differ (an
`instances.json` from inference) evaluate correctly.
"""

import contextlib
import io
import logging
import os

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

MAX_DETS = [100, 300, 1000]
# The tutorial's key order: TYPE@[IoU|area|maxDets]. The AR keys are recall given that many detections per
# image; every AP key is computed at one number, `max_dets` (see coco_stats), whatever its label says.
STAT_KEYS = [
    "AP@[0.50:0.95|all|100]", "AP@[0.50|all|1000]", "AP@[0.75|all|1000]",
    "AP@[0.50:0.95|small|1000]", "AP@[0.50:0.95|medium|1000]", "AP@[0.50:0.95|large|1000]",
    "AR@[0.50:0.95|all|100]", "AR@[0.50:0.95|all|300]", "AR@[0.50:0.95|all|1000]",
    "AR@[0.50:0.95|small|1000]", "AR@[0.50:0.95|medium|1000]", "AR@[0.50:0.95|large|1000]",
]
# pycocotools' value where nothing qualifies (no ground truth in that size range): strict JSON,
# unlike the NaN that upstream cvtk wrote.
UNDEFINED = -1.0


def _parse_key(key):
    kind, rest = key.split("@", 1)
    iou, area, max_det = rest.strip("[]").split("|")
    return kind, iou, area, int(max_det)


def _value(evaluator, key, class_index=None, ap_max_dets=None):
    kind, iou, area, max_det = _parse_key(key)
    params = evaluator.params
    a = params.areaRngLbl.index(area)
    m = params.maxDets.index(ap_max_dets if kind == "AP" and ap_max_dets else max_det)
    if ":" in iou:
        lo, hi = (float(v) for v in iou.split(":"))
        t = np.where((params.iouThrs >= lo - 1e-9) & (params.iouThrs <= hi + 1e-9))[0]
    else:
        t = np.where(np.isclose(params.iouThrs, float(iou)))[0]
    k = slice(None) if class_index is None else [class_index]
    if kind == "AP":
        values = evaluator.eval["precision"][t][:, :, k, a, m]
    else:
        values = evaluator.eval["recall"][t][:, k, a, m]
    values = values[values > -1]
    return float(np.mean(values)) if values.size else UNDEFINED


def _image_matcher(gt_images):
    """file name → ground-truth image id: exact, else by the end of the path when that is unique.

    `instances.json` names images relative to what inference was given (a folder: `a.jpg`), the ground
    truth relative to its JSON (`images/a.jpg`).
    """
    exact = {img["file_name"]: img["id"] for img in gt_images}
    by_base = {}
    for img in gt_images:
        by_base.setdefault(os.path.basename(img["file_name"]), []).append(img["id"])

    def match(file_name):
        if file_name in exact:
            return exact[file_name]
        ids = by_base.get(os.path.basename(file_name), [])
        return ids[0] if len(ids) == 1 else None
    return match


def matched_predictions(gt, pred, pred_name):
    """The predictions with the ground truth's image and category ids (matched by file and class name)."""
    return _match_predictions(gt, pred, pred_name)


def _match_predictions(gt, pred, pred_name):
    """Predictions with image ids and category ids translated into the ground truth's."""
    match_image = _image_matcher(gt["images"])
    gt_cats = {cat["name"]: cat["id"] for cat in gt["categories"]}
    pred_images = {img["id"]: img["file_name"] for img in pred.get("images", [])}
    pred_cats = {cat["id"]: cat["name"] for cat in pred.get("categories", [])}
    matched = []
    for ann in pred.get("annotations", []):
        file_name = pred_images.get(ann["image_id"])
        image_id = match_image(file_name) if file_name is not None else ann["image_id"]
        if image_id is None:
            raise UserError(f"{pred_name}: annotation id {ann.get('id')}: image {file_name!r} is not in "
                            "the ground truth; evaluate predictions of the same images")
        name = pred_cats.get(ann["category_id"])
        category_id = gt_cats.get(name) if name is not None else ann["category_id"]
        if category_id is None:
            raise UserError(f"{pred_name}: annotation id {ann.get('id')}: category {name!r} is not in the "
                            "ground truth's categories; use the same label file")
        matched.append(dict(ann, image_id=image_id, category_id=category_id))
    return matched


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _segmentation_problem(seg):
    if isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
            return "an RLE segmentation needs size [height, width]"
        counts = seg.get("counts")
        if not isinstance(counts, (str, list)):
            return "an RLE segmentation needs counts (a string or a list)"
        from .coco import rle_counts  # pycocotools' C decoder trusts its input: decode and size it first

        runs = rle_counts(counts) if isinstance(counts, str) else counts
        if runs is None or not all(_is_int(r) and r >= 0 for r in runs):
            return "RLE counts do not decode (not COCO's run-length code)"
        if sum(runs) != size[0] * size[1]:
            return f"RLE counts cover {sum(runs)} pixels, not {size[0]}x{size[1]}"
        return None
    if isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                             and all(_is_number(v) for v in p) for p in seg):
        return None
    return "segmentation must be an RLE {size, counts} or polygons ([[x1, y1, x2, y2, x3, y3, ...]])"


def _record_problem(ann, iou_type):
    if not isinstance(ann, dict):
        return "is not an object"
    for key in ("image_id", "category_id"):
        if not _is_int(ann.get(key)):
            return f"{key} must be an integer (got {ann.get(key)!r})"
    if "score" in ann and not _is_number(ann["score"]):
        return f"score must be a finite number (got {ann['score']!r})"
    if iou_type == "bbox":
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)
                and box[2] >= 0 and box[3] >= 0):
            return f"bbox must be [x, y, width, height] with finite numbers and no negative size (got {box!r})"
    elif "segmentation" not in ann or ann["segmentation"] in (None, [], {}):
        return "has no segmentation; evaluate boxes with --iou_type bbox"
    else:
        return _segmentation_problem(ann["segmentation"])
    return None


def check_predictions(pred, pred_name, iou_type):
    """A predictions file from anywhere (cvtk-job, upstream cvtk, another tool) → one that COCOeval takes,
    or a one-line UserError naming the record. Predictions without any score (upstream cvtk's
    `instances.coco.json`) are equally confident: score 1, said once."""
    if not isinstance(pred, dict) or not isinstance(pred.get("annotations"), list):
        raise UserError(f"{pred_name}: no 'annotations' list; pass test_outputs.coco.json or instances.json")
    for key, fields in (("images", {"id": _is_int, "file_name": lambda v: isinstance(v, str)}),
                        ("categories", {"id": _is_int, "name": lambda v: isinstance(v, str)})):
        records = pred.get(key, [])
        if not isinstance(records, list):
            raise UserError(f"{pred_name}: '{key}' must be a list of objects")
        for i, record in enumerate(records):
            bad = [f for f, ok in fields.items() if not isinstance(record, dict) or not ok(record.get(f))]
            if bad:
                raise UserError(f"{pred_name}: {key}[{i}]: needs {' and '.join(bad)} ({', '.join(fields)}: an "
                                "integer id and a string)")
    annotations = pred["annotations"]
    for i, ann in enumerate(annotations):
        problem = _record_problem(ann, iou_type)
        if problem:
            where = f"annotation id {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{i}]"
            raise UserError(f"{pred_name}: {where}: {problem}")
    scored = sum("score" in ann for ann in annotations)
    if scored == len(annotations):
        return pred
    if scored:
        first = next(i for i, ann in enumerate(annotations) if "score" not in ann)
        raise UserError(f"{pred_name}: annotations[{first}] has no score while {scored} others have one; give "
                        "every prediction a score, or none")
    log.warning("%s: no prediction has a score (as in upstream cvtk's instances.coco.json): all are treated as "
                "equally confident (score 1), so AP does not reflect any ranking", pred_name)
    return dict(pred, annotations=[dict(ann, score=1.0) for ann in annotations])


def _evaluator():
    """faster-coco-eval (C++, ~10x faster; equal to pycocotools to 1e-15 on our benchmark set) when it is
    installed, else pycocotools itself: the same COCO / COCOeval interface and numbers."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval


def densest(records):
    """The most objects (records not on a crowd region) in one image."""
    per_image = {}
    for r in records:
        if not r.get("iscrowd"):
            per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    return max(per_image.values(), default=0)


def coco_stats(gt, pred, iou_type="segm", pred_name="predictions"):
    """{'stats': {12 keys}, 'class_stats': {class name: {12 keys}}, 'max_dets', and analysis's keys} of pred (COCO
    dict) against gt.

    pycocotools computes its first AP at 100 detections per image and the others at its largest maxDets, while
    mmdet's models output 100: on images with more objects the numbers disagreed and counted different sets of
    detections. Here every AP is computed at `max_dets` = the most objects or detections in one image (at least
    100), so every detection a model outputs counts in every AP (the model's own cap follows the data, see
    train's --max_detections)."""
    COCO, COCOeval = _evaluator()
    detections = _match_predictions(gt, pred, pred_name)
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    max_dets = max(100, densest(gt["annotations"]), densest(detections))
    from . import analysis

    if not detections:
        log.warning("%s: no detections at all; every metric is 0", pred_name)
        zeros = dict.fromkeys(STAT_KEYS, 0.0)
        return {"stats": dict(zeros), "class_stats": {n: dict(zeros) for n in names}, "max_dets": max_dets,
                **analysis.analyze(gt, [], iou_type)}
    if iou_type == "segm":
        missing = [d.get("id") for d in detections if not d.get("segmentation")]
        if missing:
            raise UserError(f"{pred_name}: annotation id {missing[0]} has no segmentation; "
                            "evaluate with --iou_type bbox")
        # pycocotools derives box and area from the mask; a stale bbox must not leak in.
        detections = [{k: v for k, v in d.items() if k not in ("bbox", "area")} for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco_gt = COCO()
        coco_gt.dataset = {k: gt[k] for k in ("images", "annotations", "categories")}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.maxDets = sorted(set(MAX_DETS) | {max_dets})
        evaluator.evaluate()
        evaluator.accumulate()
    cat_ids = evaluator.params.catIds  # sorted ground-truth category ids
    id_to_name = {c["id"]: c["name"] for c in gt["categories"]}
    return {
        "stats": {key: _value(evaluator, key, ap_max_dets=max_dets) for key in STAT_KEYS},
        "class_stats": {id_to_name[cid]: {key: _value(evaluator, key, k, max_dets) for key in STAT_KEYS}
                        for k, cid in enumerate(cat_ids)},
        "max_dets": max_dets,
        # Thresholds, confusions and counts: what the 12 numbers do not say (analysis).
        **analysis.analyze(gt, detections, iou_type),
    }

