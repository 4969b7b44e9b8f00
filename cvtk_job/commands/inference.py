"""`cvtk-job inference`: batched, streaming predictions → drawn images + instances.json.

Images are read and transformed ahead by DataLoader workers and go through the model `--batch_size`
at a time; each batch's results are written out before more is read, so memory stays flat whatever
the number of images.

A batch only ever holds images of one size. MMDetection pads a mixed batch to its largest image, and
the padding changes the features near the image border (after the first BatchNorm the padded area is
no longer zero), so a detection would depend on which images it was batched with. Grouping by size
keeps predictions independent of `--batch_size` and wastes no compute on padding.
"""

import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from .. import artifacts, coco, images, launch, names, postprocess, predictions, signals, storage
from ..errors import Interrupted, UserError

log = logging.getLogger(__name__)
INSTANCES = "instances.json"
DONE = "done.json"
PREVIOUS = ".done.previous.json"  # a rerun's record of the last complete run's outputs, while it runs


def _check(opts):
    if opts.batch_size < 1:
        raise UserError(f"--batch_size {opts.batch_size}: a batch holds at least 1 image")
    if opts.num_workers < 0:
        raise UserError(f"--num_workers {opts.num_workers}: use 0 (read in the main process) or more")
    if opts.score_threshold != "auto":
        try:
            value = float(opts.score_threshold)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--score_threshold {opts.score_threshold}: give a score between 0 and 1, or auto")
    if opts.tile and opts.tile != [0, 0] and min(opts.tile) < 32:
        raise UserError(f"--tile {opts.tile[0]} {opts.tile[1]}: a tile is at least 32 x 32 pixels (0 0: no tiles)")
    if opts.tile_overlap is not None and not 0.0 <= opts.tile_overlap < 0.9:
        raise UserError(f"--tile_overlap {opts.tile_overlap}: give a fraction of a tile from 0 to below 0.9")


def _open_tiled(index, path):
    """An image to predict on tile by tile, as a predictor Item holding its `raster` source (or the reason it
    cannot be read)."""
    from .. import predictor, raster

    try:
        return predictor.Item(index, original=raster.open_image(path))
    except raster.ImageError as err:
        return predictor.Item(index, error=str(err))


def _tiling(opts, meta):
    """The tiles to predict on: --tile, else the ones the weights were trained on (train --tile), else none."""
    from .. import predictor

    saved = meta.get("tile") if isinstance(meta.get("tile"), dict) else {}
    if opts.tile == [0, 0]:
        return None
    size = opts.tile or ([saved["width"], saved["height"]] if saved.get("width") and saved.get("height") else None)
    if not size:
        return None
    overlap = opts.tile_overlap if opts.tile_overlap is not None else float(saved.get("overlap", 0.2))
    return predictor.Tiling(int(size[0]), int(size[1]), overlap, not opts.no_full_image)


def _load_config(opts, config_path, meta):
    """The model's config, read as data (configdata): the file the user named with --model_config, else
    the one inside the weights (cvtk-job's `config`, or `cfg` in an MMEngine checkpoint such as upstream
    cvtk's X.pth). No file is ever executed, and none is picked up unasked from beside the weights."""
    from .. import configdata

    if config_path:
        with open(config_path, encoding="utf-8", errors="replace") as fh:
            return configdata.load(fh.read(), opts.model_config)
    text = meta.get("config") or meta.get("cfg")
    if isinstance(text, str) and text.strip():
        return configdata.load(text, f"{opts.model_weights} (the config inside it)")
    raise UserError(f"{opts.model_weights}: holds no config; name the model's config with --model_config "
                    "(e.g. the X.py written beside X.pth)")


def _task(meta, state_dict):
    """segm or det: cvtk-job's weights say it; an MMEngine checkpoint shows it by having a mask head."""
    if meta.get("task") in ("segm", "det"):
        return meta["task"]
    return "segm" if any(".mask_head." in key for key in state_dict) else "det"


def _check_classes(labels, meta, opts):
    trained = meta.get("classes") or meta.get("dataset_meta", {}).get("classes")
    if trained is not None and list(trained) != list(labels):
        raise UserError(f"{opts.label}: classes {list(labels)} differ from the classes the weights were "
                        f"trained with {list(trained)}; use the label file of the training run")


