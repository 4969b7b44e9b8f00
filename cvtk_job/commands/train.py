"""`cvtk-job train`: validate → configure → train → test → write the tutorial's outputs."""

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from .. import artifacts, checkpoints, coco, launch, mmconfig, pretrained, signals, storage
from .. import resume as resume_mod
from ..errors import UserError
from .validate import check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """Everything decided from the arguments and the small files (label file, model config, resume
    checkpoint), before any dataset or pretrained checkpoint is downloaded: a mistake there costs no
    transfer and writes nothing."""

    outputs: artifacts.TrainOutputs
    remote: Optional[artifacts.TrainOutputs]
    labels: list
    splits: tuple  # ((role, uri), ...) of the COCO files given
    base_config: str
    base_cfg: Any  # the config read from base_config (a user's --model file runs once, here)
    resume: bool
    resume_from: Optional[str]  # None with resume: the workspace's latest checkpoint
    pretrained: Optional[pretrained.Source]  # weights to start from when not resuming, or None
    tiles: Any = None  # predictor.Tiling (train --tile W H), "auto" (decided from the training set), or None
    tile_overlap: Optional[float] = None  # --tile_overlap as given (--tile auto derives one when it is None)
    max_detections: Optional[int] = None  # --max_detections as given (None: from the data)
    profile: Optional[tuple] = None  # (skip, steps) of CVTK_JOB_PROFILE: training steps to capture (profiling.py)


@dataclass(frozen=True)
class Plan:
    """The decision plus the staged, validated data: what the config is built from."""

    decision: Decision
    data: mmconfig.DataFiles
    num_train_images: int
    categories: list
    pretrained: Optional[str]  # the local file of decision.pretrained, present
    tiles: Any = None  # predictor.Tiling, decided (`--tile auto` from the staged training set), or None
    auto_tile: Any = None  # tiling.AutoTile: what `--tile auto` chose and from what
    max_detections: int = 100  # detections per image the model outputs (--max_detections, else from the data)
    densest_train: int = 0  # the most objects in one training image (or tile): where anchor assignment may OOM

    def __getattr__(self, name):  # the decision's fields read as the plan's
        if name == "decision":
            raise AttributeError(name)
        return getattr(self.decision, name)


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
    from .. import tiling

    tiling.parse_tile(opts.tile)
    if opts.tile_overlap is not None and not 0.0 <= opts.tile_overlap < 0.9:
        raise UserError(f"--tile_overlap {opts.tile_overlap}: give a fraction of a tile from 0 to below 0.9")
    mmconfig.parse_lr(opts.lr)
    if opts.time_limit:
        signals.parse_duration(opts.time_limit)
    if opts.max_detections is not None and opts.max_detections < 1:
        raise UserError(f"--max_detections {opts.max_detections}: give at least 1 detection per image")


def _annotated_images(data):
    with_boxes = {a["image_id"] for a in data["annotations"] if not a.get("ignore")}
    return sum(1 for img in data["images"] if img["id"] in with_boxes)


def _outputs(opts):
    """(local outputs, remote outputs or None): S3 outputs are written to a local staging folder first."""
    if storage.is_s3(opts.output_weights):
        remote = artifacts.TrainOutputs.from_weights(opts.output_weights)
        return artifacts.TrainOutputs(storage.staging_path(remote.prefix)), remote
    if os.path.isdir(opts.output_weights):
        raise UserError(f"--output_weights {opts.output_weights}: is a folder; name the weights file, e.g. "
                        f"{os.path.join(opts.output_weights, 'model.pth')}")
    return artifacts.TrainOutputs.from_weights(opts.output_weights), None


def _check_exists(role, uri):
    found = storage.exists(uri) if storage.is_s3(uri) else os.path.isfile(uri)
    if not found:
        raise UserError(f"--{role} {uri}: file not found; pass the COCO JSON of the {role} images")


