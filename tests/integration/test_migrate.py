"""Models move between upstream cvtk and cvtk-job in both directions, and no config is ever run as code.

Upstream cvtk cannot run here (it downloads through MIM), so its model is made the way cvtk makes one
(its `save()` after training): a real MMEngine Runner trains, `X.pth` is a byte copy of
the workspace's `epoch_N.pth` (state_dict, optimizer, param_schedulers, message_hub, meta with
dataset_meta and cfg) and `X.py` is `cfg.dump()`. The reverse direction runs what cvtk's inference runs:
mmdet's `init_detector` + `inference_detector`, in a process where cvtk_job cannot be imported.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, SPEED, TINY_MODELS, run_cli

pytestmark = pytest.mark.slow
CLASSES = ("flower", "green_fruit", "red_fruit")


def _loader(data, ann, pipeline, shuffle, test_mode):
    return dict(batch_size=2, num_workers=0, persistent_workers=False,
                sampler=dict(type="DefaultSampler", shuffle=shuffle),
                dataset=dict(type="CocoDataset", data_root=str(ann.parent), ann_file=str(ann), data_prefix=dict(img=""),
                             metainfo=dict(classes=CLASSES), pipeline=pipeline, test_mode=test_mode))


@pytest.fixture(scope="module")
def cvtk_model(small_data, tmp_path_factory):
    """X.pth + X.py as upstream cvtk writes them, from a real MMEngine run (tiny model, one epoch)."""
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner import Runner

    from cvtk_job import checkpoints

    register_all_modules()
    checkpoints.allow_mmengine_checkpoints()  # mmengine 0.10.7 + torch >= 2.6 cannot resume otherwise
    root = tmp_path_factory.mktemp("cvtk_model")
    cfg = Config.fromfile(TINY_MODELS["segm"])
    cfg.model.roi_head.bbox_head.num_classes = 3
    cfg.model.roi_head.mask_head.num_classes = 3
    small = [dict(s, scale=(256, 192)) if s["type"] == "Resize" else s for s in cfg.train_pipeline]
    cfg.train_pipeline = small
    cfg.test_pipeline = [dict(s, scale=(256, 192)) if s["type"] == "Resize" else s for s in cfg.test_pipeline]
    cfg.train_dataloader = _loader(small_data, small_data / "train" / "segm.json", small, True, False)
    cfg.train_dataloader["batch_sampler"] = dict(type="AspectRatioBatchSampler")
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    # cvtk keeps a test loader in X.py (mmdet's inference_detector reads its pipeline from there).
    test_json = small_data / "test" / "segm.json"
    cfg.test_dataloader = _loader(small_data, test_json, cfg.test_pipeline, False, True)
    cfg.test_evaluator = dict(type="CocoMetric", ann_file=str(test_json), metric=["bbox", "segm"])
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=1, val_interval=1)
    cfg.work_dir = str(root / "strawberry")
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1000, save_last=True)
    cfg.default_scope = "mmdet"
    cfg.randomness = dict(seed=0)
    Runner.from_cfg(cfg).train()
    with open(root / "strawberry" / "last_checkpoint") as fh:
        shutil.copy(fh.read().strip(), root / "strawberry.pth")
    cfg.dump(str(root / "strawberry.py"))
    return root / "strawberry.pth", root / "strawberry.py"


def mmdet_predictions(config, weights, images, block_cvtk_job=False, trusted_pickle=False):
    """What upstream cvtk's inference computes: mmdet's init_detector + inference_detector, per image.
    trusted_pickle: load as cvtk's torch 2.3 does (weights_only=False; a training state needs it there)."""
    code = f"""
import functools, json, sys
import torch
{"sys.modules['cvtk_job'] = None  # as on a machine with cvtk but not cvtk-job" if block_cvtk_job else ""}
{"torch.load = functools.partial(torch.load, weights_only=False)" if trusted_pickle else ""}
from mmdet.apis import inference_detector, init_detector
model = init_detector({str(config)!r}, {str(weights)!r}, device="cpu")
out = {{"classes": list(model.dataset_meta["classes"]), "images": []}}
for path in {[str(p) for p in images]!r}:
    pred = inference_detector(model, path).pred_instances
    out["images"].append({{"scores": pred.scores.tolist(), "bboxes": pred.bboxes.tolist(),
                           "labels": pred.labels.tolist()}})
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH="")  # cvtk_job is importable only through the editable install
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=str(weights.parent), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_same_detections(instances, expected, images):
    by_name = {img["file_name"]: img["id"] for img in instances["images"]}
    for path, exp in zip(images, expected["images"], strict=True):
        image_id = by_name[path.name]
        got = [a for a in instances["annotations"] if a["image_id"] == image_id]
        want = sorted(zip(exp["scores"], exp["bboxes"], exp["labels"], strict=True), key=lambda d: -d[0])
        got = sorted(got, key=lambda a: -a["score"])
        assert len(got) == len(want) > 0, (path.name, len(got), len(want))
        for ann, (score, (x1, y1, x2, y2), label) in zip(got, want, strict=True):
            assert ann["score"] == pytest.approx(score, abs=1e-4)
            assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.05)
            assert ann["category_id"] == label


def test_a_cvtk_model_runs_through_inference_with_its_config_named(small_data, cvtk_model, tmp_path):
    weights, config = cvtk_model
    import torch

    from cvtk_job import checkpoints

    checkpoints.allow_mmengine_checkpoints()
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer", "meta", "message_hub", "param_schedulers"} <= set(ckpt)  # a training state
    images = sorted((small_data / "test" / "images").iterdir())[:3]
    data = tmp_path / "images"
    data.mkdir()
    for image in images:
        shutil.copy(image, data / image.name)
    out = tmp_path / "out"
    result = run_cli("inference", "--label", small_data / "label.txt", "--data", data, "--model_weights", weights,
                     "--model_config", config, "--output", out, "--score_threshold", "0.0", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "instances.json") as fh:
        instances = json.load(fh)
    assert [c["name"] for c in instances["categories"]] == list(CLASSES)
    assert all("segmentation" in a for a in instances["annotations"])  # a mask model, told by its tensors
    assert_same_detections(instances, mmdet_predictions(config, weights, images, trusted_pickle=True), images)


def test_cvtk_job_weights_load_where_only_mmdet_is_installed(small_data, trained_segm, tmp_path):
    """Upstream cvtk (and mmdet's own API) read X.py + X.pth written by cvtk-job train."""
    images = sorted((small_data / "test" / "images").iterdir())[:2]
    config = trained_segm.with_suffix(".py")
    expected = mmdet_predictions(config, trained_segm, images, block_cvtk_job=True)
    assert expected["classes"] == list(CLASSES)
    out = tmp_path / "out"
    result = run_cli("inference", "--label", small_data / "label.txt", "--data", images[0].parent,
                     "--model_weights", trained_segm, "--output", out, "--score_threshold", "0.0",
                     "--device", "cpu", "--no_draw")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "instances.json") as fh:
        instances = json.load(fh)
    assert_same_detections(instances, expected, images)


