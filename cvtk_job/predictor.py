"""One way to load a trained model and to predict with it: `inference`, the benchmarks (bench/) and the tests
use this module, so what they measure is what the command does.

A batch only ever holds images of one size. MMDetection pads a mixed batch to its largest image, and
the padding changes the features near the image border (after the first BatchNorm the padded area is
no longer zero), so a detection would depend on which images it was batched with. Grouping by size
keeps predictions independent of `--batch_size` and wastes no compute on padding.

Tiled prediction (`Tiling`): an image is cut into overlapping tiles of one size, the tiles go through the
model `batch_size` at a time, and the detections are merged in image coordinates (`tiling`); an optional
whole-image pass, on the image scaled down to the model's input size, keeps the objects larger than a tile.
"""

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

from .errors import UserError


@dataclass
class Item:
    """One image after the worker: pipeline output, the original pixels (for drawing or tiling), or an error."""

    index: int
    data: Any = None
    original: Any = None
    error: Optional[str] = None


class ImageDataset:
    """Images by path → Items. `pipeline` None: no transform (tiled prediction transforms tile by tile)."""

    def __init__(self, refs, pipeline, keep_original):
        self.refs, self.pipeline, self.keep_original = refs, pipeline, keep_original

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, index):
        import cv2

        path = self.refs[index].path
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            reason = "file not found" if not os.path.exists(path) else "not a readable image"
            return Item(index, error=reason)
        if self.pipeline is None:
            return Item(index, None, image)
        try:
            data = self.pipeline(dict(img=image, img_id=index, img_path=path))
        except Exception as err:  # noqa: BLE001 - a broken image is reported and skipped, not fatal
            return Item(index, error=f"{type(err).__name__}: {err}")
        return Item(index, data, image if self.keep_original else None)


def same_size_batches(items, batch_size, max_pending):
    """Group a stream of items into batches of equal input size, holding at most max_pending items."""
    pending = {}
    held = 0
    for item in items:
        if item.error or item.data is None:
            yield [item]
            continue
        key = tuple(item.data["inputs"].shape)
        bucket = pending.setdefault(key, [])
        bucket.append(item)
        held += 1
        if len(bucket) == batch_size:
            held -= len(pending.pop(key))
            yield bucket
        elif held > max_pending:  # many sizes at once: run the fullest bucket rather than hold more
            key = max(pending, key=lambda k: len(pending[k]))
            held -= len(pending[key])
            yield pending.pop(key)
    yield from pending.values()


def pipeline(cfg):
    """The config's test pipeline, fed with decoded images (arrays) instead of file names."""
    from mmcv.transforms import Compose

    steps = cfg.get("test_pipeline") or cfg.test_dataloader.dataset.pipeline
    steps = [dict(s) for s in steps if s["type"] not in ("LoadImageFromFile", "LoadAnnotations")]
    return Compose([dict(type="mmdet.LoadImageFromNDArray"), *steps])


def input_size(cfg):
    """(W, H) the test pipeline resizes images to fit (mmdet's Resize with keep_ratio), or None."""
    steps = cfg.get("test_pipeline") or cfg.test_dataloader.dataset.pipeline
    for step in steps:
        if step.get("type") in ("Resize", "mmdet.Resize") and step.get("scale"):
            scale = tuple(step["scale"])
            return (max(scale), min(scale)) if step.get("keep_ratio", True) else scale
    return None


def load_model(cfg, weights, device, score_threshold=None, where="the weights"):
    """The model of `cfg` with every tensor from `weights` (a checkpoint loaded as data), in eval mode on
    `device`. Strict: tensors that do not fit the config are one line naming `where`."""
    from . import mmconfig

    with contextlib.redirect_stdout(sys.stderr):  # mmengine/mmdet print to stdout
        if score_threshold is not None:
            mmconfig.raise_score_threshold(cfg.model, score_threshold)
        from mmengine.registry import init_default_scope

        init_default_scope("mmdet")
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        # As mmdet's init_detector: no training settings (assigners, samplers) for a model that only predicts;
        # a cvtk-job config names cvtk-job's assigner there, which this process need not import.
        cfg.model.train_cfg = None
        model = MODELS.build(cfg.model)
        try:
            model.load_state_dict(weights["state_dict"])
        except RuntimeError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise UserError(f"{where}: its tensors do not fit the model of its config ({detail[:200]}); "
                            "pass the config it was trained with (--model_config)") from None
        model.to(device).eval()
    return model


