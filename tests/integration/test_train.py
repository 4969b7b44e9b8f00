"""train end to end on CPU: a real (tiny) MMDetection model on the shipped sample."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from cvtk_job import metrics
from tests.conftest import REPO, SPEED, TINY_MODELS, run_cli

pytestmark = pytest.mark.slow

TRAIN_COLUMNS = {
    "segm": "epoch lr data_time loss loss_rpn_cls loss_rpn_bbox loss_cls acc loss_bbox loss_mask val_loss time".split(),
    "det": "epoch lr data_time loss loss_rpn_cls loss_rpn_bbox loss_cls acc loss_bbox val_loss time".split(),
}
METRIC_SUFFIXES = ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"]


def strict_json(path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}, which is not JSON")
    with open(path) as fh:
        return json.load(fh, parse_constant=refuse)


def read_tsv(path):
    lines = open(path).read().splitlines()
    header = lines[0].split("\t")
    return header, [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def train_args(data, out, task, *extra, splits=("valid", "test")):
    kind = "segm" if task == "segm" else "bbox"
    # The seed's command line, then only speed options (and the task/model for det).
    args = ["train", "--label", data / "label.txt", "--train", data / "train" / f"{kind}.json"]
    for split in splits:
        args += [f"--{split}", data / split / f"{kind}.json"]
    return [*args, "--output_weights", out / "strawberry.pth", *SPEED, "--model", TINY_MODELS[task],
            "--task", task, *extra]


def independent_cocoeval(gt_path, pred_path, iou_type, max_dets):
    """pycocotools on the two files, as a user would run it (no cvtk-job code)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dets = strict_json(pred_path)["annotations"]
        if iou_type == "segm":
            dets = [{k: v for k, v in d.items() if k not in ("bbox", "area")} for d in dets]
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.params.maxDets = max_dets
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("task", ["segm", "det"])
def test_train_writes_every_output_of_the_tutorial(small_data, tmp_path, task):
    result = run_cli(*train_args(small_data, tmp_path, task, "--epoch", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "strawberry"

    for suffix in (".pth", ".py", ".train_stats.train.txt", ".train_stats.train.png",
                   ".train_stats.valid.txt", ".train_stats.valid.png", ".test_stats.json"):
        assert (tmp_path / f"strawberry{suffix}").stat().st_size > 0, suffix
    assert str(tmp_path / "strawberry.pth") in result.stdout.splitlines()

    header, rows = read_tsv(tmp_path / "strawberry.train_stats.train.txt")
    assert header == TRAIN_COLUMNS[task]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["loss"]) > 0 for r in rows)
    assert all(0 < float(r["val_loss"]) < 100 for r in rows)  # the loss on the validation images, every epoch

    header, rows = read_tsv(tmp_path / "strawberry.train_stats.valid.txt")
    kinds = ["bbox", "segm"] if task == "segm" else ["bbox"]
    assert header == [f"coco/{k}_{s}" for k in kinds for s in METRIC_SUFFIXES] + ["data_time", "time", "step"]
    assert [r["step"] for r in rows] == ["1", "2"]

    for png in ("strawberry.train_stats.train.png", "strawberry.train_stats.valid.png"):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 300

    # Test outputs: every detection with scores and the test file's category ids; RLE masks for segm.
    test_json = small_data / "test" / ("segm.json" if task == "segm" else "bbox.json")
    outputs = strict_json(out / "test_outputs.coco.json")
    gt = strict_json(test_json)
    assert outputs["categories"] == gt["categories"]
    assert [i["id"] for i in outputs["images"]] == [i["id"] for i in gt["images"]]
    dets = outputs["annotations"]
    assert dets, "the model returned no detections at all"
    assert min(d["score"] for d in dets) < 0.5, "test detections must not be cut at 0.5"
    assert {d["category_id"] for d in dets} <= {c["id"] for c in gt["categories"]}
    if task == "segm":
        assert all(isinstance(d["segmentation"]["counts"], str) for d in dets)

    stats = strict_json(tmp_path / "strawberry.test_stats.json")
    assert list(stats["stats"]) == metrics.STAT_KEYS
    assert list(stats["class_stats"]) == ["flower", "green_fruit", "red_fruit"]
    iou_type = "segm" if task == "segm" else "bbox"
    at_1000 = independent_cocoeval(test_json, out / "test_outputs.coco.json", iou_type, [100, 300, 1000])
    at_100 = independent_cocoeval(test_json, out / "test_outputs.coco.json", iou_type, [1, 10, 100])
    expected = [at_100[0], *at_1000[1:6], *at_1000[6:9], *at_1000[9:12]]
    assert [stats["stats"][k] for k in metrics.STAT_KEYS] == pytest.approx(expected, abs=1e-12)

    # The weights open safely (weights_only) and carry the classes; the config reloads.
    import torch
    from mmengine.config import Config

    weights = torch.load(tmp_path / "strawberry.pth", map_location="cpu", weights_only=True)
    assert weights["meta"]["dataset_meta"]["classes"] == ["flower", "green_fruit", "red_fruit"]
    cfg = Config.fromfile(tmp_path / "strawberry.py")
    assert cfg.model.roi_head.bbox_head.num_classes == 3