def decide(opts):
    """Arguments → Decision, downloading only the label file (and, for --resume, the checkpoint)."""
    _check_numbers(opts)
    from .. import profiling

    profile = profiling.requested()
    outputs, remote = _outputs(opts)
    base_config = mmconfig.resolve_model(opts.model, opts.task)
    labels = coco.load_labels(storage.stage_file(opts.label))
    splits = tuple((role, uri) for role, uri in (("train", opts.train), ("valid", opts.valid), ("test", opts.test))
                   if uri)
    for role, uri in splits:
        _check_exists(role, uri)
    base_cfg = mmconfig.load_base(base_config)  # a broken --model fails here, before any dataset is downloaded
    resume, resume_from = resume_mod.resume_point(opts.resume, opts.task, outputs, remote, labels)
    source = None if resume else pretrained.locate(opts.pretrained, base_config)
    from .. import predictor, tiling

    tiles = tiling.parse_tile(opts.tile)
    if isinstance(tiles, tuple):
        tiles = predictor.Tiling(*tiles, 0.2 if opts.tile_overlap is None else opts.tile_overlap)
    return Decision(outputs, remote, labels, splits, base_config, base_cfg, resume, resume_from, source, tiles,
                    opts.tile_overlap, opts.max_detections, profile)


def _auto_tiles(train, overlap):
    """`--tile auto`: the tiles tiling.auto_tile derives from the training annotations, said in the log."""
    from .. import predictor, tiling

    auto = tiling.auto_tile(train, overlap)
    if auto is None:
        raise UserError("--tile auto: the training set has no annotations to size the tiles from; give --tile W H")
    log.info("--tile auto: %d annotations, mean object %.0f px (area %.0f px²), longest side %.0f px: tiles of "
             "%dx%d overlapping %g", auto.annotations, auto.mean_area ** 0.5, auto.mean_area, auto.longest,
             auto.size, auto.size, auto.overlap)
    return predictor.Tiling(auto.size, auto.size, auto.overlap), auto


def _tiled(t, role, path, data, task):
    """The training or validation set cut into tiles (tiling.cut_coco), kept in the cache under a key of the
    file's contents and the tile settings: a rerun (or resume) reuses it."""
    import hashlib

    from .. import tiling

    settings = f"{artifacts.sha256(path)} {t.width} {t.height} {t.overlap} {task} v1"
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    folder = os.path.join(storage.cache_root(), "tiles", key)
    out = os.path.join(folder, f"{role}.json")
    if not os.path.isfile(out):
        tiled = tiling.cut_coco(data, os.path.dirname(path), folder, t.width, t.height, t.overlap, task == "segm")
        artifacts.write_json(out, tiled)
        log.info("%s: %d images cut into %d tiles of %dx%d (overlap %g), %d annotations -> %d parts", role,
                 len(data["images"]), len(tiled["images"]), t.width, t.height, t.overlap, len(data["annotations"]),
                 len(tiled["annotations"]))
    return out


def _max_detections(d, reports):
    """--max_detections, else the most objects in one image of any split, at least mmdet's 100: a dense image
    (hundreds of fruits) is not cut at 100 detections, and every test AP is computed at that number."""
    if d.max_detections:
        return d.max_detections
    from ..metrics import densest as most_in_one_image

    densest = max(most_in_one_image(report.data["annotations"]) for report in reports)
    if densest > 100:
        log.info("max detections per image: %d (the densest image has %d objects; mmdet's default is 100)",
                 densest, densest)
    return max(100, densest)


def stage(d, task, fetch_pretrained=True):
    """Decision → Plan: download and validate the datasets, then the pretrained checkpoint (a dry run
    leaves that download to the real run: the config names the path either way)."""
    local = {role: coco.stage_coco(uri) for role, uri in d.splits}
    reports = check([(role, local[role]) for role, _ in d.splits], labels=d.labels, task=task,
                    names={local[role]: uri for role, uri in d.splits})
    for (role, _), report in zip(d.splits, reports, strict=True):
        coco.keep_parsed(local[role], report.data)
    train = reports[0].data
    num_train = _annotated_images(train)
    if num_train == 0:
        raise UserError(f"{d.splits[0][1]}: no image has an annotation; training needs annotated images")
    categories = [{"id": c["id"], "name": c["name"]} for c in sorted(train["categories"], key=lambda c: c["id"])]
    files = {role: os.path.abspath(local[role]) for role, _ in d.splits}
    tiles, auto = d.tiles, None
    from ..metrics import densest

    densest_train = densest(train["annotations"])
    if tiles == "auto":
        tiles, auto = _auto_tiles(train, d.tile_overlap)
    if tiles:  # train and validate on tiles; the test step predicts on the whole images, tile by tile
        for (role, _), report in zip(d.splits, reports, strict=True):
            if role != "test":
                files[role] = _tiled(tiles, role, files[role], report.data, task)
        tiled_train = coco.read_json(files["train"])
        num_train, densest_train = _annotated_images(tiled_train), densest(tiled_train["annotations"])
    data = mmconfig.DataFiles(*(files.get(r) for r in ("train", "valid", "test")))
    start = pretrained.fetch(d.pretrained) if fetch_pretrained else (d.pretrained.path if d.pretrained else None)
    return Plan(d, data, num_train, categories, start, tiles, auto, _max_detections(d, reports), densest_train)


