"""`cvtk-job train`: validate → configure → train → test → write the tutorial's outputs."""

import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from .. import artifacts, checkpoints, coco, launch, mmconfig, pretrained, signals, storage
from .. import resume as resume_mod
from ..errors import UserError
from .validate import check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Everything decided before torch is imported (so user errors stay fast and cheap)."""

    outputs: artifacts.TrainOutputs
    remote: Optional[artifacts.TrainOutputs]
    labels: list
    data: mmconfig.DataFiles
    num_train_images: int
    categories: list
    base_config: str
    resume: bool
    resume_from: Optional[str]  # None with resume: the workspace's latest checkpoint
    pretrained: Optional[str]  # weights to start from when not resuming (--pretrained, local), or None


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


def _outputs(opts):
    """(local outputs, remote outputs or None): S3 outputs are written to a local staging folder first."""
    if storage.is_s3(opts.output_weights):
        remote = artifacts.TrainOutputs.from_weights(opts.output_weights)
        return artifacts.TrainOutputs(storage.staging_path(remote.prefix)), remote
    return artifacts.TrainOutputs.from_weights(opts.output_weights), None


def plan(opts):
    _check_numbers(opts)
    outputs, remote = _outputs(opts)
    labels = coco.load_labels(storage.stage_file(opts.label))
    given = [(role, uri) for role, uri in (("train", opts.train), ("valid", opts.valid), ("test", opts.test)) if uri]
    splits = [(role, storage.stage_coco(uri)) for role, uri in given]
    reports = check(splits, labels=labels, task=opts.task,
                    names={local: uri for (_, local), (_, uri) in zip(splits, given, strict=True)})
    num_train = _annotated_images(reports[0].data)
    if num_train == 0:
        raise UserError(f"{opts.train}: no image has an annotation; training needs annotated images")
    categories = [{"id": c["id"], "name": c["name"]} for c in sorted(reports[0].data["categories"],
                                                                      key=lambda c: c["id"])]
    base_config = mmconfig.resolve_model(opts.model, opts.task)
    resume, resume_from = resume_mod.resume_point(opts.resume, opts.task, outputs, remote, labels)
    # Resolved (and downloaded) here, so a missing file or a failed download leaves no outputs behind.
    start_from = None if resume else pretrained.resolve(storage.stage_file(opts.pretrained), base_config)
    local = dict(splits)
    data = mmconfig.DataFiles(*(os.path.abspath(local[r]) if r in local else None
                                for r in ("train", "valid", "test")))
    return Plan(outputs, remote, labels, data, num_train, categories, base_config, resume, resume_from, start_from)


def _test_stats(p, task):
    from .. import metrics

    gt = coco.read_json(p.data.test)
    pred = coco.read_json(p.outputs.test_outputs)
    stats = metrics.coco_stats(gt, pred, "segm" if task == "segm" else "bbox", pred_name=p.outputs.test_outputs)
    artifacts.write_json(p.outputs.test_stats, stats, indent=4)
    log.info("test: %s = %.4f over %d detections", metrics.STAT_KEYS[0], stats["stats"][metrics.STAT_KEYS[0]],
             len(pred["annotations"]))


def run(opts):
    if opts.num_workers is None:
        opts = dataclasses.replace(opts, num_workers=launch.default_workers())
    signals.install(signals.parse_duration(opts.time_limit) if opts.time_limit else None)
    where = launch.detect()
    if opts.dry_run:
        return _dry_run(opts, where)
    with storage.node_lock():  # the other processes of this job on this node wait, then find it cached
        p = plan(opts)
    device = launch.select_device(opts.device)
    # From here on the run has started: a failure leaves a record. Before, nothing was written at all.
    try:
        _train(opts, p, where, device)
    except BaseException as err:
        if where.is_main:
            _record_failure(p, err)
        raise


def _record_failure(p, err):
    """X.failed.json beside the outputs (and on S3): what stopped the run, for people and pipelines."""
    from ..errors import CvtkJobError

    code = err.exit_code if isinstance(err, CvtkJobError) else 1
    record = {"exit_code": code, "error": type(err).__name__, "message": str(err)[:2000],
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        artifacts.write_json(p.outputs.failed, record, indent=2)
        if p.remote is not None:
            storage.Outbox(os.path.dirname(p.outputs.prefix), os.path.dirname(p.remote.prefix)).sync(
                [p.outputs.failed])
    except Exception as write_err:  # noqa: BLE001 - never hide the original error behind this one
        log.warning("could not write the failure record: %s", write_err)


def _train(opts, p, where, device):
    if p.resume:
        log.info("resuming from %s", p.resume_from or f"the latest checkpoint in {p.outputs.workspace}")
    if opts.amp and device != "cuda":
        log.warning("--amp needs CUDA; training in full precision on CPU")

    from .. import mmhooks  # noqa: F401 - registers our hooks and metric

    checkpoints.allow_mmengine_checkpoints()
    ctx = mmconfig.RunContext(
        classes=p.labels, data=p.data, work_dir=os.path.abspath(p.outputs.workspace),
        output_prefix=os.path.abspath(p.outputs.prefix), num_train_images=p.num_train_images,
        device=device, load_from=p.resume_from, resume=p.resume, pretrained=p.pretrained, world_size=where.world_size,
        launcher="pytorch" if where.distributed else "none",
        remote_prefix=p.remote.prefix if p.remote else None)
    cfg = mmconfig.build_config(opts, p.base_config, ctx)
    launch.init_distributed(where, device)
    if where.distributed:
        log.info("distributed: rank %d of %d (%s, master %s:%d)", where.rank, where.world_size, where.kind,
                 where.master_addr, where.master_port)

    from mmengine.runner import Runner

    # MMEngine logs to stdout; stdout is for results a script parses, so its log goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        runner = Runner.from_cfg(cfg)
        runner.train()
        if p.data.test:
            runner.test()
    if not where.is_main:
        return  # only rank 0 writes and uploads outputs

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
        _test_stats(p, opts.task)
        written += [p.outputs.test_outputs, p.outputs.test_stats]
    written = [w for w in written if os.path.isfile(w)]
    _finish(p, written)
    log.info("done: %d epochs; outputs next to %s", runner.epoch,
             p.remote.weights if p.remote else p.outputs.weights)


def _dry_run(opts, where):
    """Check the arguments and print the plan as JSON; touches no data, builds no model."""
    import json

    _check_numbers(opts)
    base_config = mmconfig.resolve_model(opts.model, opts.task)
    outputs = artifacts.TrainOutputs.from_weights(opts.output_weights)
    print(json.dumps({"command": "train", "options": dataclasses.asdict(opts), "model_config": base_config,
                      "launch": dataclasses.asdict(where), "outputs": {"weights": outputs.weights,
                                                                        "workspace": outputs.workspace}},
                     indent=2))


def _finish(p, written):
    """Upload (S3) and write the done marker last: its presence means every output is complete."""
    root = os.path.dirname(p.outputs.prefix)
    if os.path.exists(p.outputs.failed):
        os.unlink(p.outputs.failed)  # an earlier attempt failed; this one did not
    marker = storage.done_marker(written, root)
    artifacts.write_json(p.outputs.done, marker, indent=2)
    if p.remote is None:
        for path in written:
            print(path)
        return
    outbox = storage.Outbox(root, os.path.dirname(p.remote.prefix))
    for uri in outbox.sync(written):
        print(uri)
    storage.remove(p.remote.failed)  # an earlier attempt's failure record (a fresh machine cannot see it)
    outbox.sync([p.outputs.done])
