"""Model outputs → COCO detections, and `instances.json` written as a stream.

Shared by the test step of `train` and by `inference`, so both describe a detection the same way:
`bbox` [x, y, w, h] clipped to the image, `score`, compressed-RLE `segmentation` (segm), `area`.
"""

import heapq
import json
import math
import os
import shutil
import tempfile

import numpy as np

from .artifacts import atomic_path


def kept_masks(pred, keep):
    """The kept masks as uint8 (H, W, N) in Fortran order (what pycocotools encodes), without a CPU copy.

    Transposed and converted where the masks are (on the GPU when inference runs there), so the host
    only receives the bytes in the order pycocotools reads them; `masks[..., i]` is detection i's mask.
    """
    import torch

    selected = pred["masks"][torch.as_tensor(keep, device=pred["masks"].device, dtype=torch.long)]
    return selected.permute(0, 2, 1).to(torch.uint8).contiguous().cpu().numpy().transpose(2, 1, 0)


def passing(pred, score_threshold):
    """Indices of the detections at or above the threshold: one number, or an array with one per class
    (`inference --score_threshold auto`)."""
    scores = pred["scores"].cpu().numpy()
    if np.ndim(score_threshold):
        return np.flatnonzero(scores >= np.asarray(score_threshold)[pred["labels"].cpu().numpy()])
    return np.flatnonzero(scores >= score_threshold)


def kept(pred, height, width, score_threshold=0.0):
    """(indices, boxes x1 y1 x2 y2 clipped to the image, scores, labels) of the detections that pass the threshold,
    on the host, best first as the model gave them."""
    keep = passing(pred, score_threshold)
    boxes = pred["bboxes"].cpu().numpy()[keep]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return keep, boxes, pred["scores"].cpu().numpy()[keep], pred["labels"].cpu().numpy()[keep]


def _records(boxes, scores, labels, rle=None):
    """[{label, score, bbox, area[, segmentation]}]; `rle(i, x1, x2)` → (COCO RLE, area) of detection i's mask."""
    found = []
    for i, score in enumerate(scores):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        det = {"label": int(labels[i]), "score": float(score), "bbox": [x1, y1, x2 - x1, y2 - y1],
               "area": (x2 - x1) * (y2 - y1)}
        if rle is not None:
            encoded, area = rle(i, x1, x2)
            det["area"] = float(area)
            det["segmentation"] = {"size": [int(s) for s in encoded["size"]],
                                   "counts": encoded["counts"].decode("ascii")}
        found.append(det)
    return found


def detections(pred, height, width, with_mask=True, score_threshold=0.0, masks=None):
    """DetDataSample.pred_instances → [{label, score, bbox, area[, segmentation]}], best first.

    `masks`: the kept masks from `kept_masks`, when the caller needs them too (drawing).
    """
    from pycocotools import mask as mask_utils

    keep, boxes, scores, labels = kept(pred, height, width, score_threshold)
    if with_mask and "masks" in pred and len(keep) and masks is None:
        masks = kept_masks(pred, keep)
    rle = None
    if with_mask and "masks" in pred and len(keep):
        def rle(i, x1, x2):
            return _encode_in_box(masks[:, :, i], x1, x2, mask_utils)
    return _records(boxes, scores, labels, rle)


def _span(a, b, size):
    """The pixel columns (or rows) [start, stop) of a box edge a..b, with a pixel of margin, inside the image."""
    return max(0, math.floor(a) - 1), min(size, math.ceil(b) + 1)


