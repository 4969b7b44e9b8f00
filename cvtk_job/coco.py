"""Label files and COCO datasets: load and validate, without torch.

Every problem becomes one line naming the file, the record, what is wrong and how to fix it, so a
user with a 10,000-image dataset sees all the problems at once instead of one traceback at a time.
"""

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from .errors import UserError

# Annotation tools let box edges stray a little outside the image (the strawberry set has one at
# y=-1.65); MMDetection clips those, so only a box that is clearly off the image (wrong scale, wrong
# image) is an error. Slack: 1% of the image side, at least 1 px.
BOX_SLACK_FRACTION = 0.01


def _slack(side):
    return max(1.0, BOX_SLACK_FRACTION * side)


@dataclass(frozen=True)
class Problem:
    file: str
    record: str
    what: str
    fix: str
    severity: str = "error"

    def __str__(self):
        return f"{self.file}: {self.record}: {self.what}; {self.fix}"


@dataclass
class Report:
    """What validating one COCO file found; `data` is the parsed JSON when it could be read."""

    path: str
    problems: List[Problem] = field(default_factory=list)
    data: Optional[dict] = None

    @property
    def errors(self):
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self):
        return [p for p in self.problems if p.severity == "warning"]

    def error(self, record, what, fix):
        self.problems.append(Problem(self.path, record, what, fix))

    def warn(self, record, what, fix):
        self.problems.append(Problem(self.path, record, what, fix, "warning"))


# ---------------------------------------------------------------------------------------------
# Label files


