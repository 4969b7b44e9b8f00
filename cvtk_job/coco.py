"""Label files and COCO datasets: load and validate, without torch.

Every problem becomes one line naming the file, the record, what is wrong and how to fix it, so a
user with a 10,000-image dataset sees all the problems at once instead of one traceback at a time.
"""

import gc
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

from .errors import UserError
from .names import name_problem
from .names import short as _short

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
    """Class names in index order: one per line (blank lines skipped), or a COCO JSON's categories.

    Editors on Windows write a byte-order mark and CRLF line ends; both are accepted (the first class
    would otherwise be named "\\ufeffflower" and never match the dataset)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: label file not found; pass --label with the path of a text file "
                        "listing one class name per line")
    if path.endswith(".json"):
        labels = _json_labels(path, read_json(path))
    else:
        text = read_text(path, path, "save the label file as UTF-8, one class name per line")
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise UserError(f"{path}: the label file lists no class names; write one class name per line")
    seen = set()
    for name in labels:
        if name in seen:
            raise UserError(f"{path}: class '{name}' is listed twice; every class name must be unique")
        seen.add(name)
    return labels


def read_text(path, shown, fix):
    """A small text file a user wrote (label file, list of images): UTF-8 with or without a byte-order mark
    (Windows editors), any line ends; anything else is one line naming the line where it stops being UTF-8."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{shown}: line {line}: not UTF-8 text ({err.reason} at byte {err.start}); {fix}") from None


def _json_labels(path, data):
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise UserError(f"{path}: no 'categories' list in this JSON label file; use a COCO JSON "
                        "with categories, or a text file with one class name per line")
    for k, cat in enumerate(cats):
        if not (isinstance(cat, dict) and is_int(cat.get("id")) and isinstance(cat.get("name"), str)
                and cat["name"].strip()):
            raise UserError(f"{path}: categories[{k}]: {_short(cat)} needs an integer 'id' and a 'name'; "
                            "write every category as {\"id\": 1, \"name\": \"flower\"}")
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def is_int(value):
    """An id or a size: a JSON integer (true/false are not numbers, 1.0 is not an id)."""
    return type(value) is int


def is_number(value):
    """A coordinate or an area: a finite JSON number (1e400 parses as infinity)."""
    return (type(value) is int or type(value) is float) and math.isfinite(value)


def image_path(name, root, where, local=True):
    """Where the image `name` is read (see name_problem); one-line UserError when it may not be."""
    problem = name_problem(name, local)
    if problem:
        raise UserError(f"{where}: {problem[0]}; {problem[1]}")
    return os.path.normpath(os.path.join(root, name))


class _JsonUnreadable(Exception):
    def __init__(self, record, what, fix):
        super().__init__(what)
        self.record, self.what, self.fix = record, what, fix


def _not_json(constant):
    # Python's json reads NaN and Infinity, which JSON does not have (and a NaN box trains into a NaN loss).
    raise _JsonUnreadable("file", f"{constant} is not a JSON number", "write finite numbers only")


def _load_json(path):
    if not os.path.isfile(path):
        raise _JsonUnreadable("file", "file not found", "check the path")
    try:
        # Read as text directly: keeping the bytes as well would hold a second copy of a 250 MB file.
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        with open(path, "rb") as fh:
            line = fh.read(err.start).count(b"\n") + 1
        raise _JsonUnreadable(f"line {line}", f"not UTF-8 text ({err.reason} at byte {err.start})",
                              "save the file as UTF-8 JSON") from None
    if not text.strip():
        raise _JsonUnreadable("file", "the file is empty", "export the dataset again as COCO JSON")
    if text.startswith("\ufeff"):
        # JSON forbids it and mmdet's loader (json.load) stops at it: refused here rather than after staging.
        raise _JsonUnreadable("line 1", "starts with a byte-order mark (BOM)", "save the file as UTF-8 without BOM")
    try:
        return parse_json(text)
    except json.JSONDecodeError as err:
        raise _JsonUnreadable(f"line {err.lineno}, column {err.colno}", f"invalid JSON ({err.msg})",
                              "fix the syntax at that position") from None
    except _JsonUnreadable as err:
        found = re.search(r"-?\b(NaN|Infinity)\b", text)
        if found:
            err.record = f"line {text.count(chr(10), 0, found.start()) + 1}"
        raise
    except RecursionError:
        raise _JsonUnreadable("file", "nested too deeply", "a COCO file is a few levels deep; export it "
                              "again") from None


