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
    for flag, path in (("--gt", opts.gt), ("--pred", opts.pred)):
        if not storage.is_s3(path) and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: file not found")
    report = coco.validate_coco(storage.stage_file(opts.gt), check_images=False, name=opts.gt)
    if report.errors:
        raise DatasetError([str(p) for p in report.errors])
    gt = report.data
    pred = metrics.check_predictions(coco.read_json(storage.stage_file(opts.pred)), opts.pred, opts.iou_type)
    stats = metrics.coco_stats(gt, pred, opts.iou_type, pred_name=opts.pred)
    if storage.is_s3(opts.output):
        local = storage.staging_path(opts.output)
        artifacts.write_json(local, stats, indent=4)
        storage.Outbox(os.path.dirname(local), opts.output.rsplit("/", 1)[0]).sync([local])
    else:
        artifacts.write_json(opts.output, stats, indent=4)
    log.info("%s = %.4f", metrics.STAT_KEYS[0], stats["stats"][metrics.STAT_KEYS[0]])
    print(opts.output)