def _stage_data(uri):
    """`--data` on S3 → a local equivalent: a COCO JSON, one image, a list file or a prefix of images."""
    if not storage.is_s3(uri):
        return uri
    if uri.lower().endswith(".json"):
        return coco.stage_coco(uri)
    if images.is_image_name(uri):
        return storage.stage_file(uri)
    if uri.endswith("/") or not storage.exists(uri):
        listed = storage.stage_prefix(uri, keep=images.is_image_name)
        root = storage.cache_path(uri.rstrip("/") + "/x")[:-2]
        return images.ImageSet(root, [images.ImageRef(path, name) for name, path in listed.items()], "prefix")
    local = storage.stage_file(uri)  # a list file: stage what it names relative to its prefix
    entries = [entry for _, entry in images.list_entries(local, uri)]
    storage.stage_many(uri.rsplit("/", 1)[0], entries, uri)  # refuses absolute entries and '..'
    return local


def _local(uri):
    return storage.stage_file(uri) if uri and storage.is_s3(uri) else uri


@dataclass(frozen=True)
class Decision:
    """What inference decided before any image is staged: a wrong label file, weights of other classes or
    an --output that is a file cost no image transfer."""

    labels: list
    weights: dict  # the checkpoint, loaded as plain data
    cfg: Any  # the model's config, read as data
    task: str
    categories: list
    tiling: Any = None  # predictor.Tiling, or None: whole images
    threshold: Any = 0.5  # a score, or one per class (--score_threshold auto)


def _check_output(output):
    if not storage.is_s3(output) and os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"--output {output}: is an existing file; give a folder for the drawn images and "
                        "instances.json")


def decide(opts):
    from .. import checkpoints

    _check_output(opts.output)
    labels = coco.load_labels(storage.stage_file(opts.label))
    config_path = _local(opts.model_config)
    if config_path and not os.path.isfile(config_path):
        raise UserError(f"--model_config {opts.model_config}: file not found; pass the config written beside "
                        "the weights (X.py)")
    weights = checkpoints.load_weights(_local(opts.model_weights), opts.model_weights)
    meta = weights["meta"]
    _check_classes(labels, meta, opts)
    checkpoints.check_head(weights["state_dict"], labels, opts.model_weights,
                           "use the label file of the training run")
    with contextlib.redirect_stdout(sys.stderr):  # mmengine prints to stdout
        cfg = _load_config(opts, config_path, meta)
    categories = meta.get("categories") or [{"id": i, "name": n} for i, n in enumerate(labels)]
    return Decision(labels, weights, cfg, _task(meta, weights["state_dict"]), categories, _tiling(opts, meta),
                    _threshold(opts, meta, labels))


def _threshold(opts, meta, labels):
    """--score_threshold as a number, or for auto the per-class thresholds train's test step stored."""
    if opts.score_threshold != "auto":
        return float(opts.score_threshold)
    saved = meta.get("score_thresholds")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(n), (int, float)) for n in labels):
        raise UserError(f"--score_threshold auto: {opts.model_weights} holds no per-class thresholds (they are "
                        "found by train's test step: train with --test); give a number, e.g. 0.5")
    thresholds = [float(saved[n]) for n in labels]
    log.info("score thresholds (F1-optimal on the training run's test set): %s",
             ", ".join(f"{n} {t:.3g}" for n, t in zip(labels, thresholds, strict=True)))
    return thresholds


def _dry_run(opts, d, found):
    plan = {"labels": d.labels, "task": d.task, "model": d.cfg.model.get("type"),
            "config": "--model_config" if opts.model_config else "inside the weights",
            "images": len(found.images), "input": found.kind, "first": [r.name for r in found.images[:5]],
            "tiles": dataclasses.asdict(d.tiling) if d.tiling else None,
            "score_threshold": d.threshold, "output": opts.output}
    print(json.dumps({"command": "inference", "options": dataclasses.asdict(opts), "plan": plan}, indent=2))