def parse_json(text):
    """json.loads without the cyclic garbage collector: a COCO file of 1M polygons is ~20M new objects, and
    the collector would scan them again and again while they are created (half the parse time); none of
    them can be part of a cycle. (Not gc.freeze() after it: with nothing counted as long-lived, mmdet's
    dataset build then ran a full collection every few allocations, measured 4 s slower.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(text, parse_constant=_not_json)
    finally:
        if enabled:
            gc.enable()


def read_json(path):
    """Parse a JSON file, turning every way it can fail into a one-line UserError."""
    try:
        return _load_json(path)
    except _JsonUnreadable as err:
        raise UserError(str(Problem(path, err.record, err.what, err.fix))) from None


def _image_label(img):
    return f"image id {_short(img.get('id'), 30)} ({_short(img.get('file_name'), 80).strip(chr(34))})"


_NUMBER_TYPES = {int, float}


def _numbers_problem(values):
    """None when `values` is a list of finite numbers, else what is wrong (checked in C, for 1M polygons)."""
    if not isinstance(values, list):
        return "is not a list of numbers"
    if not set(map(type, values)) <= _NUMBER_TYPES:
        return "is not a list of numbers"
    if not math.isfinite(sum(values)) and not all(map(math.isfinite, values)):
        return "holds a number that is not finite"
    return None


def rle_counts(counts):
    """COCO's compressed RLE string → run lengths (the LEB128-like code of pycocotools' maskApi), or None
    when the string is not one. Decoded here, in Python, because pycocotools' C decoder trusts the input."""
    runs, value, shift = [], 0, 0
    for char in counts:
        c = ord(char) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    return runs if shift == 0 else None


def _check_polygon(report, rec, k, poly):
    problem = _numbers_problem(poly)
    if problem:
        report.error(rec, f"segmentation polygon {k} {problem}", "write polygons as [[x1, y1, x2, y2, ...]]")
    elif len(poly) % 2:
        report.error(rec, f"segmentation polygon {k} has an odd number of coordinates ({len(poly)})",
                     "give x, y pairs")
    elif len(poly) < 6:
        report.error(rec, f"segmentation polygon {k} has {len(poly) // 2} point(s)",
                     "a polygon needs at least 3 points; delete or redraw it")


def _check_segmentation(report, rec, seg, img):
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            _check_polygon(report, rec, k, poly)
    elif isinstance(seg, dict):
        _check_rle(report, rec, seg, img)
    else:
        report.error(rec, "segmentation is neither a polygon list nor an RLE dict",
                     "use [[x1, y1, ...]] or {'size': [h, w], 'counts': ...}")


def _check_rle(report, rec, seg, img):
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) and v > 0 for v in size)) \
            or not isinstance(counts, (str, list)):
        report.error(rec, "RLE segmentation needs 'size' [height, width] and 'counts'", "export masks as COCO RLE")
        return
    if img is not None and size != [img["height"], img["width"]]:
        report.error(rec, f"RLE size {size} does not match the image [height, width] "
                          f"[{img['height']}, {img['width']}]", "encode the mask at the image's size")
        return
    runs = rle_counts(counts) if isinstance(counts, str) else counts
    if runs is None or not all(is_int(r) and r >= 0 for r in runs):
        report.error(rec, "RLE counts do not decode (not COCO's run-length code)",
                     "export the mask again as COCO RLE (pycocotools.mask.encode)")
    elif sum(runs) != size[0] * size[1]:
        report.error(rec, f"RLE counts cover {sum(runs)} pixels, not {size[0]}x{size[1]} = {size[0] * size[1]}",
                     "encode the mask at the image's size")


def _has_mask(seg):
    return bool(seg) and isinstance(seg, (list, dict))


# EXIF orientations 5-8 turn the picture by 90 degrees: every loader (OpenCV, mmcv) shows it rotated,
# and annotation tools label what they show, so the displayed size is the image's size.
_TRANSPOSED = {5, 6, 7, 8}
_ORIENTATION = 0x0112


def displayed_size(im):
    """(width, height) of an open Pillow image as viewers and OpenCV show it (EXIF orientation applied);
    reads the header only."""
    width, height = im.size
    if "exif" in im.info or im.format == "JPEG":
        try:
            if im.getexif().get(_ORIENTATION) in _TRANSPOSED:
                return height, width
        except Exception:  # noqa: BLE001 - a broken EXIF block: OpenCV ignores it too
            pass
    return width, height


