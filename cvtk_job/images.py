"""`--data` → the list of images to predict on (no torch): folder, list file, single image, COCO JSON.

Every image gets a name relative to the input root; drawn images are written under that name, so
sub-folders survive and equal file names in different folders never overwrite each other.
"""

import os
from dataclasses import dataclass
from typing import List

from . import coco
from .errors import UserError
from .names import short

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ImageRef:
    path: str  # where to read it
    name: str  # relative to the input root: file_name in instances.json, path of the drawn image


@dataclass(frozen=True)
class ImageSet:
    root: str
    images: List[ImageRef]
    kind: str


def is_image_name(name):
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _relative(path, root):
    rel = os.path.relpath(path, root)
    # Outside the root (an absolute path in a list): keep the whole path, minus its leading "/".
    return path.lstrip(os.sep) if rel.startswith("..") else rel


def _from_folder(folder):
    refs = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(files):
            if is_image_name(name) and not name.startswith("."):
                path = os.path.join(parent, name)
                refs.append(ImageRef(path, os.path.relpath(path, folder)))
    return ImageSet(folder, refs, "folder")


def list_entries(list_file, name=None):
    """(line number, image path) of a list file: first tab-separated column (cvtk's lists may carry more),
    no blanks or comments; UTF-8 with or without a byte-order mark, LF or CRLF."""
    text = coco.read_text(list_file, name or list_file, "save the list of images as UTF-8, one path per line")
    entries = [(k, line.split("\t")[0].strip()) for k, line in enumerate(text.splitlines(), 1)]
    return [(k, e) for k, e in entries if e and not e.startswith("#")]


def _from_list(list_file, name, local):
    root = os.path.dirname(os.path.abspath(list_file))
    refs = []
    for line, entry in list_entries(list_file, name):
        path = coco.image_path(entry, root, f"{name}: line {line}", local)
        refs.append(ImageRef(path, _relative(path, root)))
    return ImageSet(root, refs, "list")


def _from_coco(json_path, name, local):
    data = coco.read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{name}: no 'images' list; give a COCO JSON, a folder, an image or a list file")
    root = os.path.dirname(os.path.abspath(json_path))
    refs = []
    for k, img in enumerate(data["images"]):
        where = f"{name}: images[{k}]" + (f" (id {short(img.get('id'))})" if isinstance(img, dict) else "")
        path = coco.image_path(img.get("file_name") if isinstance(img, dict) else None, root, where, local)
        refs.append(ImageRef(path, _relative(path, root)))
    return ImageSet(root, refs, "coco")


def collect(data, name=None, local=True):
    """Resolve `--data`; raises UserError when it names nothing usable.

    `name` is what messages call it (the s3:// URI a staged file came from); `local` is False for a list
    or JSON from S3, whose entries must then stay inside its prefix (names.name_problem)."""
    name = name or data
    if os.path.isdir(data):
        found = _from_folder(os.path.abspath(data))
    elif not os.path.isfile(data):
        raise UserError(f"--data {data}: no such file or folder")
    elif data.lower().endswith(".json"):
        found = _from_coco(data, name, local)
    elif is_image_name(data):
        path = os.path.abspath(data)
        found = ImageSet(os.path.dirname(path), [ImageRef(path, os.path.basename(path))], "image")
    else:
        found = _from_list(data, name, local)
    if not found.images:
        raise UserError(f"--data {data}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found
