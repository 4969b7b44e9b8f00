"""A synthetic detection task a tiny model learns on CPU in minutes: bright squares and disks on a dark,
noisy background, with exact COCO polygons. Used wherever a test needs a model that really detects (tiling).

`write(folder, n, size, shapes, radius)` writes images/ and a COCO JSON; a fixed seed gives the same files.
"""

import json
import math

import numpy as np

CLASSES = ["square", "disk"]


def _polygon(kind, cx, cy, r):
    if kind == 0:
        return [cx - r, cy - r, cx + r, cy - r, cx + r, cy + r, cx - r, cy + r]
    return [v for t in range(24) for v in (cx + r * math.cos(2 * math.pi * t / 24),
                                          cy + r * math.sin(2 * math.pi * t / 24))]


def canvas(rng, width, height, count, radius, placed=()):
    """An image and its objects [(class, cx, cy, r)]: `count` shapes that do not touch, plus `placed` ones."""
    import cv2

    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    objects = list(placed)
    tries = 0
    while len(objects) < count + len(placed) and tries < 50 * count:
        tries += 1
        r = int(rng.integers(radius[0], radius[1] + 1))
        cx, cy = int(rng.integers(r + 1, width - r - 1)), int(rng.integers(r + 1, height - r - 1))
        if all(abs(cx - ox) > r + orad + 3 or abs(cy - oy) > r + orad + 3 for _, ox, oy, orad in objects):
            objects.append((int(rng.integers(0, 2)), cx, cy, r))
    for kind, cx, cy, r in objects:
        color = (40, 200 + int(rng.integers(0, 55)), 255) if kind == 0 else (255, 180 + int(rng.integers(0, 75)), 40)
        points = np.array(_polygon(kind, cx, cy, r), dtype=np.float64).reshape(-1, 2)
        cv2.fillPoly(image, [np.round(points).astype(np.int32)], color, lineType=cv2.LINE_8)
    return image, objects


def write(folder, n, size, count, radius, seed=0, name="coco.json", placed=()):
    """n images of `size` (W, H) with `count` shapes of radius in `radius` (lo, hi) each; returns the JSON path."""
    import cv2

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": c} for i, c in enumerate(CLASSES)]}
    for i in range(n):
        image, objects = canvas(rng, size[0], size[1], count, radius, placed)
        file_name = f"images/{seed}_{i:04d}.png"
        cv2.imwrite(str(folder / file_name), image)
        coco["images"].append({"id": i + 1, "file_name": file_name, "width": size[0], "height": size[1]})
        for kind, cx, cy, r in objects:
            poly = _polygon(kind, cx, cy, r)
            xs, ys = poly[0::2], poly[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": kind,
                                        "bbox": box, "area": float(box[2] * box[3] * (1 if kind == 0 else math.pi / 4)),
                                        "segmentation": [poly], "iscrowd": 0})
    path = folder / name
    path.write_text(json.dumps(coco))
    return path