def load_labels(path):
    """Class names in index order: one per line (blank lines skipped), or a COCO JSON's categories."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: label file not found; pass --label with the path of a text file "
                        "listing one class name per line")
    if path.endswith(".json"):
        data = read_json(path)
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not cats:
            raise UserError(f"{path}: no 'categories' list in this JSON label file; use a COCO JSON "
                            "with categories, or a text file with one class name per line")
        labels = [c.get("name") for c in sorted(cats, key=lambda c: c.get("id", 0))]
    else:
        with open(path, encoding="utf-8") as fh:
            labels = [line.strip() for line in fh if line.strip()]
    if not labels:
        raise UserError(f"{path}: the label file lists no class names; write one class name per line")
    seen = set()
    for name in labels:
        if name in seen:
            raise UserError(f"{path}: class '{name}' is listed twice; every class name must be unique")
        seen.add(name)
    return labels


# ---------------------------------------------------------------------------------------------
# COCO JSON


class _JsonUnreadable(Exception):
    def __init__(self, record, what, fix):
        super().__init__(what)
        self.record, self.what, self.fix = record, what, fix


def _load_json(path):
    if not os.path.isfile(path):
        raise _JsonUnreadable("file", "file not found", "check the path")
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.strip():
        raise _JsonUnreadable("file", "the file is empty", "export the dataset again as COCO JSON")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise _JsonUnreadable(f"line {err.lineno}, column {err.colno}", f"invalid JSON ({err.msg})",
                              "fix the syntax at that position") from None
    except UnicodeDecodeError as err:
        raise _JsonUnreadable("file", f"not UTF-8 text ({err.reason} at byte {err.start})",
                              "save the file as UTF-8 JSON") from None


def read_json(path):
    """Parse a JSON file, turning every way it can fail into a one-line UserError."""
    try:
        return _load_json(path)
    except _JsonUnreadable as err:
        raise UserError(str(Problem(path, err.record, err.what, err.fix))) from None


def _image_label(img):
    return f"image id {img.get('id')} ({img.get('file_name')})"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_segmentation(report, rec, seg, img):
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                report.error(rec, f"segmentation polygon {k} is not a list of numbers",
                             "write polygons as [[x1, y1, x2, y2, ...]]")
            elif len(poly) % 2:
                report.error(rec, f"segmentation polygon {k} has an odd number of coordinates "
                                  f"({len(poly)})", "give x, y pairs")
            elif len(poly) < 6:
                report.error(rec, f"segmentation polygon {k} has {len(poly) // 2} point(s)",
                             "a polygon needs at least 3 points; delete or redraw it")
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2) or not isinstance(counts, (str, list)):
            report.error(rec, "RLE segmentation needs 'size' [height, width] and 'counts'",
                         "export masks as COCO RLE")
        elif img is not None and list(size) != [img.get("height"), img.get("width")]:
            report.error(rec, f"RLE size {size} does not match the image "
                              f"[height, width] [{img.get('height')}, {img.get('width')}]",
                         "encode the mask at the image's size")
    else:
        report.error(rec, "segmentation is neither a polygon list nor an RLE dict",
                     "use [[x1, y1, ...]] or {'size': [h, w], 'counts': ...}")


def _has_mask(seg):
    return bool(seg) and isinstance(seg, (list, dict))


def _check_image_file(report, img, root):
    from PIL import Image, UnidentifiedImageError  # Pillow reads headers only until pixels are asked for

    name = img.get("file_name")
    path = name if os.path.isabs(name) else os.path.join(root, name)
    rec = _image_label(img)
    if not os.path.isfile(path):
        report.error(rec, f"image file not found at {path}",
                     "copy the image there or fix file_name (it is relative to the JSON's folder)")
        return
    try:
        with Image.open(path) as im:
            size = im.size
    except (UnidentifiedImageError, OSError) as err:
        report.error(rec, f"image file {path} cannot be read ({type(err).__name__})",
                     "replace it with a valid JPEG or PNG")
        return
    if size != (img.get("width"), img.get("height")):
        report.error(rec, f"the JSON says {img.get('width')}x{img.get('height')} but the image file "
                          f"is {size[0]}x{size[1]}", "set width and height to the file's real size")


def validate_coco(path, labels=None, task=None, check_images=True, name=None):
    """Check one COCO file; returns a Report (never raises for problems in the data).

    `name` is what the messages call the file, when that is not `path` (an s3:// URI staged locally).
    """
    report = Report(name or path)
    try:
        data = _load_json(path)
    except _JsonUnreadable as err:
        report.error(err.record, err.what, err.fix)
        return report
    if not isinstance(data, dict):
        report.error("file", f"the top level is a JSON {type(data).__name__}, not an object",
                     "a COCO file is an object with images, annotations and categories")
        return report
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        report.error("file", f"missing or not a list: {', '.join(missing)}",
                     "a COCO file needs 'images', 'annotations' and 'categories' lists")
        return report
    report.data = data
    root = os.path.dirname(os.path.abspath(path))

    images, image_ids = {}, set()  # valid images; every id seen (so bad images are reported once)
    for img in data["images"]:
        rec = _image_label(img) if isinstance(img, dict) else "image record"
        if not (isinstance(img, dict) and isinstance(img.get("id"), int)
                and isinstance(img.get("file_name"), str)):
            report.error(rec, "an image needs an integer 'id' and a 'file_name'", "add them")
            continue
        if img["id"] in image_ids:
            report.error(rec, f"image id {img['id']} is used more than once", "give every image a unique id")
            continue
        image_ids.add(img["id"])
        w, h = img.get("width"), img.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            report.error(rec, f"width and height must be positive integers (got {w!r}, {h!r})",
                         "set them to the image's size in pixels")
            continue
        images[img["id"]] = img

    categories = {}
    for cat in data["categories"]:
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int)
                and isinstance(cat.get("name"), str)):
            report.error("category record", f"{cat!r} needs an integer 'id' and a 'name'", "add them")
            continue
        if cat["id"] in categories:
            report.error(f"category id {cat['id']}", "category id used more than once",
                         "give every category a unique id")
            continue
        categories[cat["id"]] = cat["name"]
    if not categories:
        report.error("categories", "no categories", "list every class in 'categories'")
    if labels is not None and categories:
        names = [categories[k] for k in sorted(categories)]
        if names != list(labels):
            report.error("categories", f"names in id order are {names} but the label file lists "
                                       f"{list(labels)}{_difference(names, labels)}",
                         "make the categories (sorted by id) match the label file line by line")

    annotated, ann_ids = set(), set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
            report.error("annotation record", "an annotation needs an integer 'id'", "add one")
            continue
        img = images.get(ann.get("image_id"))
        rec = f"annotation id {ann['id']}" + (f" ({img['file_name']})" if img else "")
        if ann["id"] in ann_ids:
            report.error(rec, f"annotation id {ann['id']} is used more than once",
                         "give every annotation a unique id")
        ann_ids.add(ann["id"])
        if img is None and ann.get("image_id") not in image_ids:
            report.error(rec, f"image_id {ann.get('image_id')!r} is not in images",
                         "point image_id at an existing image or delete the annotation")
        elif img is not None:
            annotated.add(img["id"])
        if ann.get("category_id") not in categories:
            report.error(rec, f"category_id {ann.get('category_id')!r} is not in categories",
                         f"use one of {sorted(categories)}")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            report.error(rec, f"bbox {box!r} is not [x, y, width, height]", "write the box as 4 numbers")
        elif box[2] <= 0 or box[3] <= 0:
            report.error(rec, f"bbox {box} has no area (width and height must be positive)",
                         "fix or delete the annotation")
        elif img is not None and (box[0] < -_slack(img["width"]) or box[1] < -_slack(img["height"])
                                  or box[0] + box[2] > img["width"] + _slack(img["width"])
                                  or box[1] + box[3] > img["height"] + _slack(img["height"])):
            report.error(rec, f"bbox {box} extends outside the {img['width']}x{img['height']} image",
                         "clip the box to the image")
        if not _is_number(ann.get("area")):
            report.error(rec, "area is missing or not a number",
                         "set area (mask pixel count, or box width*height)")
        seg = ann.get("segmentation")
        if seg not in (None, []):
            _check_segmentation(report, rec, seg, img)
        elif task == "segm":
            report.error(rec, "no segmentation mask, but the task is segm",
                         "add a polygon or RLE mask, or train with --task det")

    if check_images:
        for img in images.values():
            _check_image_file(report, img, root)
    empty = [img for img in images.values() if img["id"] not in annotated]
    if empty:
        names = ", ".join(img["file_name"] for img in empty[:3]) + (" ..." if len(empty) > 3 else "")
        report.warn("images", f"{len(empty)} image(s) have no annotations ({names})",
                    "fine for validation/test; training skips them")
    if not data["images"]:
        report.error("images", "no images", "the dataset must list at least one image")
    return report


def _difference(names, labels):
    missing = [n for n in labels if n not in names]
    extra = [n for n in names if n not in labels]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    if not parts:
        parts.append("same names, different order")
    return " (" + "; ".join(parts) + ")"
