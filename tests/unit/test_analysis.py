"""analysis: F1-optimal thresholds, the confusion matrix and count errors on a case with known answers
(hand-made predictions; every box either coincides with an object or overlaps none, so which detection is right
is written down here, and the numbers are computed from that list with numpy)."""

import numpy as np
import pytest

from cvtk_job import analysis


def box(x):
    return [x, 0, 10, 10]


def square(x):
    return [[x, 0, x + 10, 0, x + 10, 10, x, 10]]


GT = [(1, 1, 0), (1, 1, 20), (1, 2, 40),  # image 1: A, A, B
      (2, 1, 0), (2, 2, 20), (2, 2, 40),  # image 2: A, B, B
      (3, 2, 0)]  # image 3: B
# (image, class, x, score, right within its class?)
DETS = [(1, 1, 0, 0.9, True), (1, 1, 20, 0.6, True), (1, 1, 40, 0.7, False),  # A on image 1's B
        (1, 1, 60, 0.3, False),  # A on nothing
        (2, 1, 0, 0.8, True), (2, 2, 20, 0.95, True), (2, 2, 1, 0.4, False),  # B on image 2's A
        (3, 2, 0, 0.5, True), (3, 2, 0, 0.45, False)]  # B twice on one B: the second is a duplicate


def dataset(iou_type):
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 20} for i in (1, 2, 3)]
    shape = square if iou_type == "segm" else box
    anns = [{"id": n + 1, "image_id": i, "category_id": c, "bbox": box(x), "area": 100.0, "iscrowd": 0,
             "segmentation": square(x)} for n, (i, c, x) in enumerate(GT)]
    dets = [{"image_id": i, "category_id": c, "score": s, ("segmentation" if iou_type == "segm" else "bbox"):
             shape(x)} for i, c, x, s, _ in DETS]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}]}, dets


def best_f1(pairs, objects):
    """The F1-optimal cut of (score, right) pairs, by brute force over every threshold."""
    best = None
    for t in sorted({s for s, _ in pairs}, reverse=True):
        kept = [r for s, r in pairs if s >= t]
        p, r = np.sum(kept) / len(kept), np.sum(kept) / objects
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if best is None or f1 > best[3] + 1e-12:
            best = (t, p, r, f1)
    return best


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_thresholds_confusion_and_counts_match_a_hand_computation(iou_type):
    gt, dets = dataset(iou_type)
    result = analysis.analyze(gt, dets, iou_type)
    thresholds = {}
    for cid, name in ((1, "A"), (2, "B")):
        pairs = [(s, right) for _, c, _, s, right in DETS if c == cid]
        objects = sum(c == cid for _, c, _ in GT)
        t, p, r, f1 = best_f1(pairs, objects)
        got = result["best_f1"][name]
        assert (got["threshold"], got["objects"]) == (t, objects)
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f1))
        thresholds[cid] = t
    assert thresholds == {1: 0.6, 2: 0.5}  # the hand computation above, stated

    # At those thresholds: A 0.9, 0.7 (on a B), 0.6 and 0.8 are kept, B 0.95 and 0.5. Each kept detection takes
    # the object it lies on, of any class; image 2's second B is found by nothing.
    expected = np.array([[3, 0, 0],  # true A: taken for A three times
                         [1, 2, 1],  # true B: once taken for A, twice for B, once missed
                         [0, 0, 0]])  # background: nothing detected where there is nothing (A 0.3 is below 0.6)
    assert result["confusion_matrix"]["labels"] == ["A", "B", "background"]
    assert np.array_equal(np.array(result["confusion_matrix"]["counts"]), expected)

    kept = [(i, c) for i, c, _, s, _ in DETS if s >= thresholds[c]]
    for cid, name in ((1, "A"), (2, "B")):
        true = np.array([sum(1 for i, c, _ in GT if i == img and c == cid) for img in (1, 2, 3)])
        pred = np.array([sum(1 for i, c in kept if i == img and c == cid) for img in (1, 2, 3)])
        counts = result["counts"]["per_class"][name]
        assert counts["true"] == true.tolist() and counts["predicted"] == pred.tolist()
        err = pred - true
        assert counts["mae"] == pytest.approx(np.abs(err).mean())
        assert counts["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()))
        assert counts["r2"] == pytest.approx(1 - (err ** 2).sum() / ((true - true.mean()) ** 2).sum())


def test_a_crowd_region_is_neither_an_object_nor_a_mistake():
    gt, dets = dataset("bbox")
    gt["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "bbox": box(60), "area": 100.0,
                              "iscrowd": 1, "segmentation": square(60)})
    result = analysis.analyze(gt, dets, "bbox")
    pairs = [(s, right) for _, c, x, s, right in DETS if c == 1 and x != 60]  # A 0.3 on the crowd: ignored
    t, p, r, f1 = best_f1(pairs, 3)
    assert (result["best_f1"]["A"]["threshold"], result["best_f1"]["A"]["f1"]) == (t, pytest.approx(f1))
    assert result["best_f1"]["A"]["objects"] == 3