def plan(opts):
    return stage(decide(opts), opts.task)


def config(opts, p, where, device):
    """The complete MMEngine config of this run (a pure function of the plan)."""
    ctx = mmconfig.RunContext(
        classes=p.labels, data=p.data, work_dir=os.path.abspath(p.outputs.workspace),
        output_prefix=os.path.abspath(p.outputs.prefix), num_train_images=p.num_train_images,
        device=device, load_from=p.resume_from, resume=p.resume, pretrained=p.pretrained,
        world_size=where.world_size, launcher="pytorch" if where.distributed else "none",
        remote_prefix=p.remote.prefix if p.remote else None, max_detections=p.max_detections,
        precision=mmconfig.precision(opts, device)[0], densest_train=p.densest_train, profile=p.profile)
    return mmconfig.build_config(opts, p.base_cfg, ctx)


def _test_stats(p, task):
    from .. import metrics

    gt = coco.read_json(p.data.test)
    pred = coco.read_json(p.outputs.test_outputs)
    stats = metrics.coco_stats(gt, pred, "segm" if task == "segm" else "bbox", pred_name=p.outputs.test_outputs)
    artifacts.write_json(p.outputs.test_stats, stats, indent=4)
    log.info("test: %s = %.4f over %d detections", metrics.STAT_KEYS[0], stats["stats"][metrics.STAT_KEYS[0]],
             len(pred["annotations"]))
    return stats


def _batch_size(value):
    """--batch_size as a number; None for auto."""
    if str(value) == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--batch_size {value}: give a number of images per process, or auto") from None


def run(opts):
    started = time.time()
    batch = _batch_size(opts.batch_size)
    auto_batch = batch is None
    # auto: 1 image per process until measured (_auto_batch, when training starts); the dry run says so.
    opts = dataclasses.replace(opts, batch_size=batch or 1)
    if opts.num_workers is None:
        opts = dataclasses.replace(opts, num_workers=launch.default_workers())
    gc.disable()  # until the first iteration (mmhooks.StartupGC): start-up builds large acyclic data
    # Before staging: a SIGTERM while data downloads still ends in a clean stop (exit 75), not a kill.
    signals.install(signals.parse_duration(opts.time_limit) if opts.time_limit else None)
    where = launch.detect()
    with storage.node_lock():  # the other processes of this job on this node wait, then find it cached
        d = decide(opts)
        p = stage(d, opts.task, fetch_pretrained=not opts.dry_run)
    device = launch.select_device(opts.device)
    cfg = config(opts, p, where, device)
    shapes = mmconfig.model_shapes(cfg, opts.model or os.path.basename(p.base_config))
    if p.pretrained and os.path.isfile(p.pretrained):  # (a dry run may not have fetched it)
        pretrained.check_fits(shapes, p.pretrained)
    if opts.dry_run:
        return _dry_run(opts, p, where, device, cfg, auto_batch)
    # From here on the run has started: a failure leaves a record. Before, nothing was written at all.
    try:
        _train(opts, p, where, device, cfg, started, auto_batch)
    except BaseException as err:
        if where.is_main:
            _record_failure(p, err)
        raise


def _tiled_test(p, opts, runner, cfg, device):
    """The test step of a run on tiles: the whole test images predicted tile by tile and merged, exactly as
    `inference` does with these weights, so test_stats.json says what users will get."""
    from .. import predictions, predictor, raster, tiling

    model = getattr(runner.model, "module", runner.model)
    model.eval()
    gt = coco.read_json(p.data.test)
    transform, size = predictor.pipeline(cfg), predictor.input_size(cfg)
    results = []
    for img in gt["images"]:
        image = raster.open_image(os.path.join(os.path.dirname(p.data.test), img["file_name"]))
        height, width = image.height, image.width
        merged = predictor.predict_tiled(model, transform, image, p.tiles, opts.batch_size, 0.0,
                                         opts.task == "segm", size)
        image.close()
        results.append((int(img["id"]), [tiling.detection(piece, height, width) for piece in merged]))
    artifacts.write_json(p.outputs.test_outputs, predictions.coco_results(gt, results))
    log.info("test on tiles: %d images, %d detections", len(results), sum(len(r) for _, r in results))


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


