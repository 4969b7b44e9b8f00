"""`cvtk-job evaluate`: the test step's metrics for any predictions file (same code as `train`)."""

import logging
import os

from .. import artifacts, coco, metrics, storage
from ..errors import DatasetError, UserError

log = logging.getLogger(__name__)


def run(opts):
    if not storage.is_s3(opts.output) and os.path.isdir(opts.output):
        raise UserError(f"--output {opts.output}: is a folder; name the stats file, e.g. "
                        f"{os.path.join(opts.output, 'test_stats.json')}")
    if opts.report and not storage.is_s3(opts.report) and os.path.isdir(opts.report):
        raise UserError(f"--report {opts.report}: is a folder; name the page, e.g. "
                        f"{os.path.join(opts.report, 'report.html')}")
    for flag, path in (("--gt", opts.gt), ("--pred", opts.pred)):
        if not storage.is_s3(path) and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: file not found")
    report = coco.validate_coco(storage.stage_file(opts.gt), check_images=False, name=opts.gt)
    if report.errors:
        raise DatasetError([str(p) for p in report.errors])
    gt = report.data
    pred = metrics.check_predictions(coco.read_json(storage.stage_file(opts.pred)), opts.pred, opts.iou_type)
    stats = metrics.coco_stats(gt, pred, opts.iou_type, pred_name=opts.pred)
    outputs = [(opts.output, lambda path: artifacts.write_json(path, stats, indent=4))]
    if opts.report:
        outputs.append((opts.report, lambda path: _report(opts, gt, pred, stats, path)))
    for uri, write in outputs:
        if storage.is_s3(uri):
            local = storage.staging_path(uri)
            write(local)
            storage.Outbox(os.path.dirname(local), uri.rsplit("/", 1)[0]).sync([local])
        else:
            write(uri)
    log.info("%s = %.4f", metrics.STAT_KEYS[0], stats["stats"][metrics.STAT_KEYS[0]])
    print(opts.output)
    if opts.report:
        print(opts.report)


def _report(opts, gt, pred, stats, path):
    from .. import report

    detections = metrics.matched_predictions(gt, pred, opts.pred)
    task = "segm" if opts.iou_type == "segm" else "det"
    # The gallery draws the test images: only where they lie beside a local ground-truth file.
    gallery = None if storage.is_s3(opts.gt) else report.gallery(gt, detections, os.path.dirname(opts.gt), stats,
                                                                  task)
    summary = {"run": os.path.splitext(os.path.basename(opts.pred))[0], "ground truth": opts.gt,
               "predictions": opts.pred, "images": len(gt["images"]),
               "objects": sum(not a.get("iscrowd") for a in gt["annotations"]), "detections": len(detections),
               "evaluated": "masks" if opts.iou_type == "segm" else "boxes"}
    report.write(path, summary, [], [], stats, gallery)
