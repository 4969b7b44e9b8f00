"""A lab-scale COCO dataset for `validate` (issue 14 a), and the pycocotools baseline that reads it.

    python bench/coco_scale.py generate FOLDER [--images N] [--annotations M]
        writes FOLDER/instances.json and N tiny JPEGs under FOLDER/images/NNN/ (1,000 per folder);
        cached: a rerun with the same N and M finds FOLDER/done and returns at once.
    python bench/coco_scale.py baseline FILE
        pycocotools' COCO(FILE), then every image's header read once with Pillow (the work `validate`
        does, done the plain way), so bench/peak_rss.py can time it as a process of its own.
"""

import argparse
import io
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

IMAGES, ANNOTATIONS = 100_000, 1_000_000
PER_FOLDER = 1000
SIZES = [(16, 16), (20, 16), (16, 12)]  # (width, height): a few, so the size check has something to compare
CATEGORIES = ["ripe", "unripe", "flower"]


def _jpeg(width, height):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _polygon(rng, width, height):
    """One simple polygon of 8-12 points (floats, 2 decimals, as annotation tools export them) in the image."""
    n = rng.randint(8, 12)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    r = rng.uniform(0.1, 0.28) * min(width, height)
    poly = []
    for k in range(n):
        a = 2 * math.pi * k / n + rng.uniform(-0.2, 0.2)
        rk = r * rng.uniform(0.7, 1.0)
        poly += [round(cx + rk * math.cos(a), 2), round(cy + rk * math.sin(a), 2)]
    xs, ys = poly[0::2], poly[1::2]
    x0, y0 = min(xs), min(ys)
    bbox = [x0, y0, round(max(xs) - x0, 2), round(max(ys) - y0, 2)]
    # shoelace area of the polygon, what a mask of it would count
    area = abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(n))) / 2
    return poly, bbox, round(area, 2)


def generate(folder, n_images=IMAGES, n_annotations=ANNOTATIONS, seed=0):
    """Write the dataset under `folder` (unless already there for the same scale); returns the JSON's path."""
    folder = Path(folder)
    marker, path = folder / "done", folder / "instances.json"
    want = {"images": n_images, "annotations": n_annotations, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == want and path.exists():
        return path
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    blobs = [_jpeg(w, h) for w, h in SIZES]

    images = []
    for i in range(n_images):
        size = i % len(SIZES)
        name = f"images/{i // PER_FOLDER:03d}/{i:06d}.jpg"
        if i % PER_FOLDER == 0:
            (folder / name).parent.mkdir(parents=True)
        with open(folder / name, "wb") as fh:
            fh.write(blobs[size])
        w, h = SIZES[size]
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})

    # Annotations in image order, as exporters write them: image k gets the ids after image k-1's.
    # Per-image counts vary (every image has at least one when there are at least as many annotations).
    if n_images <= n_annotations:
        bounds = [0, *sorted(rng.sample(range(1, n_annotations), n_images - 1)), n_annotations]
    else:
        bounds = [*range(n_annotations + 1), *[n_annotations] * (n_images - n_annotations)]
    tmp = path.with_suffix(".json.part")
    with open(tmp, "w") as fh:
        fh.write('{"info": {"description": "cvtk-job bench: synthetic lab-scale dataset"}, "licenses": [],\n')
        fh.write(' "categories": ' + json.dumps([{"id": k + 1, "name": n, "supercategory": "strawberry"}
                                                  for k, n in enumerate(CATEGORIES)]) + ",\n")
        fh.write(' "images": [\n' + ",\n".join(json.dumps(img) for img in images) + "],\n")
        fh.write(' "annotations": [\n')
        ann_id, chunk = 0, []
        for k, img in enumerate(images):
            for _ in range(bounds[k + 1] - bounds[k]):
                ann_id += 1
                poly, bbox, area = _polygon(rng, img["width"], img["height"])
                chunk.append(json.dumps({"id": ann_id, "image_id": img["id"], "category_id": rng.randint(1, 3),
                                         "segmentation": [poly], "area": area, "bbox": bbox, "iscrowd": 0}))
            if chunk and (len(chunk) >= 20_000 or k == len(images) - 1):
                fh.write(("" if ann_id == len(chunk) else ",\n") + ",\n".join(chunk))
                chunk = []
        fh.write("]}\n")
    tmp.rename(path)
    marker.write_text(json.dumps(want))
    return path


def baseline(path):
    """pycocotools loads the file (its json.load plus the indexes it builds); Pillow reads each image's header."""
    from PIL import Image
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    root = os.path.dirname(os.path.abspath(path))
    sizes = 0
    for img in coco.dataset["images"]:
        with Image.open(os.path.join(root, img["file_name"])) as im:
            sizes += im.size[0] > 0
    print(f"{len(coco.imgs)} images, {len(coco.anns)} annotations, {sizes} headers read")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("folder")
    gen.add_argument("--images", type=int, default=IMAGES)
    gen.add_argument("--annotations", type=int, default=ANNOTATIONS)
    base = sub.add_parser("baseline")
    base.add_argument("file")
    opts = ap.parse_args(argv)
    if opts.what == "baseline":
        baseline(opts.file)
        return
    start = time.perf_counter()
    path = generate(opts.folder, opts.images, opts.annotations)
    print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