def _auto_batch(opts, p, cfg, where, device):
    """--batch_size auto → (batch, details): the resumed checkpoint's batch, else measured (autobatch)."""
    from .. import autobatch

    if p.resume:
        pointer = os.path.join(p.outputs.workspace, "last_checkpoint")
        checkpoint = p.resume_from or (open(pointer, encoding="utf-8").read().strip()
                                       if os.path.isfile(pointer) else None)
        batch = autobatch.resumed_batch(checkpoint) if checkpoint else None
        if batch:
            log.info("--batch_size auto: %d per process, the batch of the run being resumed", batch)
            return batch, {"batch_size": batch, "resumed": True}
    if not autobatch.probing_possible(device):
        log.info("--batch_size auto measures GPU memory; on %s: the default, 4 per process", device)
        return 4, {"batch_size": 4, "measured": False}
    limit = max(1, -(-p.num_train_images // where.world_size))
    batch, details = autobatch.decide(cfg, device, where, limit)
    log.info("--batch_size auto: %d per process (peak memory MiB by batch: %s; %d MiB free, %.0f%% used at most; "
             "densest training image: %d objects)", batch, details.get("peak_mib"), details.get("free_mib", 0),
             100 * details.get("share", 0), details.get("densest_image_objects", 0))
    return batch, details


def _train(opts, p, where, device, cfg, started, auto_batch=False):
    if p.resume:
        log.info("resuming from %s", p.resume_from or f"the latest checkpoint in {p.outputs.workspace}")
    chosen, why = mmconfig.precision(opts, device)
    if why:
        log.warning("%s", why)
    log.info("precision: %s%s", chosen, " (mixed, dynamic loss scaling)" if chosen == "fp16" else
             " (mixed, no loss scaling)" if chosen == "bf16" else "")

    from .. import mmhooks  # registers our hooks and metric

    mmhooks.use_parsed_coco()

    checkpoints.allow_mmengine_checkpoints()
    launch.init_distributed(where, device)
    if where.distributed:
        log.info("distributed: rank %d of %d (%s, master %s:%d)", where.rank, where.world_size, where.kind,
                 where.master_addr, where.master_port)

    batch_details = None
    if auto_batch:  # after joining the process group: rank 0 measures, every rank gets its answer
        with contextlib.redirect_stdout(sys.stderr):
            batch, batch_details = _auto_batch(opts, p, cfg, where, device)
        opts = dataclasses.replace(opts, batch_size=batch)
        cfg = config(opts, p, where, device)  # the learning rate follows the global batch

    # MMEngine logs to stdout; stdout is for results a script parses, so its log goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        runner = mmhooks.CvtkRunner.from_cfg(cfg)
        runner.register_hook(mmhooks.StartupGC())
        runner.train()
        if p.data.test and not p.tiles:
            runner.test()
        elif p.data.test and where.is_main:
            _tiled_test(p, opts, runner, cfg, device)
    if not where.is_main:
        return  # only rank 0 writes and uploads outputs

    meta = {"classes": list(p.labels), "dataset_meta": {"classes": list(p.labels)}, "categories": p.categories,
            "task": opts.task, "epoch": runner.epoch, "config": cfg.pretty_text,
            "cvtk_job": {"model": os.path.basename(p.base_config)}}
    if batch_details:
        meta["batch_size_auto"] = batch_details
    meta["precision"] = {"precision": chosen}
    scaler = getattr(runner.optim_wrapper, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "get_scale"):
        meta["precision"]["loss_scale"] = float(scaler.get_scale())  # where dynamic scaling ended
        log.info("final loss scale: %g", meta["precision"]["loss_scale"])
    backoffs = getattr(runner.train_loop, "backoffs", [])
    if backoffs:  # out of GPU memory: the steps ran in parts (mmhooks.CvtkTrainLoop)
        meta["oom_backoff"] = backoffs
    if p.tiles:  # inference tiles the same way by default
        meta["tile"] = {"width": p.tiles.width, "height": p.tiles.height, "overlap": p.tiles.overlap}
        if p.auto_tile:
            meta["tile"]["auto"] = dataclasses.asdict(p.auto_tile)
    if p.data.test:  # before the weights: they keep each class's F1-optimal threshold (inference's auto)
        stats = _test_stats(p, opts.task)
        meta["score_thresholds"] = {name: row["threshold"] for name, row in stats["best_f1"].items()}
    checkpoints.save_weights(p.outputs.weights, runner.model, meta)
    with artifacts.atomic_path(p.outputs.config) as tmp:
        cfg.dump(tmp)
    written = [p.outputs.weights, p.outputs.config, p.outputs.train_txt, p.outputs.train_png]
    if p.data.valid:
        written += [p.outputs.valid_txt, p.outputs.valid_png]
    if p.data.test:
        written += [p.outputs.test_outputs, p.outputs.test_stats]
    _write_report(p, opts, runner, stats if p.data.test else None, where, device, started)
    written.append(p.outputs.report)
    written = [w for w in written if os.path.isfile(w)]
    _finish(p, written)
    log.info("done: %d epochs; outputs next to %s", runner.epoch,
             p.remote.weights if p.remote else p.outputs.weights)


def _version(name):
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _write_report(p, opts, runner, stats, where, device, started):
    """X.report.html: the run's summary, curves, test tables and gallery (report)."""
    from .. import metrics, report

    summary = {"run": os.path.basename(p.outputs.prefix), "task": opts.task,
               "model": os.path.basename(p.base_config), "epochs": runner.epoch,
               "batch": f"{opts.batch_size} per process x {where.world_size} process(es)", "device": device,
               "training images": p.num_train_images, "tiles": f"{p.tiles.width}x{p.tiles.height}, overlap "
               f"{p.tiles.overlap:g}" if p.tiles else "none",
               **{f"--{role}": uri for role, uri in p.decision.splits},
               "run time": f"{(time.time() - started) / 60:.1f} min, finished "
                           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
               "versions": ", ".join(f"{n} {_version(n)}" for n in ("cvtk-job", "torch", "mmdet", "mmengine", "mmcv"))}
    gallery = None
    if stats:
        gt = coco.read_json(p.data.test)
        detections = metrics.matched_predictions(gt, coco.read_json(p.outputs.test_outputs), p.outputs.test_outputs)
        gallery = report.gallery(gt, detections, os.path.dirname(p.data.test), stats, opts.task)
    report.write(p.outputs.report, summary, artifacts.read_tsv(p.outputs.train_txt),
                 artifacts.read_tsv(p.outputs.valid_txt), stats, gallery)


def _dry_run(opts, p, where, device, cfg, auto_batch=False):
    """Print the plan and the final MMEngine config as JSON: everything a run with the same arguments would
    use (the data is staged and validated, the config built), without building a model or writing outputs."""
    import json

    plan_ = {"model_config": p.base_config, "labels": list(p.labels), "data": dataclasses.asdict(p.data),
             "num_train_images": p.num_train_images,
             "tiles": dataclasses.asdict(p.tiles) if p.tiles else None,
             "auto_tile": dataclasses.asdict(p.auto_tile) if p.auto_tile else None,
             "resume": p.resume, "resume_from": p.resume_from,
             "pretrained": pretrained.shown(p.decision.pretrained.url or p.decision.pretrained.uri or p.pretrained)
             if p.decision.pretrained else None,
             "device": device, "precision": mmconfig.precision(opts, device)[0],
             "batch_size": "auto: measured when training starts (the config shows 1 per process until then)"
             if auto_batch else opts.batch_size,
             "outputs": {"weights": (p.remote or p.outputs).weights, "workspace": (p.remote or p.outputs).workspace}}
    print(json.dumps({"command": "train", "options": dataclasses.asdict(opts), "launch": dataclasses.asdict(where),
                      "plan": plan_, "config": cfg.to_dict()}, indent=2, default=str))


def _finish(p, written):
    """Upload (S3) and write the done marker last: its presence means every output is complete."""
    root = os.path.dirname(p.outputs.prefix)
    if os.path.exists(p.outputs.failed):
        os.unlink(p.outputs.failed)  # an earlier attempt failed; this one did not
    marker = artifacts.done_marker(written, root)
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
