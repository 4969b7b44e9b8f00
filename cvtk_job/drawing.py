"""Drawn predictions: filled translucent masks, boxes, "label score"; one fixed colour per class."""

import colorsys
import math

import numpy as np

MASK_ALPHA = 0.45
# Larger images are drawn scaled down to this many pixels (a 6000x6000 photo is drawn full size): a drawn copy of
# a 16000x16000 mosaic would take another 768 MB, and nobody looks at one at full size.
MAX_PIXELS = 6000 * 6000


def class_color(index):
    """BGR colour of a class, the same in every image and run (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.8, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def draw(image, found, class_names, masks=None, crops=None):
    """image: BGR uint8 (H, W, 3); found: detections (bbox xywh, score, label); masks: (H, W, N), nonzero inside;
    or crops: one (bool mask crop, x0, y0) per detection (tiled prediction: no full-image mask exists).

    A mask is blended only inside its box (plus a pixel of margin) when it lies there, as Mask R-CNN's
    masks do: blending the box rather than the whole image made drawing ~5x faster with 100 detections.
    """
    import cv2

    out = image.copy()
    height, width = out.shape[:2]
    line = max(2, min(width, height) // 200)
    font_scale = max(0.4, min(width, height) / 1000)
    if masks is not None:
        if masks.shape[-1] != len(found):
            raise ValueError(f"{masks.shape[-1]} masks for {len(found)} detections")
        for i, det in enumerate(found):
            color = np.array(class_color(det["label"]), dtype=np.float32)
            x, y, w, h = det["bbox"]
            x1, y1 = max(0, int(math.floor(x)) - 1), max(0, int(math.floor(y)) - 1)
            x2, y2 = min(width, int(math.ceil(x + w)) + 1), min(height, int(math.ceil(y + h)) + 1)
            crop, inside = out[y1:y2, x1:x2], masks[y1:y2, x1:x2, i].astype(bool)
            if np.count_nonzero(inside) != np.count_nonzero(masks[:, :, i]):  # not a Mask R-CNN mask: all of it
                crop, inside = out, masks[:, :, i].astype(bool)
            crop[inside] = (crop[inside] * (1 - MASK_ALPHA) + color * MASK_ALPHA).astype(np.uint8)
    for det, (crop_mask, x0, y0) in zip(found, crops or [], strict=bool(crops)):
        color = np.array(class_color(det["label"]), dtype=np.float32)
        h, w = crop_mask.shape
        x1, y1 = min(width, x0 + w), min(height, y0 + h)
        region, inside = out[y0:y1, x0:x1], crop_mask[:y1 - y0, :x1 - x0]
        region[inside] = (region[inside] * (1 - MASK_ALPHA) + color * MASK_ALPHA).astype(np.uint8)
    for det in found:
        color = class_color(det["label"])
        x, y, w, h = det["bbox"]
        p1, p2 = (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h)))
        cv2.rectangle(out, p1, p2, color, line)
        text = f"{class_names[det['label']]} {det['score']:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = max(0, p1[1] - th - base - 2)
        cv2.rectangle(out, (p1[0], top), (p1[0] + tw + 4, top + th + base + 2), color, -1)
        cv2.putText(out, text, (p1[0] + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return out


def fit(image, found, crops, max_pixels):
    """(image, detections, mask crops, factor) scaled down so that the image has at most `max_pixels`;
    factor 1 and the inputs themselves when it already has. Boxes are scaled, crops resized nearest-neighbour
    (`crops` None: a box-only model). `image`: an array, or a `raster` source (read band by band when
    scaled down: a 16000x16000 TIFF is never held whole)."""
    import cv2

    from . import raster

    height, width = (image.height, image.width) if hasattr(image, "rows") else image.shape[:2]
    factor = min(1.0, math.sqrt(max_pixels / (width * height)))
    if factor >= 1.0:
        return (raster.whole(image) if hasattr(image, "rows") else image), found, crops, 1.0
    w, h = max(1, int(width * factor)), max(1, int(height * factor))
    fx, fy = w / width, h / height
    small = raster.shrink(image, w, h)
    shown = [dict(det, bbox=[det["bbox"][0] * fx, det["bbox"][1] * fy, det["bbox"][2] * fx, det["bbox"][3] * fy])
             for det in found]
    if crops is None:
        return small, shown, None, factor
    scaled = []
    for mask, x0, y0 in crops:
        sx0, sy0 = int(x0 * fx), int(y0 * fy)
        sx1 = max(sx0 + 1, int(math.ceil((x0 + mask.shape[1]) * fx)))
        sy1 = max(sy0 + 1, int(math.ceil((y0 + mask.shape[0]) * fy)))
        resized = cv2.resize(mask.astype(np.uint8), (sx1 - sx0, sy1 - sy0), interpolation=cv2.INTER_NEAREST) \
            if mask.size else np.zeros((0, 0), np.uint8)
        scaled.append((resized.astype(bool), sx0, sy0))
    return small, shown, scaled, factor


def write_image(path, image):
    """Write a drawn image atomically (a reader never sees half a file)."""
    import cv2

    from .artifacts import atomic_path
    from .errors import UserError

    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, image):
            raise UserError(f"{path}: cannot write the drawn image (unsupported extension?)")