class Crops:
    """The kept masks cut to their boxes, packed in one flat bool buffer: `crops[i]` is (crop, x0, y0), a view.

    Packed because this is what crosses to a post-processing worker: one buffer and one small table pickle in
    ~0.1 ms, where 100 separate arrays took ~1.5 ms of the main process per image (bench/, postprocess row).
    """

    __slots__ = ("flat", "table")

    def __init__(self, flat, table):
        self.flat = flat  # bool, every crop row-major, one after the other
        self.table = table  # int64 (N, 5): start in flat, height, width, x0, y0

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        start, h, w, x0, y0 = self.table[i].tolist()
        return self.flat[start:start + h * w].reshape(h, w), x0, y0

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getstate__(self):
        return self.flat, self.table

    def __setstate__(self, state):
        self.flat, self.table = state

    @classmethod
    def pack(cls, crops):
        """[(crop, x0, y0)] → Crops (one copy of each crop into the buffer)."""
        sizes = [c.size for c, _, _ in crops]
        starts = np.cumsum([0] + sizes)
        flat = np.empty(int(starts[-1]), bool)
        for (crop, _, _), start, size in zip(crops, starts.tolist(), sizes, strict=False):
            flat[start:start + size].reshape(crop.shape)[...] = crop
        table = np.array([(start, c.shape[0], c.shape[1], x0, y0) for (c, x0, y0), start in zip(crops, starts.tolist(),
                                                                                            strict=False)],
                         np.int64).reshape(-1, 5)
        return cls(flat, table)


def mask_crops(masks, keep, boxes, height, width, in_box=False):
    """The kept masks as Crops, each crop holding every pixel of its mask: the mask's box with a pixel of
    margin (a Mask R-CNN mask lies in its box), or the whole mask when it has pixels outside.

    `in_box`: the model is known to paste each mask inside that span (predictor.masks_pasted_in_boxes), so
    host masks are not counted whole to prove it: that scan (the whole (N, H, W) array, 107 MB for 100 masks
    of a 1333x800 image) was most of the main process's share. On the GPU the proof costs one small transfer
    and is always made.

    What crosses to a post-processing worker: the boxes' pixels (a few KB per object), not an (H, W) array per
    detection (100 masks of a 1333x800 image are 107 MB). Cut where the masks are, with one transfer to the
    host for all crops and one for the mask sizes that prove a crop whole.
    """

    if not len(keep):
        return Crops.pack([])
    spans = []
    for x1, y1, x2, y2 in boxes.tolist():
        (left, right), (top, bottom) = _span(x1, x2, width), _span(y1, y2, height)
        spans.append((left, top, max(left, right), max(top, bottom)))
    if masks.device.type == "cpu":
        return _host_crops(masks.numpy(), keep, spans, in_box)
    return _device_crops(masks, keep, spans)


def _host_crops(whole, keep, spans, in_box=False):
    """Views of the model's array (torch's reductions over bool on the CPU were 20x slower than numpy's)."""
    crops = []
    for k, (left, top, right, bottom) in zip(np.asarray(keep).tolist(), spans, strict=True):
        crop = whole[k, top:bottom, left:right]
        inside = in_box or np.count_nonzero(crop) == np.count_nonzero(whole[k])
        crops.append((crop, left, top) if inside else (whole[k], 0, 0))
    return Crops.pack(crops)


def _device_crops(masks, keep, spans):
    """Cut on the GPU: one transfer to the host for every crop, one for the mask sizes that prove them whole.
    The buffer that arrives is already the packed layout; only a crop with pixels outside its box is redone."""
    import torch

    selected = masks[torch.as_tensor(keep, device=masks.device, dtype=torch.long)]
    totals = torch.count_nonzero(selected.flatten(1), dim=1).cpu().numpy()
    pieces = [selected[i, top:bottom, left:right].reshape(-1) for i, (left, top, right, bottom) in enumerate(spans)]
    flat = torch.cat(pieces).cpu().numpy().astype(bool, copy=False)
    sizes = [(bottom - top) * (right - left) for left, top, right, bottom in spans]
    starts = np.cumsum([0] + sizes)[:-1]
    table = np.array([(start, bottom - top, right - left, left, top)
                      for start, (left, top, right, bottom) in zip(starts.tolist(), spans, strict=True)],
                     np.int64).reshape(-1, 5)
    packed = Crops(flat, table)
    counts = [np.count_nonzero(flat[start:start + size]) for start, size in zip(starts.tolist(), sizes, strict=True)]
    whole = np.flatnonzero(np.asarray(counts, np.int64) != totals)
    if not len(whole):
        return packed
    crops = list(packed)
    for i in whole.tolist():
        crops[i] = (selected[i].cpu().numpy().astype(bool, copy=False), 0, 0)
    return Crops.pack(crops)