def run(opts):
    # Until the loop: start-up (torch's and mmdet's modules, the model, the image list) makes objects that live as
    # long as the process, and the cyclic collector would scan them at every generation they pass through; they
    # are then frozen out of it (as train does: mmhooks.StartupGC). 40 sample images on CPU, whole command,
    # median of 3 alternated runs: 12.65 -> 11.50 s, outputs byte-identical.
    gc.disable()
    if opts.num_workers is None:
        opts = dataclasses.replace(opts, num_workers=launch.default_workers())
    _check(opts)
    with storage.node_lock():  # one stager per node; the other processes find everything cached
        d = decide(opts)
        staged = _stage_data(opts.data)
        found = staged if isinstance(staged, images.ImageSet) else \
            images.collect(staged, name=opts.data, local=not storage.is_s3(opts.data))
    if opts.dry_run:
        return _dry_run(opts, d, found)
    signals.install()  # SIGTERM/SIGUSR1: stop between batches, write nothing final, exit 75
    labels, weights, cfg, categories = d.labels, d.weights, d.cfg, d.categories
    output = storage.staging_path(opts.output) if storage.is_s3(opts.output) else opts.output
    device = launch.select_device(opts.device)
    # Joined before the model is built: on GPUs, joining sets this rank's device, so each rank's model lands
    # on its own GPU rather than all of them on GPU 0.
    where = launch.detect()
    launch.init_distributed(where, device)
    if where.distributed and storage.is_s3(opts.output):
        output = os.path.join(output, f".rank{where.rank}")  # ranks on one machine share the cache folder

    import torch

    from .. import predictor

    threshold = d.threshold
    floor = min(threshold) if isinstance(threshold, list) else threshold  # the model drops what is below all
    # Started before the model is loaded: the workers are forked from a process that does not hold it yet.
    # Tiled: one worker, two images in flight. A worker holds the image it draws (a 16000x16000 JPEG decoded is
    # 768 MB), and one image's drawing takes seconds against the minutes of its tiles in the model.
    post = postprocess.Inline(labels) if not opts.num_workers else \
        postprocess.Workers(1, labels, ahead=2) if d.tiling else postprocess.Workers(opts.num_workers, labels)
    model = predictor.load_model(cfg, weights, device, floor, where=opts.model_weights)
    with_mask = d.task == "segm"
    in_box = with_mask and predictor.masks_pasted_in_boxes(model)
    tiled = d.tiling
    transform = predictor.pipeline(cfg)

    # Several processes (torchrun, srun): each takes every world_size-th image and writes its own part.
    shard = list(range(where.rank, len(found.images), where.world_size))
    part = os.path.join(output, f".{INSTANCES}.part{where.rank}") if where.distributed else None
    # Tiled: tiles are cut and transformed batch by batch in this process. Whole images are drawn by the
    # post-processing workers, which read them again: no copy of each image travels through this process.
    dataset = predictor.ImageDataset([found.images[i] for i in shard], None if tiled else transform,
                                     keep_original=tiled is not None)
    os.makedirs(output, exist_ok=True)
    previous = _open_rerun(opts.output, output) if where.is_main else set()
    skipped, done, drawn = [], 0, []  # drawn: this run's images (a rerun's outputs are exactly its own)
    log.info("inference: %d images from %s (%s), batch %d, %s%s", len(found.images), opts.data, found.kind,
             opts.batch_size, device, f", tiles {tiled.width}x{tiled.height} overlapping {tiled.overlap:g}"
             f"{' + the whole image' if tiled.full_image else ''}" if tiled else "")
    writer = predictions.PartWriter(part, categories) if part else \
        predictions.InstancesWriter(os.path.join(output, INSTANCES), categories)
    in_order = predictions.InputOrder(writer, shard)
    stopped = False
    if tiled:
        # Read here, one image at a time, with no reader process: a reader would hold a second copy of each
        # image and pickle it over to us (3 x 768 MB for a 16000x16000 RGB), while reading takes a second
        # against the minutes its tiles take in the model. A TIFF is read band by band (raster.TiffBands).
        batches = ([_open_tiled(i, dataset.refs[i].path)] for i in range(len(dataset)))
    else:
        # batch_size=None: the loader yields single items (read ahead by the workers); we batch by size.
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=opts.num_workers,
                                             shuffle=False, worker_init_fn=signals.detach_loader_worker)
        batches = predictor.same_size_batches(loader, opts.batch_size, max_pending=4 * opts.batch_size)
    gc.freeze()
    gc.enable()
    with writer, post, torch.no_grad():
        for batch in batches:
            if signals.requested():
                stopped = True
                break
            good = []
            for item in batch:
                item.index = shard[item.index]  # position in this shard → position in the whole input
                if item.error:
                    ref = found.images[item.index]
                    log.warning("skipped %s: %s", ref.path, item.error)
                    skipped.append(ref.path)
                    in_order.skip(item.index)
                else:
                    good.append(item)
            if not good:
                continue
            if tiled:  # one image: its tiles are the batches
                item = good[0]
                height, width = item.original.height, item.original.width
                merged = predictor.predict_tiled(model, transform, item.original, tiled, opts.batch_size,
                                                 threshold, with_mask, predictor.input_size(cfg))
                item.original.close()
                ref = found.images[item.index]
                if not opts.no_draw:
                    drawn.append(os.path.join(output, ref.name))
                job = postprocess.TiledJob(item.index, ref.name, int(width), int(height), merged, with_mask,
                                           ref.path, None if opts.no_draw else drawn[-1])
                for index, *record in post.submit(job):
                    in_order.add(index, index + 1, *record)
                done += 1
                if done % 10 == 0:
                    log.info("inference: %d/%d images", done, len(found.images))
                continue
            results = predictor.predict(model, [item.data for item in good])
            for item, result in zip(good, results, strict=True):
                ref = found.images[item.index]
                height, width = result.ori_shape[:2]
                if not opts.no_draw:
                    drawn.append(os.path.join(output, ref.name))
                job = postprocess.make_job(item.index, ref.name, result.pred_instances, height, width, with_mask,
                                           threshold, ref.path, None if opts.no_draw else drawn[-1], in_box)
                for index, *record in post.submit(job):
                    in_order.add(index, index + 1, *record)
            done += len(good)
            if done % max(50, opts.batch_size) < len(good):
                log.info("inference: %d/%d images", done, len(found.images))
        if not stopped:
            for index, *record in post.drain():
                in_order.add(index, index + 1, *record)
        post.close()
        if where.distributed:
            stopped = _any_rank(stopped)
        if stopped:  # inside the `with`: the writer discards its part, nothing final is written
            raise Interrupted(f"stopped by {signals.name()} after {done} of {len(shard)} images; rerun the same "
                              "command to complete the predictions")
    log.info("inference done: %d images, %d detections (score >= %s), %d skipped%s",
             writer.num_images, writer.num_annotations, opts.score_threshold, len(skipped),
             f": {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}" if skipped else "")
    if where.distributed and storage.is_s3(opts.output):
        return _finish_distributed_s3(output, opts.output, where, categories, drawn, previous)
    if where.distributed:
        import torch.distributed as dist

        # A local --output: the parts meet in the same folder (one machine, or a shared filesystem).
        artifacts.write_json(os.path.join(output, f".drawn.rank{where.rank}.json"),
                             [os.path.relpath(p, output) for p in drawn])
        dist.barrier()  # every part is complete (closed and renamed)
        if not where.is_main:
            return
        predictions.merge_parts([os.path.join(output, f".{INSTANCES}.part{r}") for r in range(where.world_size)],
                                os.path.join(output, INSTANCES), categories)
        drawn = []
        for r in range(where.world_size):
            listing = os.path.join(output, f".drawn.rank{r}.json")
            with open(listing, encoding="utf-8") as fh:
                drawn += [os.path.join(output, name) for name in json.load(fh)]
            os.unlink(listing)
    _finish(output, opts.output, [*drawn, os.path.join(output, INSTANCES)], previous)