EVIL = "_x = __import__('os').system('touch {marker}')\nmodel = dict(type='MaskRCNN')\n"


def test_no_config_is_ever_executed(small_data, trained_segm, tmp_path):
    """Code in a config (named with --model_config, or inside the weights) is refused, never run."""
    import torch

    marker = tmp_path / "PWNED"
    evil_py = tmp_path / "evil.py"
    evil_py.write_text(EVIL.format(marker=marker))
    weights = torch.load(trained_segm, map_location="cpu", weights_only=True)
    weights["meta"]["config"] = EVIL.format(marker=marker)
    evil_pth = tmp_path / "weights" / "evil.pth"
    evil_pth.parent.mkdir()
    torch.save(weights, evil_pth)
    shutil.copy(evil_py, evil_pth.with_suffix(".py"))  # a .py beside the weights is never read unasked
    images = small_data / "test" / "images"
    for args in (["--model_weights", trained_segm, "--model_config", evil_py], ["--model_weights", evil_pth]):
        out = tmp_path / "out"
        result = run_cli("inference", "--label", small_data / "label.txt", "--data", images, *args,
                         "--output", out, "--device", "cpu")
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "is code, not a value" in errors[0] and "line 1" in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not marker.exists()
        assert not out.exists()


def test_train_never_runs_the_config_inside_resume_or_pretrained_weights(small_data, trained_segm, tmp_path):
    """`--resume` and `--pretrained` read tensors (and classes) from a checkpoint, never its config: weights
    whose config (cvtk-job's `config`, MMEngine's `meta.cfg`) carries code train without running it."""
    import torch

    from cvtk_job import checkpoints

    checkpoints.allow_mmengine_checkpoints()
    marker = tmp_path / "PWNED"

    def poisoned(src, dst):
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
        ckpt.setdefault("meta", {}).update(config=EVIL.format(marker=marker), cfg=EVIL.format(marker=marker))
        torch.save(ckpt, dst)
        return dst

    state = poisoned(trained_segm.parent / "strawberry" / "epoch_1.pth", tmp_path / "epoch_1.pth")
    weights = poisoned(trained_segm, tmp_path / "weights.pth")
    common = ["--label", small_data / "label.txt", "--train", small_data / "train" / "segm.json", *SPEED,
              "--model", TINY_MODELS["segm"]]
    runs = {}
    for name, extra in (("resumed", ["--resume", state, "--epoch", "2"]),
                        ("started", ["--pretrained", weights, "--epoch", "1"])):  # after SPEED's: the last wins
        out = tmp_path / name / "strawberry.pth"
        runs[name] = run_cli("train", *common, *extra, "--output_weights", out)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
        assert not marker.exists(), name
    assert f"resuming from {state}" in runs["resumed"].stderr
    rows = (tmp_path / "resumed" / "strawberry.train_stats.train.txt").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == ["2"]  # continued from the poisoned state's epoch 1
    assert "pretrained weights.pth: loaded" in runs["started"].stderr