def masks_pasted_in_boxes(model):
    """Whether every mask this model predicts on the CPU is zero outside its box widened by a pixel.

    True for mmdet's two-stage heads as they are (StandardRoIHead's predict_mask, FCNMaskHead's pasting with
    binary masks): on the CPU `_do_paste_mask` writes each mask only into floor(x1)-1 .. ceil(x2)+1 of its
    own box, into zeros (tests/unit/test_postprocess.py checks this on pasted masks). Any other head (SOLO,
    Mask2Former, PointRend, a user's) may place pixels anywhere, and the post-processing then proves each
    crop whole by counting its whole mask (predictions.mask_crops)."""
    from mmdet.models.roi_heads import StandardRoIHead
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead

    roi_head = getattr(model, "roi_head", None)
    mask_head = getattr(roi_head, "mask_head", None)
    if not isinstance(roi_head, StandardRoIHead) or not isinstance(mask_head, FCNMaskHead):
        return False
    threshold = (getattr(roi_head, "test_cfg", None) or {}).get("mask_thr_binary")
    return (type(roi_head).predict_mask is StandardRoIHead.predict_mask
            and type(mask_head).predict_by_feat is FCNMaskHead.predict_by_feat
            and type(mask_head)._predict_by_feat_single is FCNMaskHead._predict_by_feat_single
            and threshold is not None and threshold >= 0)


def predict(model, datas):
    """Pipeline outputs of images of one size → the model's DetDataSamples (under no_grad)."""
    import torch
    from mmengine.dataset import pseudo_collate

    with torch.no_grad():
        return model.test_step(pseudo_collate(list(datas)))


@dataclass(frozen=True)
class Tiling:
    """How images are cut: tiles of `width` x `height` pixels overlapping by `overlap` of a tile, and whether
    the whole image (scaled down to the model's input) also goes through the model."""

    width: int
    height: int
    overlap: float = 0.2
    full_image: bool = True


def predict_tiled(model, transform, image, tiling_, batch_size, score_threshold, with_mask, full_size=None):
    """One image → merged `tiling.Piece`s in image coordinates, best first. `image`: a decoded array (H, W, 3)
    or a `raster` source, read a band of rows (one row of tiles) at a time.

    Tiles are cut from the band and transformed `batch_size` at a time, so memory holds at most two bands (a
    batch may end one row of tiles and start the next), one batch of tiles and the detections.
    `full_size`: (W, H) the whole-image pass is scaled down to fit."""
    from . import raster, tiling

    source = image if hasattr(image, "rows") else raster.Decoded(image)
    height, width = source.height, source.width
    found, bands = [], {}

    def pixels(x0, y0, x1, y1):
        if (y0, y1) not in bands:
            if len(bands) == 2:
                bands.pop(next(iter(bands)))
            bands[y0, y1] = source.rows(y0, y1)
        return bands[y0, y1][:, x0:x1]

    tiles = tiling.grid(width, height, tiling_.width, tiling_.height, tiling_.overlap)
    if tiling_.full_image and len(tiles) > 1:  # first (the merge takes the pieces by score, not by order)
        small, scale = _fit(source, full_size or (tiling_.width, tiling_.height))
        result = predict(model, [transform(dict(img=small, img_id=0, img_path=""))])[0]
        found += tiling.pieces(result.pred_instances, 0, 0, (0, 0, width, height), score_threshold, with_mask,
                               scale=scale)
        del small
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        datas = [transform(dict(img=pixels(*tile), img_id=0, img_path="")) for tile in chunk]
        for (x0, y0, x1, y1), result in zip(chunk, predict(model, datas), strict=True):
            found += tiling.pieces(result.pred_instances, x0, y0, (x0, y0, x1, y1), score_threshold, with_mask)
    return tiling.merge(found)


def _fit(source, size):
    """The image scaled down (never up) to fit `size` (W, H) (`raster.shrink`), and the image pixels per scaled
    pixel."""
    from . import raster

    factor = min(size[0] / source.width, size[1] / source.height, 1.0)
    if factor >= 1.0:
        return raster.whole(source), 1.0
    w, h = max(1, int(math.floor(source.width * factor))), max(1, int(math.floor(source.height * factor)))
    return raster.shrink(source, w, h), source.width / w