def _finish_distributed_s3(local, target, where, categories, drawn, previous):
    """Several processes, maybe on several machines with nothing shared but the bucket: each uploads its
    drawn images, its part of instances.json and a manifest of what it uploaded; rank 0 fetches the parts,
    merges them, and writes instances.json and done.json (every rank's files) last."""
    import torch.distributed as dist

    part = os.path.join(local, f".{INSTANCES}.part{where.rank}")
    manifest = os.path.join(local, f".manifest.rank{where.rank}.json")
    outbox = storage.Outbox(local, target)
    outbox.sync(drawn)
    artifacts.write_json(manifest, artifacts.done_marker(drawn, local))
    outbox.sync([part, manifest])
    dist.barrier()  # every rank's files are on S3
    if not where.is_main:
        return
    shared = [(storage.join(target, f".{INSTANCES}.part{r}"), storage.join(target, f".manifest.rank{r}.json"))
              for r in range(where.world_size)]
    parts = [part] + [storage.stage_file(uri) for uri, _ in shared[1:]]
    entries = []
    for r, (_, uri) in enumerate(shared):
        with open(manifest if r == 0 else storage.stage_file(uri), encoding="utf-8") as fh:
            entries += json.load(fh)["outputs"]
    instances = os.path.join(local, INSTANCES)
    predictions.merge_parts(parts, instances, categories)
    marker = os.path.join(local, DONE)
    done = artifacts.done_marker([instances], local)
    done["outputs"] = sorted(done["outputs"] + entries, key=lambda e: e["path"])
    artifacts.write_json(marker, done, indent=2)
    outbox.sync([instances])
    _remove_stale(target, previous, {e["path"] for e in done["outputs"]})
    outbox.sync([marker])  # last: its presence means every output is complete
    _close_rerun(target, local)
    for uris in shared:
        for uri in uris:
            storage.remove(uri)
    print(storage.join(target, INSTANCES))