def read_sizes(paths):
    """[(displayed (width, height), None) or (None, error)] for image files: headers only (Pillow)."""
    from PIL import Image, UnidentifiedImageError  # Pillow reads headers only until pixels are asked for

    found = []
    for path in paths:
        try:
            with Image.open(path) as im:
                found.append((displayed_size(im), None))
        except FileNotFoundError:
            found.append((None, "missing"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            found.append((None, type(err).__name__))
    return found


# Below this many images, reading headers here is quicker than starting worker processes.
PARALLEL_HEADERS = 4000
HEADER_CHUNK = 2000


def _header_reader(paths):
    """Start reading every image header; returns a function that waits and gives the sizes in order.

    Large datasets are read by worker processes (Pillow's header parsing holds the GIL), while this process
    checks the annotations. Spawned, not forked: a fork would start as a copy of the parsed JSON."""
    if len(paths) < PARALLEL_HEADERS:
        return lambda: read_sizes(paths)
    import concurrent.futures
    import multiprocessing

    workers = max(1, min(8, len(os.sched_getaffinity(0))))
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(read_sizes, paths[i:i + HEADER_CHUNK]) for i in range(0, len(paths), HEADER_CHUNK)]

    def wait():
        try:
            return [size for future in futures for size in future.result()]
        finally:
            pool.shutdown()
    return wait


def _check_image_files(report, images, paths, sizes):
    for (image_id, img), (size, error) in zip(images.items(), sizes, strict=True):
        if size is not None and size == (img["width"], img["height"]):
            continue
        rec, path = _image_label(img), paths[image_id]
        if error == "missing":
            report.error(rec, f"image file not found at {path}",
                         "copy the image there or fix file_name (it is relative to the JSON's folder)")
        elif error:
            report.error(rec, f"image file {path} cannot be read ({error})", "replace it with a valid JPEG or PNG")
        else:
            report.error(rec, f"the JSON says {img['width']}x{img['height']} but the image file "
                              f"is {size[0]}x{size[1]}", "set width and height to the file's real size")


def _ann_label(ann_id, img):
    return f"annotation id {ann_id}" + (f" ({img['file_name']})" if img else "")


def validate_coco(path, labels=None, task=None, check_images=True, name=None, local=True):
    """Check one COCO file; returns a Report (never raises for problems in the data).

    `name` is what the messages call the file, when that is not `path` (an s3:// URI staged locally);
    `local` is False for a file that came from S3 (absolute image names are refused there).
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
    root = os.path.dirname(os.path.abspath(path))

    images, image_ids, paths = {}, set(), {}  # valid images; every id seen (bad images reported once)
    for img in data["images"]:
        if not isinstance(img, dict):
            report.error("image record", f"{_short(img)} is not an object", "write every image as {\"id\": ...}")
            continue
        if not is_int(img.get("id")):
            report.error(_image_label(img), "an image needs an integer 'id' and a 'file_name'", "add them")
            continue
        if not isinstance(img.get("file_name"), str):
            image_ids.add(img["id"])
            report.error(_image_label(img), "an image needs an integer 'id' and a 'file_name'", "add them")
            continue
        if img["id"] in image_ids:
            report.error(_image_label(img), f"image id {img['id']} is used more than once",
                         "give every image a unique id")
            continue
        image_ids.add(img["id"])  # known from here on: its annotations are not reported as orphans too
        problem = name_problem(img["file_name"], local)
        if problem:
            report.error(_image_label(img), *problem)
            continue
        paths[img["id"]] = os.path.join(root, img["file_name"])
        w, h = img.get("width"), img.get("height")
        if not (type(w) is int and type(h) is int and w > 0 and h > 0):
            report.error(_image_label(img), f"width and height must be positive integers (got {_short(w)}, "
                         f"{_short(h)})", "set them to the image's size in pixels")
            continue
        images[img["id"]] = img

    categories = {}
    for cat in data["categories"]:
        if not (isinstance(cat, dict) and is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
            report.error("category record", f"{_short(cat)} needs an integer 'id' and a 'name'", "add them")
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

    # Boxes may stray a little outside their image (see BOX_SLACK_FRACTION): the limits, once per image.
    limits = {i: (-_slack(img["width"]), -_slack(img["height"]), img["width"] + _slack(img["width"]),
                  img["height"] + _slack(img["height"])) for i, img in images.items()}
    image_files = [paths[i] for i in images] if check_images else []
    sizes = _header_reader(image_files) if check_images else None

    annotated, ann_ids, isfinite = set(), set(), math.isfinite
    for ann in data["annotations"]:
        if type(ann) is not dict or type(ann.get("id")) is not int:
            what = ann.get("id") if isinstance(ann, dict) else ann
            report.error("annotation record", f"an annotation needs an integer 'id' (got {_short(what)})", "add one")
            continue
        ann_id, image_id = ann["id"], ann.get("image_id")
        img = images.get(image_id) if type(image_id) is int else None
        if ann_id in ann_ids:
            report.error(_ann_label(ann_id, img), f"annotation id {ann_id} is used more than once",
                         "give every annotation a unique id")
        ann_ids.add(ann_id)
        if img is not None:
            annotated.add(image_id)
        elif not (type(image_id) is int and image_id in image_ids):
            report.error(_ann_label(ann_id, img), f"image_id {_short(image_id)} is not in images",
                         "point image_id at an existing image or delete the annotation")
        category_id = ann.get("category_id")
        if not (type(category_id) is int and category_id in categories):
            report.error(_ann_label(ann_id, img), f"category_id {_short(category_id)} is not in categories",
                         f"use one of {sorted(categories)}")
        box = ann.get("bbox")
        try:  # the common case in C; any doubt goes to the precise checks (and their messages)
            fine = type(box) is list and len(box) == 4 and isfinite(box[0] + box[1] + box[2] + box[3])
        except TypeError:
            fine = False
        if not fine and (_numbers_problem(box) or len(box) != 4):
            report.error(_ann_label(ann_id, img), f"bbox {_short(box)} is not [x, y, width, height] of finite "
                         "numbers", "write the box as 4 numbers")
        elif box[2] <= 0 or box[3] <= 0:
            report.error(_ann_label(ann_id, img), f"bbox {box} has no area (width and height must be positive)",
                         "fix or delete the annotation")
        elif img is not None:
            x0, y0, x1, y1 = limits[image_id]
            if box[0] < x0 or box[1] < y0 or box[0] + box[2] > x1 or box[1] + box[3] > y1:
                report.error(_ann_label(ann_id, img), f"bbox {box} extends outside the {img['width']}x"
                             f"{img['height']} image", "clip the box to the image")
        if not is_number(ann.get("area")):
            report.error(_ann_label(ann_id, img), "area is missing or not a finite number",
                         "set area (mask pixel count, or box width*height)")
        crowd = ann.get("iscrowd", 0)
        if crowd != 0 and crowd != 1 or type(crowd) is not int:
            report.error(_ann_label(ann_id, img), f"iscrowd {_short(crowd)} is not 0 or 1",
                         "use 0 (or 1 for a crowd region)")
        seg = ann.get("segmentation")
        if type(seg) is list and seg:
            for k, poly in enumerate(seg):
                try:
                    fine = type(poly) is list and len(poly) >= 6 and not len(poly) & 1 and isfinite(sum(poly))
                except TypeError:
                    fine = False
                if not fine:
                    _check_polygon(report, _ann_label(ann_id, img), k, poly)
        elif seg not in (None, []):
            _check_segmentation(report, _ann_label(ann_id, img), seg, img)
        elif task == "segm":
            report.error(_ann_label(ann_id, img), "no segmentation mask, but the task is segm",
                         "add a polygon or RLE mask, or train with --task det")

    if check_images:
        _check_image_files(report, images, paths, sizes())
    empty = [img for img in images.values() if img["id"] not in annotated]
    if empty:
        names = ", ".join(img["file_name"] for img in empty[:3]) + (" ..." if len(empty) > 3 else "")
        report.warn("images", f"{len(empty)} image(s) have no annotations ({names})",
                    "fine for validation/test; training skips them")
    if not data["images"]:
        report.error("images", "no images", "the dataset must list at least one image")
    if not report.errors:
        report.data = data
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


def stage_coco(uri):
    """A COCO JSON (local: as it is; S3: staged with every image it names); returns the local JSON path.

    A JSON that does not parse stages no image: validation then reports why, with line and column."""
    from . import storage

    local = storage.stage_file(uri)
    if not storage.is_s3(uri):
        return local
    try:
        data = _load_json(local)
    except _JsonUnreadable:
        return local
    names = [img.get("file_name") for img in data.get("images", []) if isinstance(img, dict)] \
        if isinstance(data, dict) else []
    storage.stage_many(uri.rsplit("/", 1)[0], [n for n in names if isinstance(n, str)], uri)
    return local


# The datasets this process already parsed and validated, handed to mmdet's CocoDataset once
# (mmhooks.ParsedCOCO) instead of being parsed a second time: at 100,000 images that parse is ~10 s.
_PARSED = {}


def _key(path):
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def keep_parsed(path, data):
    _PARSED[_key(path)] = data


def take_parsed(path):
    """The parsed content of `path` kept by keep_parsed (once), or None (never kept, or changed since)."""
    try:
        return _PARSED.pop(_key(path), None)
    except OSError:
        return None
