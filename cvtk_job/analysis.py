"""What users ask after training, from the test predictions and the ground truth (no second inference):
per-class precision, recall and F1 at the F1-optimal score threshold, a confusion matrix, and how far the
predicted count per image is from the true one (the phenotyping question: how many fruits on this plant?).

Matching is COCO's at one IoU (`IOU`, 0.5): per image and class, detections best score first, each taking the
unmatched ground truth it overlaps most (IoU >= 0.5); a detection on a crowd region is neither right nor wrong
(ignored), and crowd regions are not objects to find. IoU is pycocotools' (masks for segm, boxes for bbox).

The confusion matrix matches across classes: each kept detection (score at least its class's threshold), best
first, takes the unmatched ground truth of any class it overlaps most. Rows are the true classes and a last
row `background` (detections of nothing), columns the predicted classes and a last column `background`
(objects nothing detected). The diagonal is right; off the diagonal, one class taken for another.
"""

import numpy as np

IOU = 0.5
BACKGROUND = "background"


def _iou(dets, gts, iou_type, crowd):
    from pycocotools import mask as mask_utils

    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    if iou_type == "segm":
        d = [_rle(a["segmentation"], a["_h"], a["_w"]) for a in dets]
        g = [_rle(a["segmentation"], a["_h"], a["_w"]) for a in gts]
    else:
        d, g = [a["bbox"] for a in dets], [a["bbox"] for a in gts]
    return np.asarray(mask_utils.iou(d, g, [int(c) for c in crowd]), dtype=np.float64).reshape(len(dets), len(gts))


def _rle(seg, height, width):
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    return {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str)
            else seg["counts"]}


def _match(dets, gts, iou_type):
    """COCO's greedy matching in one image: (per detection: index of its ground truth, -1 unmatched, -2
    ignored on a crowd region). `dets` best first."""
    crowd = [bool(g.get("iscrowd")) for g in gts]
    ious = _iou(dets, gts, iou_type, crowd)
    taken = np.zeros(len(gts), dtype=bool)
    out = []
    for i in range(len(dets)):
        best, found = IOU - 1e-10, -1
        for j in range(len(gts)):
            if crowd[j] or taken[j] or ious[i, j] < best:
                continue
            best, found = ious[i, j], j
        if found >= 0:
            taken[found] = True
        elif any(crowd[j] and ious[i, j] >= IOU for j in range(len(gts))):
            found = -2
        out.append(found)
    return out


def _by_image(records, images):
    out = {i: [] for i in images}
    for r in records:
        out.setdefault(r["image_id"], []).append(r)
    return out


def analyze(gt, detections, iou_type="segm", max_dets=None):
    """gt: a COCO dict; detections: records with the ground truth's image and category ids (and a score).
    Returns the per-class table, the confusion matrix and the count errors (see the module's text)."""
    images = {img["id"]: img for img in gt["images"]}
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    index = {c["id"]: k for k, c in enumerate(cats)}
    sized = lambda a: dict(a, _h=images[a["image_id"]]["height"], _w=images[a["image_id"]]["width"])  # noqa: E731
    gts = _by_image([sized(a) for a in gt["annotations"]], images)
    dts = _by_image([sized(a) for a in detections], images)
    for image_id in dts:
        dts[image_id].sort(key=lambda a: -a["score"])
        if max_dets:
            del dts[image_id][max_dets:]

    # Per class: every detection's score and whether it is right, and the number of objects.
    scored = {k: [] for k in range(len(cats))}
    objects = np.zeros(len(cats), dtype=int)
    for image_id in images:
        for cid, k in index.items():
            g = [a for a in gts[image_id] if a["category_id"] == cid]
            d = [a for a in dts.get(image_id, []) if a["category_id"] == cid]
            objects[k] += sum(not a.get("iscrowd") for a in g)
            for det, m in zip(d, _match(d, g, iou_type), strict=True):
                if m != -2:
                    scored[k].append((det["score"], m >= 0))
    per_class, thresholds = {}, {}
    for k, name in enumerate(names):
        per_class[name], thresholds[cats[k]["id"]] = _best_f1(scored[k], objects[k])

    # Confusion matrix and counts at each class's threshold.
    n = len(cats)
    confusion = np.zeros((n + 1, n + 1), dtype=int)
    true_counts = np.zeros((len(images), n), dtype=int)
    pred_counts = np.zeros((len(images), n), dtype=int)
    for row, image_id in enumerate(images):
        g = [a for a in gts[image_id] if not a.get("iscrowd")]
        d = [a for a in dts.get(image_id, []) if a["score"] >= thresholds[a["category_id"]]]
        for a in g:
            true_counts[row, index[a["category_id"]]] += 1
        for a in d:
            pred_counts[row, index[a["category_id"]]] += 1
        matches = _match(d, g, iou_type)
        matched = set()
        for det, m in zip(d, matches, strict=True):
            if m >= 0:
                confusion[index[g[m]["category_id"]], index[det["category_id"]]] += 1
                matched.add(m)
            else:
                confusion[n, index[det["category_id"]]] += 1
        for j, a in enumerate(g):
            if j not in matched:
                confusion[index[a["category_id"]], n] += 1
    return {
        "match_iou": IOU,
        "best_f1": per_class,
        "confusion_matrix": {"labels": names + [BACKGROUND], "rows": "true class", "columns": "predicted class",
                             "counts": confusion.tolist()},
        "counts": _count_errors(names, [images[i]["file_name"] for i in images], true_counts, pred_counts),
    }


def _best_f1(scored, objects):
    """(precision, recall, F1 at the score threshold that maximises F1, with that threshold; PR curve)."""
    if not scored or not objects:
        return {"threshold": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "objects": int(objects),
                "detections": len(scored), "pr_curve": {"recall": [], "precision": []}}, 1.0
    scores = np.array([s for s, _ in scored])
    right = np.array([r for _, r in scored])
    order = np.argsort(-scores, kind="mergesort")
    scores, right = scores[order], right[order]
    tp, fp = np.cumsum(right), np.cumsum(~right)
    # A threshold keeps every detection scoring at least it: only the last of equal scores is a cut.
    cuts = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    precision, recall = tp[cuts] / (tp[cuts] + fp[cuts]), tp[cuts] / objects
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1))  # the highest F1; on a tie, the higher threshold (fewer detections)
    return {"threshold": float(scores[cuts[best]]), "precision": float(precision[best]),
            "recall": float(recall[best]), "f1": float(f1[best]), "objects": int(objects),
            "detections": len(scored),
            "pr_curve": {"recall": recall.tolist(), "precision": precision.tolist()}}, float(scores[cuts[best]])


def _count_errors(names, files, true_counts, pred_counts):
    """Per class: MAE, RMSE and R² of the predicted count per image against the true one, and the counts."""
    out = {"images": files, "per_class": {}}
    for k, name in enumerate(names + ["all"]):
        t = true_counts[:, k] if k < len(names) else true_counts.sum(axis=1)
        p = pred_counts[:, k] if k < len(names) else pred_counts.sum(axis=1)
        err = (p - t).astype(np.float64)
        total = float(((t - t.mean()) ** 2).sum()) if len(t) else 0.0
        out["per_class"][name] = {
            "true": t.tolist(), "predicted": p.tolist(),
            "mae": float(np.abs(err).mean()) if len(t) else 0.0,
            "rmse": float(np.sqrt((err ** 2).mean())) if len(t) else 0.0,
            # R² is undefined when every image has the same true count (nothing to explain): -1, as COCO's.
            "r2": float(1 - (err ** 2).sum() / total) if total > 0 else -1.0,
        }
    return out