def _any_rank(flag):
    """True on every rank when it is True on one (a signal may reach one process only); a collective, so
    it waits for every rank to finish its shard."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _listed(target, name):
    """The paths (relative to `target`) a done.json-like file in `target` lists; empty when there is none."""
    marker = storage.stage_optional(storage.join(target, name)) if storage.is_s3(target) else \
        os.path.join(target, name)
    if not marker or not os.path.isfile(marker):
        return set()
    try:
        with open(marker, encoding="utf-8") as fh:
            listed = [e.get("path") for e in json.load(fh).get("outputs", []) if isinstance(e, dict)]
    except (ValueError, AttributeError):
        return set()  # not ours to interpret; nothing is removed on its word
    # Only names inside the output folder: a planted done.json must not make us delete anything elsewhere.
    return {p for p in listed if isinstance(p, str) and names.name_problem(p, local=False) is None}


def _open_rerun(target, local):
    """Before a run writes into `target`: the outputs of the last complete run (its done.json, or the listing an
    interrupted rerun set aside) are set aside in PREVIOUS and done.json is removed, so a rerun that stops half-way
    leaves no done.json describing files it has partly replaced. Returns that listing (removed at the end when
    this run did not write them again)."""
    previous = _listed(target, DONE) | _listed(target, PREVIOUS)
    if not previous:
        return previous
    aside = os.path.join(local, PREVIOUS)
    artifacts.write_json(aside, {"outputs": [{"path": p} for p in sorted(previous)]})
    if storage.is_s3(target):
        storage.Outbox(local, target).sync([aside])
        storage.remove(storage.join(target, DONE))
    elif os.path.isfile(os.path.join(target, DONE)):
        os.unlink(os.path.join(target, DONE))
    return previous


def _close_rerun(target, local):
    """After this run's done.json is written: the set-aside listing is no longer needed."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(local, PREVIOUS))
    if storage.is_s3(target):
        storage.remove(storage.join(target, PREVIOUS))


def _remove_stale(target, previous, current):
    """Remove what the previous run into `target` wrote and this one did not (its done.json says what)."""
    stale = sorted(previous - current - {DONE})
    for name in stale:
        if storage.is_s3(target):
            storage.remove(storage.join(target, name))
        elif os.path.isfile(os.path.join(target, name)):
            os.unlink(os.path.join(target, name))
    if stale:
        log.info("removed %d output(s) of the previous run that this run did not write", len(stale))


def _finish(local, target, written, previous):
    """Done marker last, listing exactly this run's files; the previous run's other outputs are removed; for
    S3, upload this run's files, then the marker."""
    marker = os.path.join(local, DONE)
    done = artifacts.done_marker(written, local)
    artifacts.write_json(marker, done, indent=2)
    if storage.is_s3(target):
        outbox = storage.Outbox(local, target)
        outbox.sync(written)
        _remove_stale(target, previous, {e["path"] for e in done["outputs"]})
        outbox.sync([marker])
    else:
        _remove_stale(target, previous, {e["path"] for e in done["outputs"]})
    _close_rerun(target, local)
    print(storage.join(target, INSTANCES) if storage.is_s3(target) else os.path.join(target, INSTANCES))