def crop_detections(boxes, scores, labels, crops, height, width):
    """What `detections` gives, from the boxes and the `mask_crops` of the kept detections (None: boxes only):
    the same records, byte for byte, where the masks are no longer at hand."""
    from pycocotools import mask as mask_utils

    if crops is None or not len(scores):
        return _records(boxes, scores, labels)

    def rle(i, x1, x2):
        crop, x0, y0 = crops[i]
        left, right = _span(x1, x2, width)
        if right <= left or (crop.shape == (height, width) and (x0, y0) == (0, 0)):
            # a whole mask, or an empty one in a box of no width: encoded whole, as `detections` does
            whole = np.zeros((height, width), np.uint8, order="F")
            whole[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
            return _encode_in_box(whole, x1, x2, mask_utils)
        # The crop spans exactly the columns `_encode_in_box` reads; rows outside it are zeros.
        band = np.zeros((height, right - left), np.uint8, order="F")
        band[y0:y0 + crop.shape[0]] = crop
        flat = band.ravel(order="F")
        return _band_rle(flat, left, right, height, width, mask_utils), int(np.count_nonzero(flat))
    return _records(boxes, scores, labels, rle)


def coco_results(gt, results):
    """[(image_id, detections)] of a test set → COCO JSON with the ground truth's image and category ids (what
    train writes as test_outputs.coco.json, whether the test step ran on whole images or on tiles)."""
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    annotations = []
    for image_id, detections in sorted(results, key=lambda r: r[0]):
        for det in detections:
            ann = {"id": len(annotations) + 1, "image_id": image_id,
                   "category_id": categories[det.pop("label")]["id"], "iscrowd": 0}
            ann.update(det)
            annotations.append(ann)
    images = [{k: img[k] for k in ("id", "file_name", "width", "height")} for img in gt["images"]]
    return {"images": images, "categories": categories, "annotations": annotations}


def _encode_in_box(mask, x1, x2, mask_utils):
    """COCO RLE of one (H, W) Fortran-ordered mask, reading only the columns of its box.

    COCO RLE runs down columns, so the columns left and right of the box are one run of zeros each:
    encoding the box's columns and widening the first and last zero runs gives the exact RLE of the
    whole mask, in a fraction of the time (pycocotools' encode of 100 full masks was half the time of
    post-processing an image). A mask with pixels outside its columns is encoded whole.
    """
    height, width = mask.shape
    left, right = _span(x1, x2, width)
    flat = mask[:, left:right].ravel(order="F")
    area = int(np.count_nonzero(flat))
    if right <= left or area != np.count_nonzero(mask):
        rle = mask_utils.encode(np.asfortranarray(mask[:, :, None]))[0]
        return rle, int(mask_utils.area(rle))
    return _band_rle(flat, left, right, height, width, mask_utils), area


def _band_rle(flat, left, right, height, width, mask_utils):
    """COCO RLE of a mask whose pixels all lie in columns [left, right); `flat`: those columns, column-major."""
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    if flat[0]:
        counts.insert(0, 0)  # COCO RLE starts with a run of zeros, possibly empty
    counts[0] += left * height
    after = (width - right) * height
    if len(counts) % 2:  # ends with zeros: widen that run
        counts[-1] += after
    elif after:
        counts.append(after)
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


class InstancesWriter:
    """Writes a COCO file image by image: memory stays flat however many images there are.

    Images and annotations are appended to two temporary files; `close` joins them into the final
    file under a temporary name and renames it, so a reader never sees half a file.
    """

    def __init__(self, path, categories):
        self.path, self.categories = path, categories
        self._dir = tempfile.mkdtemp(prefix=".instances.", dir=os.path.dirname(os.path.abspath(path)))
        self._images = open(os.path.join(self._dir, "images"), "w", encoding="utf-8")
        self._annotations = open(os.path.join(self._dir, "annotations"), "w", encoding="utf-8")
        self.num_images = self.num_annotations = 0

    @staticmethod
    def _append(fh, count, record):
        fh.write(("," if count else "") + json.dumps(record, ensure_ascii=False, allow_nan=False))

    def add(self, image_id, file_name, width, height, found):
        """Record one image and its detections; category ids come from `categories` by label index."""
        self.num_images += 1
        self._append(self._images, self.num_images - 1,
                     {"id": image_id, "file_name": file_name, "width": width, "height": height})
        for det in found:
            det = dict(det)
            ann = {"id": self.num_annotations + 1, "image_id": image_id,
                   "category_id": self.categories[det.pop("label")]["id"], "iscrowd": 0, **det}
            self._append(self._annotations, self.num_annotations, ann)
            self.num_annotations += 1
        return image_id

    def add_coco(self, image, annotations):
        """Append an image record and its annotations as they are (annotation ids renumbered)."""
        self.num_images += 1
        self._append(self._images, self.num_images - 1, image)
        for ann in annotations:
            self._append(self._annotations, self.num_annotations, dict(ann, id=self.num_annotations + 1))
            self.num_annotations += 1

    def close(self):
        self._images.close()
        self._annotations.close()
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            out.write('{"images": [')
            with open(self._images.name, encoding="utf-8") as fh:
                shutil.copyfileobj(fh, out)
            out.write('], "categories": ' + json.dumps(self.categories, ensure_ascii=False))
            out.write(', "annotations": [')
            with open(self._annotations.name, encoding="utf-8") as fh:
                shutil.copyfileobj(fh, out)
            out.write("]}\n")
        shutil.rmtree(self._dir, ignore_errors=True)

    def abort(self):
        self._images.close()
        self._annotations.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.abort()


class PartWriter:
    """One process's share of a distributed inference: a line per image (its record and detections).

    Each process writes its images in input order, so `merge_parts` joins the parts with a streaming
    k-way merge: rank 0 holds one line per part in memory, however many images there are.
    """

    def __init__(self, path, categories):
        self.path, self.categories = path, categories
        self._fh = open(path + ".tmp", "w", encoding="utf-8")
        self.num_images = self.num_annotations = 0

    def add(self, image_id, file_name, width, height, found):
        annotations = []
        for det in found:
            det = dict(det)
            annotations.append({"image_id": image_id, "category_id": self.categories[det.pop("label")]["id"],
                                "iscrowd": 0, **det})
        image = {"id": image_id, "file_name": file_name, "width": width, "height": height}
        self._fh.write(json.dumps({"image": image, "annotations": annotations}, ensure_ascii=False,
                                  allow_nan=False) + "\n")
        self.num_images += 1
        self.num_annotations += len(annotations)
        return image_id

    def close(self):
        self._fh.close()
        os.replace(self._fh.name, self.path)

    def abort(self):
        self._fh.close()
        os.unlink(self._fh.name)

    __enter__, __exit__ = InstancesWriter.__enter__, InstancesWriter.__exit__


class InputOrder:
    """Passes images to a writer in input order, although batching by image size reorders them a little.

    `positions` are this process's input positions, in order; each must be either added or skipped.
    Memory: only the images that arrived ahead of an earlier one (at most the batching window).
    """

    def __init__(self, writer, positions):
        self.writer = writer
        self._order = iter(positions)
        self._next = next(self._order, None)
        self._held = {}

    def add(self, position, *record):
        self._held[position] = record
        self._flush()

    def skip(self, position):
        self._held[position] = None
        self._flush()

    def _flush(self):
        while self._next in self._held:
            record = self._held.pop(self._next)
            if record is not None:
                self.writer.add(*record)
            self._next = next(self._order, None)


def _part_lines(path):
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def merge_parts(parts, path, categories):
    """Join the per-process parts of a distributed run into one file, images in input order."""
    merged = heapq.merge(*(_part_lines(part) for part in parts), key=lambda entry: entry["image"]["id"])
    with InstancesWriter(path, categories) as writer:
        for entry in merged:
            writer.add_coco(entry["image"], entry["annotations"])
    for part in parts:
        os.unlink(part)
