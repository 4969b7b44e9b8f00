"""Inference post-processing (masks to RLE, drawing, image encoding) off the model's critical path.

The main process only cuts what the model gave into a `Job` (the kept boxes, scores, labels and the masks
cropped to their boxes: a few KB per object, cut on the GPU when the model runs there) and goes back to the
model; worker processes turn jobs into detection records and drawn images. Results come back in the order the
jobs were given (`InputOrder` then restores the input order across same-size batches), and a worker's record
is byte for byte what the main process would have made (`predictions.crop_detections`).

`--num_workers 0` runs the same code in the main process (`Inline`): one path, two places to run it.

Tiled inference (`TiledJob`) hands over the merged pieces of one large image: the worker encodes their RLE and
draws the image, which it reads again (band by band for a TIFF), while the main process cuts the next image.
"""

import collections
import logging
from dataclasses import dataclass
from typing import Any, Optional

from . import predictions

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One image's predictions, as plain arrays: what crosses to a worker."""

    index: int
    name: str
    width: int
    height: int
    boxes: Any  # (N, 4) x1 y1 x2 y2, clipped to the image
    scores: Any
    labels: Any
    crops: Optional[predictions.Crops]  # predictions.mask_crops; None for a box-only model
    image_path: Optional[str] = None  # read again by the worker for drawing (nothing big is sent)
    drawn_path: Optional[str] = None  # where the drawn image goes; None: not drawn


def make_job(index, name, pred, height, width, with_mask, threshold, image_path=None, drawn_path=None,
             in_box=False):
    """The main process's share: the detections that pass the threshold, moved to the host, masks cropped
    (`in_box`: predictor.masks_pasted_in_boxes of the model)."""
    keep, boxes, scores, labels = predictions.kept(pred, height, width, threshold)
    crops = predictions.mask_crops(pred["masks"], keep, boxes, height, width, in_box) \
        if with_mask and "masks" in pred else None
    return Job(index, name, int(width), int(height), boxes, scores, labels, crops, image_path, drawn_path)


@dataclass
class TiledJob:
    """One tiled image's merged detections (tiling.Piece: box, score, label, mask crop): what crosses to a worker."""

    index: int
    name: str
    width: int
    height: int
    pieces: list
    with_mask: bool
    image_path: Optional[str] = None  # read again by the worker for drawing
    drawn_path: Optional[str] = None  # where the drawn image goes; None: not drawn


_class_names = None  # set once per worker by `_init`


def _init(class_names):
    import gc

    from . import signals

    global _class_names
    _class_names = class_names
    signals.detach_loader_worker()  # the main process decides when to stop (a group signal is for it)
    # Forked during the main process's start-up, with the collector paused: what it inherited stays frozen (a
    # collection would write to every inherited object's header, copying its pages), what it makes is collected.
    gc.freeze()
    gc.enable()


def finish(job, class_names=None):
    """A Job → (index, name, width, height, detections), the drawn image written when asked for."""
    if isinstance(job, TiledJob):
        return _finish_tiled(job, class_names or _class_names)
    dets = predictions.crop_detections(job.boxes, job.scores, job.labels, job.crops, job.height, job.width)
    if job.drawn_path:
        import cv2

        from . import drawing

        image = cv2.imread(job.image_path, cv2.IMREAD_COLOR)  # as predictor.ImageDataset read it
        if image is None:
            from .errors import UserError

            raise UserError(f"{job.image_path}: could not be read again to draw the predictions (changed or "
                            "removed while inference ran?); rerun, or use --no_draw")
        drawing.write_image(job.drawn_path, drawing.draw(image, dets, class_names or _class_names,
                                                         crops=job.crops))
    return job.index, job.name, job.width, job.height, dets


def _finish_tiled(job, class_names):
    from . import drawing, raster, tiling
    from .errors import UserError

    dets = [tiling.detection(p, job.height, job.width) for p in job.pieces]
    if job.drawn_path:
        crops = [(p.mask, p.mx0, p.my0) for p in job.pieces] if job.with_mask else None
        try:
            source = raster.open_image(job.image_path)
        except raster.ImageError as err:
            raise UserError(f"{job.image_path}: could not be read again to draw the predictions ({err}; changed or "
                            "removed while inference ran?); rerun, or use --no_draw") from None
        try:
            image, shown, crops, factor = drawing.fit(source, dets, crops, drawing.MAX_PIXELS)
            if factor < 1:
                log.info("inference: %s drawn at %dx%d (%.3g of %dx%d; instances.json is full size)", job.name,
                         image.shape[1], image.shape[0], factor, job.width, job.height)
            drawing.write_image(job.drawn_path, drawing.draw(image, shown, class_names, crops=crops))
        finally:
            source.close()
    return job.index, job.name, job.width, job.height, dets


class Inline:
    """Post-processing in the main process (`--num_workers 0`)."""

    def __init__(self, class_names):
        self.class_names = class_names

    def submit(self, job):
        """Yields the results that are ready (here: this job's)."""
        yield finish(job, self.class_names)

    def drain(self):
        return iter(())

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Workers(Inline):
    """Post-processing in `n` worker processes, at most `ahead` jobs in flight (memory stays bounded when the
    model is faster than the workers: it then waits for the oldest job)."""

    def __init__(self, n, class_names, ahead=None):
        import concurrent.futures
        import multiprocessing

        super().__init__(class_names)
        self.ahead = ahead or 2 * n
        # fork, as torch's DataLoader workers: the workers need nothing but this module, and spawn would
        # import the job's __main__ again (`python -m cvtk_job` runs the command at import).
        self._pool = concurrent.futures.ProcessPoolExecutor(n, multiprocessing.get_context("fork"),
                                                            initializer=_init, initargs=(class_names,))
        self._pending = collections.deque()
        self._pool.submit(int).result()  # start the workers now: forked before the model fills this process

    def submit(self, job):
        self._pending.append(self._pool.submit(finish, job))
        while self._pending and (len(self._pending) > self.ahead or self._pending[0].done()):
            yield self._pending.popleft().result()

    def drain(self):
        while self._pending:
            yield self._pending.popleft().result()

    def close(self):
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
