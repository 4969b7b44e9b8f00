"""`cvtk-job train`: validate → configure → train → test → write the tutorial's outputs."""

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Optional

from .. import artifacts, coco, launch, mmconfig, pretrained
from ..errors import UserError
from .validate import check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything decided before torch is imported (so user errors stay fast and cheap)."""

    outputs: artifacts.TrainOutputs
    labels: list
    data: mmconfig.DataFiles
    num_train_images: int
    categories: list
    base_config: str
    resume: bool
    resume_from: Optional[str]


def _check_numbers(opts):
    if opts.epoch < 1:
        raise UserError(f"--epoch {opts.epoch}: train for at least 1 epoch")
    if opts.batch_size < 1:
        raise UserError(f"--batch_size {opts.batch_size}: a batch holds at least 1 image")
    if opts.num_workers < 0:
        raise UserError(f"--num_workers {opts.num_workers}: use 0 (load in the main process) or more")
    if opts.image_size and min(opts.image_size) < 32:
        raise UserError(f"--image_size {opts.image_size[0]} {opts.image_size[1]}: both sides must be "
                        "at least 32 pixels")


def _annotated_images(data):
    with_boxes = {a["image_id"] for a in data["annotations"] if not a.get("ignore")}
    return sum(1 for img in data["images"] if img["id"] in with_boxes)


def _resume_point(opts, outputs):
    """(resume?, checkpoint) — `auto` continues when the workspace holds a checkpoint."""
    if opts.resume == "none":
        return False, None
    if opts.resume == "auto":
        pointer = os.path.join(outputs.workspace, "last_checkpoint")
        return (True, None) if os.path.isfile(pointer) else (False, None)
    if not os.path.isfile(opts.resume):
        raise UserError(f"--resume {opts.resume}: checkpoint not found; use auto, none or a .pth path")
    return True, os.path.abspath(opts.resume)


def plan(opts):
    _check_numbers(opts)
    outputs = artifacts.TrainOutputs.from_weights(opts.output_weights)
    labels = coco.load_labels(opts.label)
    files = [(role, path) for role, path in (("train", opts.train), ("valid", opts.valid),
                                             ("test", opts.test)) if path]
    reports = check(files, labels=labels, task=opts.task)
    num_train = _annotated_images(reports[0].data)
    categories = [{"id": c["id"], "name": c["name"]} for c in sorted(reports[0].data["categories"],
                                                                      key=lambda c: c["id"])]
    if num_train == 0:
        raise UserError(f"{opts.train}: no image has an annotation; training needs annotated images")
    base_config = mmconfig.resolve_model(opts.model, opts.task)
    resume, resume_from = _resume_point(opts, outputs)
    data = mmconfig.DataFiles(*(os.path.abspath(p) if p else None for p in (opts.train, opts.valid, opts.test)))
    return Plan(outputs, labels, data, num_train, categories, base_config, resume, resume_from)


def run(opts):
    p = plan(opts)
    device = launch.select_device(opts.device)
    load_from = p.resume_from
    if p.resume:
        log.info("resuming from %s", p.resume_from or f"the latest checkpoint in {p.outputs.workspace}")
    else:
        load_from = pretrained.resolve(opts.pretrained, p.base_config)
    if opts.amp and device != "cuda":
        log.warning("--amp needs CUDA; training in full precision on CPU")

    from .. import checkpoints, metrics, mmhooks  # noqa: F401 - mmhooks registers our hook and metric

    checkpoints.allow_mmengine_checkpoints()
    ctx = mmconfig.RunContext(
        classes=p.labels, data=p.data, work_dir=os.path.abspath(p.outputs.workspace),
        output_prefix=os.path.abspath(p.outputs.prefix), num_train_images=p.num_train_images,
        device=device, load_from=load_from, resume=p.resume)
    cfg = mmconfig.build_config(opts, p.base_config, ctx)

    from mmengine.runner import Runner

    # MMEngine logs to stdout; stdout is for results a script parses, so its log goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        runner = Runner.from_cfg(cfg)
        runner.train()
        if p.data.test:
            runner.test()

    meta = {"classes": list(p.labels), "dataset_meta": {"classes": list(p.labels)}, "categories": p.categories,
            "task": opts.task, "epoch": runner.epoch, "config": cfg.pretty_text,
            "cvtk_job": {"model": os.path.basename(p.base_config)}}
    checkpoints.save_weights(p.outputs.weights, runner.model, meta)
    with artifacts.atomic_path(p.outputs.config) as tmp:
        cfg.dump(tmp)
    written = [p.outputs.weights, p.outputs.config, p.outputs.train_txt, p.outputs.train_png]
    if p.data.valid:
        written += [p.outputs.valid_txt, p.outputs.valid_png]
    if p.data.test:
        gt = coco.read_json(p.data.test)
        pred = coco.read_json(p.outputs.test_outputs)
        stats = metrics.coco_stats(gt, pred, "segm" if opts.task == "segm" else "bbox",
                                   pred_name=p.outputs.test_outputs)
        artifacts.write_json(p.outputs.test_stats, stats, indent=4)
        written += [p.outputs.test_outputs, p.outputs.test_stats]
        log.info("test: %s = %.4f over %d detections", metrics.STAT_KEYS[0],
                 stats["stats"][metrics.STAT_KEYS[0]], len(pred["annotations"]))
    log.info("done: %d epochs; outputs next to %s", runner.epoch, p.outputs.weights)
    for path in written:
        print(path)