def _loss_columns(path):
    header, rows = read_tsv(path)
    return [{k: v for k, v in r.items() if k.startswith("loss") or k == "acc"} for r in rows]


def test_same_seed_gives_the_same_losses_and_another_seed_does_not(small_data, tmp_path):
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = tmp_path / name
        result = run_cli(*train_args(small_data, out, "det", "--epoch", "1", "--seed", seed, splits=()))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _loss_columns(out / "strawberry.train_stats.train.txt")
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_interrupted_run_resumes_at_the_next_epoch(small_data, tmp_path):
    args = [sys.executable, str(REPO / "entrypoint.py"),
            *map(str, train_args(small_data, tmp_path, "det", "--epoch", "2"))]
    work = tmp_path / "strawberry"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (work / "epoch_1.pth").exists() or not (work / "last_checkpoint").exists():
            assert proc.poll() is None, "training ended before it could be interrupted"
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # let the checkpoint finish writing
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (work / "epoch_2.pth").exists(), "too late: epoch 2 finished before the kill"

    result = run_cli(*args[2:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed epoch: 1" in result.stderr
    assert "Epoch(train) [1]" not in result.stderr  # epoch 1 is not trained again
    assert "Epoch(train) [2]" in result.stderr
    _, rows = read_tsv(tmp_path / "strawberry.train_stats.train.txt")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    _, rows = read_tsv(tmp_path / "strawberry.train_stats.valid.txt")
    assert [r["step"] for r in rows] == ["1", "2"]  # a validation the kill cut short is redone on resume
    assert os.path.exists(tmp_path / "strawberry.test_stats.json")


def test_sigterm_stops_with_75_and_the_rerun_finishes_with_every_epoch_once(small_data, tmp_path):
    args = [sys.executable, str(REPO / "entrypoint.py"),
            *map(str, train_args(small_data, tmp_path, "det", "--epoch", "3", splits=("valid",)))]
    work = tmp_path / "strawberry"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (work / "last_checkpoint").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]

    result = run_cli(*args[2:])
    assert result.returncode == 0, result.stderr[-3000:]
    _, rows = read_tsv(tmp_path / "strawberry.train_stats.train.txt")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    _, rows = read_tsv(tmp_path / "strawberry.train_stats.valid.txt")
    assert [r["step"] for r in rows] == ["1", "2", "3"]  # every epoch once: no gap, no duplicate


def test_torchrun_two_processes_train_once_with_complete_outputs(small_data, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", str(REPO / "entrypoint.py"),
           *map(str, train_args(small_data, tmp_path, "segm", "--epoch", "1", "--batch_size", "2"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed: rank 0 of 2 (torchrun" in result.stderr
    assert "distributed: rank 1 of 2 (torchrun" in result.stderr
    assert "current batch size is 4" in result.stderr  # 2 processes x 2: LR follows the global batch
    printed = result.stdout.splitlines()
    assert printed.count(str(tmp_path / "strawberry.pth")) == 1  # rank 0 alone writes and reports
    done = json.loads((tmp_path / "strawberry.done.json").read_text())
    assert {o["path"] for o in done["outputs"]} >= {"strawberry.pth", "strawberry.test_stats.json",
                                                    "strawberry/test_outputs.coco.json"}
    outputs = strict_json(tmp_path / "strawberry" / "test_outputs.coco.json")
    assert len(outputs["images"]) == 5  # both ranks' test images gathered
    assert {a["image_id"] for a in outputs["annotations"]} <= {i["id"] for i in outputs["images"]}


def test_dense_images_raise_the_models_detection_cap_to_the_most_objects_in_one_image(tmp_path):
    """A training set whose densest image holds more than mmdet's 100 objects: the run's config lets the model
    output that many (dry run: the decision and the config, nothing trained); --max_detections overrides."""
    from tests import synthetic

    (tmp_path / "label.txt").write_text("\n".join(synthetic.CLASSES) + "\n")
    train = synthetic.write(tmp_path / "train", 2, (1200, 1200), 140, (8, 12), seed=2)
    per_image = {}
    for ann in json.loads(train.read_text())["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    densest = max(per_image.values())
    assert densest > 100
    common = ["train", "--label", tmp_path / "label.txt", "--train", train, "--output_weights",
              tmp_path / "m" / "x.pth", "--model", TINY_MODELS["segm"], "--pretrained", "none", "--device", "cpu",
              "--dry_run"]
    result = run_cli(*common, env={"CVTK_JOB_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    test_cfg = json.loads(result.stdout)["config"]["model"]["test_cfg"]
    assert test_cfg["rcnn"]["max_per_img"] == densest
    assert f"max detections per image: {densest}" in result.stderr
    result = run_cli(*common, "--max_detections", "500", env={"CVTK_JOB_CACHE": str(tmp_path / "cache")})
    assert json.loads(result.stdout)["config"]["model"]["test_cfg"]["rcnn"]["max_per_img"] == 500


def test_out_of_memory_in_a_step_halves_the_pass_and_the_run_keeps_its_batch_and_epochs(small_data, tmp_path):
    """The documented test hook raises a real torch.OutOfMemoryError in the step of iteration 5 (epoch 2 of 2;
    16 images in batches of 4): the run finishes both epochs, the step and every later one run in 2 parts of 2
    images, and the back-off is in the log and in the weights' metadata; the batch in the written config is 4."""
    import torch
    from mmengine.config import Config

    env = {**os.environ, "CVTK_JOB_TEST_OOM_AT_ITER": "5"}
    result = run_cli(*train_args(small_data, tmp_path, "det", "--epoch", "2", splits=()), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("out of GPU memory at iteration 5 (epoch 2): the batch of 4 images now runs in 2 parts of at most 2"
            in result.stderr)
    meta = torch.load(tmp_path / "strawberry.pth", map_location="cpu", weights_only=True)["meta"]
    assert meta["oom_backoff"] == [{"iteration": 5, "epoch": 1, "parts": 2, "images_per_pass": 2, "batch": 4}]
    assert meta["epoch"] == 2
    _, rows = read_tsv(tmp_path / "strawberry.train_stats.train.txt")
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    cfg = Config.fromfile(tmp_path / "strawberry.py")
    assert cfg.train_dataloader.batch_size == 4 and cfg.train_cfg.type == "EpochBasedTrainLoop"


def test_batch_size_auto_measures_real_steps_and_trains_with_the_largest_batch_that_fits(small_data, tmp_path):
    """The documented memory hook stands in for CUDA's counters (peak = 1000 MiB + 300 MiB per image, 4000 MiB
    free); the probe's training steps are real. 85% of 4000 MiB holds (3400 - 1000) / 300 = 8 images: the run
    trains with 8 per process, the learning rate as a run given --batch_size 8 (same lr column, same config),
    and the weights record the measurement."""
    import torch
    from mmengine.config import Config

    env = {**os.environ, "CVTK_JOB_TEST_MEMORY_PROBE": "1000,300,4000"}
    runs = {}
    for name, batch in (("auto", "auto"), ("eight", "8")):
        out = tmp_path / name
        args = [a if a != "4" else batch for a in train_args(small_data, out, "det", "--epoch", "1", splits=())]
        result = run_cli(*args, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (result.stderr, read_tsv(out / "strawberry.train_stats.train.txt")[1],
                      Config.fromfile(out / "strawberry.py"))
    stderr, rows, cfg = runs["auto"]
    assert "--batch_size auto: 8 per process" in stderr
    assert cfg.train_dataloader.batch_size == 8
    assert [r["lr"] for r in rows] == [r["lr"] for r in runs["eight"][1]]
    assert cfg.optim_wrapper == runs["eight"][2].optim_wrapper and cfg.auto_scale_lr == runs["eight"][2].auto_scale_lr
    meta = torch.load(out.parent / "auto" / "strawberry.pth", map_location="cpu", weights_only=True)["meta"]
    auto = meta["batch_size_auto"]
    assert auto["batch_size"] == 8 and auto["peak_mib"] == {"1": 1300, "2": 1600, "8": 3400}
    assert auto["free_mib"] == 4000 and auto["limit"] == 16
    # Continued to 2 epochs where memory would now hold 3 images: the resumed run keeps the 8 its schedule has.
    args = [a if a != "4" else "auto" for a in train_args(small_data, tmp_path / "auto", "det", "--epoch", "2",
                                                          splits=())]
    result = run_cli(*args, env={**os.environ, "CVTK_JOB_TEST_MEMORY_PROBE": "1000,300,2400"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--batch_size auto: 8 per process, the batch of the run being resumed" in result.stderr
    assert Config.fromfile(tmp_path / "auto" / "strawberry.py").train_dataloader.batch_size == 8
    assert [r["epoch"] for r in read_tsv(tmp_path / "auto" / "strawberry.train_stats.train.txt")[1]] == ["1", "2"]


def test_batch_size_auto_under_torchrun_is_measured_once_and_used_by_every_rank(small_data, tmp_path):
    """Two processes: rank 0 measures (memory hook: 1000 MiB + 300 per image, 2400 MiB free: 85% holds 3), both
    ranks log the same batch, and the learning rate follows the global batch of 2 x 3."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [a if a != "4" else "auto" for a in train_args(small_data, tmp_path, "det", "--epoch", "1", splits=())]
    result = subprocess.run([torchrun, "--nproc_per_node=2", str(REPO / "entrypoint.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "CVTK_JOB_TEST_MEMORY_PROBE": "1000,300,2400"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("--batch_size auto: 3 per process") == 2  # one line per rank
    assert "current batch size is 6" in result.stderr


def test_profile_hook_captures_the_asked_steps_and_the_run_is_otherwise_unchanged(small_data, tmp_path):
    """CVTK_JOB_PROFILE=1,2 (segm, 16 images in batches of 4, one epoch: iterations 1-2): a summary of those two
    steps and a Chrome trace in the workspace, one log line, the epoch's row. On the CPU the run is fp32, so all
    of its matrix math is (a GPU run under autocast must show a share near 0)."""
    env = {**os.environ, "CVTK_JOB_PROFILE": "1,2"}
    result = run_cli(*train_args(small_data, tmp_path, "segm", "--epoch", "1", splits=()), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "strawberry" / "profile.json").read_text())
    assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    assert summary["math_in_fp32"] == 1.0
    # MMEngine reads every loss term back with .item() for its log: at least one wait per step for each.
    assert summary["syncs_per_step"] >= 5 and summary["ops_per_step"] > 200
    assert summary["data_wait_ms_per_step"] > 0  # the second step's batch was fetched inside the window
    assert "device_busy" not in summary  # no CUDA here
    names = {name for name, _ in summary["top_host_ops_ms_per_step"]}
    assert any("conv" in name for name in names), names
    trace = json.loads((tmp_path / "strawberry" / "profile.trace.json").read_text())
    assert sum(e.get("name") == "aten::convolution" for e in trace["traceEvents"]) > 0
    assert "profile of 2 steps:" in result.stderr
    # What keeps the steps from waiting on the host (assigner.py, losses.py, the heads, masktargets.py) and mixed
    # precision's RoIs in fp32 (roi_extractor.py) are in the model that trained.
    assert ("training model: 2 MaxIoUAssigner(s) as CvtkMaxIoUAssigner, 2 RandomSampler(s) as CvtkRandomSampler, "
            "2 SingleRoIExtractor(s) as CvtkSingleRoIExtractor, 2 L1Loss(s) as CvtkL1Loss, 3 CrossEntropyLoss(s) as "
            "CvtkCrossEntropyLoss, 1 RPNHead(s) as CvtkRPNHead, 1 Shared2FCBBoxHead(s) as CvtkShared2FCBBoxHead, "
            "1 StandardRoIHead(s) as CvtkStandardRoIHead, 1 mask head(s) with targets built on the device") \
        in result.stderr
    _, rows = read_tsv(tmp_path / "strawberry.train_stats.train.txt")
    assert [r["epoch"] for r in rows] == ["1"]


def test_a_bad_profile_setting_is_one_line_before_anything_is_written(small_data, tmp_path):
    env = {**os.environ, "CVTK_JOB_PROFILE": "ten"}
    result = run_cli(*train_args(small_data, tmp_path / "out", "det", "--epoch", "1", splits=()), env=env)
    assert result.returncode == 2
    assert "CVTK_JOB_PROFILE='ten': expected SKIP,STEPS" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
