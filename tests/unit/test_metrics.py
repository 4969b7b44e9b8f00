"""metrics.coco_stats: the tutorial's 12 keys, equal to pycocotools, matched by file name and class name."""

import contextlib
import io
import json

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cvtk_job import metrics
from tests.conftest import SAMPLE


def _gt():
    return json.loads((SAMPLE / "test" / "bbox.json").read_text())


def _predictions(gt, jitter):
    """Ground-truth boxes, shifted a little, with falling scores, plus one false positive per image."""
    anns = []
    for i, a in enumerate(gt["annotations"]):
        x, y, w, h = a["bbox"]
        anns.append({"id": i + 1, "image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + jitter * (i % 5), y, w, h], "score": 0.9 - 0.01 * (i % 30)})
    for img in gt["images"]:
        anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": 0,
                     "bbox": [0, 0, 10, 10], "score": 0.3})
    return {"images": gt["images"], "categories": gt["categories"], "annotations": anns}


def test_every_class_gets_the_12_keys_and_missing_sizes_are_minus_one():
    gt = _gt()
    stats = metrics.coco_stats(gt, _predictions(gt, 0.0), "bbox")
    assert stats["class_stats"]["flower"]["AP@[0.50|all|1000]"] == pytest.approx(1.0)
    assert list(stats["class_stats"]) == ["flower", "green_fruit", "red_fruit"]
    assert all(list(v) == metrics.STAT_KEYS for v in stats["class_stats"].values())
    # The downscaled test split has no small objects: undefined is -1, as in pycocotools (never NaN).
    assert stats["stats"]["AP@[0.50:0.95|small|1000]"] == -1.0


def test_numbers_equal_pycocotools_summarize():
    gt = _gt()
    pred = _predictions(gt, 3.0)
    ours = metrics.coco_stats(gt, pred, "bbox")["stats"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(pred["annotations"]), "bbox")
        ev.params.maxDets = [100, 300, 1000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    keys = metrics.STAT_KEYS
    assert [ours[k] for k in keys[1:]] == pytest.approx(list(ev.stats[1:]), abs=1e-12)


def test_predictions_with_other_ids_match_by_file_name_and_class_name():
    gt = _gt()
    pred = _predictions(gt, 3.0)
    expected = metrics.coco_stats(gt, pred, "bbox")
    # Renumber images and categories the way an inference run would.
    image_map = {img["id"]: 1000 + n for n, img in enumerate(gt["images"])}
    cat_map = {c["id"]: c["id"] + 1 for c in gt["categories"]}
    shuffled = {
        "images": [dict(img, id=image_map[img["id"]]) for img in reversed(gt["images"])],
        "categories": [dict(c, id=cat_map[c["id"]]) for c in gt["categories"]],
        "annotations": [dict(a, image_id=image_map[a["image_id"]], category_id=cat_map[a["category_id"]])
                        for a in pred["annotations"]],
    }
    assert metrics.coco_stats(gt, shuffled, "bbox") == expected


def test_no_detections_is_zero_not_a_crash():
    gt = _gt()
    stats = metrics.coco_stats(gt, {"images": gt["images"], "categories": gt["categories"], "annotations": []})
    assert set(stats["stats"].values()) == {0.0}


def test_dense_images_every_ap_at_one_cap_equal_to_pycocotools_with_that_cap():
    """Two images of 180 and 150 objects, 230 and 150 detections (true ones jittered, plus false ones at lower
    scores): max_dets is 230, and every AP key equals pycocotools' precision at maxDets 230 (the first one used
    to be at 100, cutting the detections an image holds), every AR key its own maxDets."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = [{"id": 1, "file_name": "a.png", "width": 2000, "height": 2000},
              {"id": 2, "file_name": "b.png", "width": 2000, "height": 2000}]
    gt = {"images": images, "categories": [{"id": 1, "name": "fruit"}], "annotations": []}
    dets = []
    for image_id, objects, false in ((1, 180, 50), (2, 150, 0)):
        for k in range(objects):
            x, y = (k % 14) * 140.0, (k // 14) * 140.0
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                                      "bbox": [x, y, 40, 40], "area": 1600.0, "iscrowd": 0})
            dets.append({"image_id": image_id, "category_id": 1, "score": float(rng.uniform(0.3, 1.0)),
                         "bbox": [x + float(rng.uniform(-8, 8)), y + float(rng.uniform(-8, 8)), 40, 40]})
        for _ in range(false):
            dets.append({"image_id": image_id, "category_id": 1, "score": float(rng.uniform(0.0, 0.6)),
                         "bbox": [float(rng.uniform(0, 1900)), float(rng.uniform(0, 1900)), 30, 30]})
    pred = {"images": images, "categories": gt["categories"],
            "annotations": [dict(d, id=i + 1) for i, d in enumerate(dets)]}
    stats = metrics.coco_stats(gt, pred, "bbox")
    assert stats["max_dets"] == 230

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(pred["annotations"]))), "bbox")
        ev.params.maxDets = [100, 230, 300, 1000]
        ev.evaluate()
        ev.accumulate()
    iou = {"0.50:0.95": slice(None), "0.50": [0], "0.75": [5]}
    for key, value in stats["stats"].items():
        kind, rest = key.split("@")
        thr, area, n = rest.strip("[]").split("|")
        a = ["all", "small", "medium", "large"].index(area)
        if kind == "AP":
            p = ev.eval["precision"][iou[thr], :, :, a, 1]
        else:
            p = ev.eval["recall"][iou[thr], :, a, ev.params.maxDets.index(int(n))]
        p = p[p > -1]
        assert value == pytest.approx(float(p.mean()) if p.size else -1.0), key
    # The cap matters here: at 100 detections the first image loses 130 of its 230.
    p100 = ev.eval["precision"][:, :, :, 0, 0]
    assert stats["stats"]["AP@[0.50:0.95|all|100]"] > float(p100[p100 > -1].mean()) + 0.05
