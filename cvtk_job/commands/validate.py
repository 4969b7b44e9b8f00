"""`cvtk-job validate`: check label file and COCO files before any GPU time is spent."""

import gc
import logging
import sys

from .. import coco
from ..errors import DatasetError, UserError

log = logging.getLogger(__name__)


def dataset_files(opts):
    """(role, path) of every COCO file named on the command line, in a stable order."""
    named = [("train", opts.train), ("valid", opts.valid), ("test", opts.test)]
    return [(role, path) for role, path in named if path] + [("file", p) for p in getattr(opts, "files", [])]


def check(files, labels=None, task=None, names=None):
    """Validate every file; print warnings; raise DatasetError listing every error line.

    `names` maps a staged local path to the name the user gave (an s3:// URI), for the messages.
    """
    names = names or {}
    reports = [coco.validate_coco(path, labels=labels, task=task, name=names.get(path),
                                  local=not names.get(path, "").startswith("s3://")) for _, path in files]
    for report in reports:
        for warning in report.warnings:
            log.warning("%s", warning)
    errors = [str(p) for r in reports for p in r.errors]
    if errors:
        raise DatasetError(errors)
    return reports


def run(opts):
    # A validation allocates the parsed files (20M objects for 1M polygons) and no cycles; the collector
    # would only scan them over and over (3.7 s at that size). The process ends when it is done.
    gc.disable()
    files = dataset_files(opts)
    if not files:
        raise UserError("nothing to validate; pass --train/--valid/--test or COCO JSON files")
    labels = coco.load_labels(opts.label) if opts.label else None
    reports = check(files, labels=labels, task=opts.task)
    for (role, path), report in zip(files, reports, strict=True):
        data = report.data
        print(f"ok\t{role}\t{path}\timages={len(data['images'])}\tannotations={len(data['annotations'])}"
              f"\twarnings={len(report.warnings)}", file=sys.stdout)