def test_repo_has_no_other_config_executors():
    """Only mmconfig (train --model, the user's own config) may call Config.fromfile/fromstring."""
    hits = []
    for folder, _, files in os.walk(REPO / "cvtk_job"):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and ("fromfile(" in open(path).read() or "fromstring(" in open(path).read()):
                hits.append(os.path.relpath(path, REPO))
    assert hits == [os.path.join("cvtk_job", "mmconfig.py")]


def cvtk_instances(gt, test_outputs, per_image=10):
    """test outputs → upstream cvtk's instances.coco.json layout (§3.6): ids 1..N, absolute file names, only
    predicted classes with 1-based ids in order of first appearance, and no score. The detections are each
    image's best `per_image` (a one-epoch model rarely reaches cvtk's 0.5 cut), in score order."""
    root = "/data/field"
    by_image = {}
    for ann in test_outputs["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    names = {c["id"]: c["name"] for c in test_outputs["categories"]}
    images, categories, annotations = [], {}, []
    for n, img in enumerate(gt["images"], start=1):
        images.append({"id": n, "file_name": f"{root}/{os.path.basename(img['file_name'])}",
                       "width": img["width"], "height": img["height"]})
        for ann in sorted(by_image.get(img["id"], []), key=lambda a: -a["score"])[:per_image]:
            cat = categories.setdefault(names[ann["category_id"]], len(categories) + 1)
            annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": cat, "bbox": ann["bbox"],
                                "segmentation": ann["segmentation"], "area": ann["area"], "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in categories.items()]}


def test_evaluate_scoreless_cvtk_predictions_as_pycocotools_does(small_data, trained_segm, tmp_path):
    from tests.integration.test_train import independent_cocoeval

    gt_path = small_data / "test" / "segm.json"
    gt = json.loads(gt_path.read_text())
    outputs = json.loads((trained_segm.parent / "strawberry" / "test_outputs.coco.json").read_text())
    pred = cvtk_instances(gt, outputs)
    assert pred["annotations"] and all("score" not in a for a in pred["annotations"])
    pred_path = tmp_path / "instances.coco.json"
    pred_path.write_text(json.dumps(pred, separators=(",", ":")))

    # The same detections in the ground truth's ids, equally confident, through pycocotools itself.
    gt_ids = {os.path.basename(img["file_name"]): img["id"] for img in gt["images"]}
    gt_cats = {c["name"]: c["id"] for c in gt["categories"]}
    image_of = {img["id"]: gt_ids[os.path.basename(img["file_name"])] for img in pred["images"]}
    cat_of = {c["id"]: gt_cats[c["name"]] for c in pred["categories"]}
    mapped = [dict(a, image_id=image_of[a["image_id"]], category_id=cat_of[a["category_id"]], score=1.0)
              for a in pred["annotations"]]
    mapped_path = tmp_path / "mapped.json"
    mapped_path.write_text(json.dumps({"annotations": mapped}))
    for iou_type in ("segm", "bbox"):
        at_1000 = independent_cocoeval(gt_path, mapped_path, iou_type, [100, 300, 1000])
        at_100 = independent_cocoeval(gt_path, mapped_path, iou_type, [1, 10, 100])
        expected = [at_100[0], *at_1000[1:6], *at_1000[6:9], *at_1000[9:12]]
        stats = tmp_path / f"stats_{iou_type}.json"
        result = run_cli("evaluate", "--gt", gt_path, "--pred", pred_path, "--output", stats, "--iou_type", iou_type)
        assert result.returncode == 0, result.stderr[-3000:]
        warnings = [line for line in result.stderr.splitlines() if "no prediction has a score" in line]
        assert len(warnings) == 1, result.stderr
        from cvtk_job import metrics

        got = json.loads(stats.read_text())["stats"]
        assert [got[k] for k in metrics.STAT_KEYS] == pytest.approx(list(expected), abs=1e-12), iou_type
        assert any(v > 0 for v in expected[6:9]), "the detections overlap the ground truth (the test can fail)"


@pytest.mark.parametrize("change, message", [
    (lambda p: p["annotations"][0].pop("image_id"), "annotation id 1: image_id must be an integer"),
    (lambda p: p["annotations"][1].update(score="high"), "annotation id 2: score must be a finite number"),
    (lambda p: p["annotations"][0].update(score=0.9), "has no score while 1 others have one"),
    (lambda p: p["annotations"][0].update(segmentation=None), "annotation id 1: has no segmentation"),
    (lambda p: p["annotations"][0].update(segmentation={"counts": "x"}), "needs size [height, width]"),
    (lambda p: p["categories"][0].pop("name"), "categories[0]: needs name"),
    (lambda p: p.update(annotations={}), "no 'annotations' list"),
    (lambda p: p["annotations"].append(7), "annotations[2]: is not an object"),
])
def test_evaluate_refuses_malformed_predictions_in_one_line(small_data, tmp_path, change, message):
    seg = {"size": [10, 10], "counts": "f0550000000l0"}
    pred = {"images": [{"id": 1, "file_name": "x.jpg"}], "categories": [{"id": 1, "name": "flower"}],
            "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": seg}
                            for i in (1, 2)]}
    change(pred)
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(pred))
    out = tmp_path / "stats.json"
    result = run_cli("evaluate", "--gt", small_data / "test" / "segm.json", "--pred", path, "--output", out)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0] and str(path) in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
