"""`--data` → the list of images to predict on (no torch): folder, list file, single image, COCO JSON.

Every image gets a name relative to the input root; drawn images are written under that name, so
sub-folders survive and equal file names in different folders never overwrite each other.
"""

import os
from dataclasses import dataclass
from typing import List

from . import coco
from .errors import UserError

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


def list_entries(list_file):
    """Image paths in a list file: first tab-separated column (cvtk's lists may carry more), no blanks."""
    with open(list_file, encoding="utf-8") as fh:
        entries = [line.split("\t")[0].strip() for line in fh]
    return [e for e in entries if e and not e.startswith("#")]


def _from_list(list_file):
    root = os.path.dirname(os.path.abspath(list_file))
    refs = []
    for entry in list_entries(list_file):
        path = os.path.normpath(entry if os.path.isabs(entry) else os.path.join(root, entry))
        refs.append(ImageRef(path, _relative(path, root)))
    return ImageSet(root, refs, "list")


def _from_coco(json_path):
    data = coco.read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{json_path}: no 'images' list; give a COCO JSON, a folder, an image or a list file")
    root = os.path.dirname(os.path.abspath(json_path))
    refs = []
    for img in data["images"]:
        name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(name, str):
            raise UserError(f"{json_path}: image id {img.get('id') if isinstance(img, dict) else '?'}: "
                            "no file_name; every image needs one")
        path = name if os.path.isabs(name) else os.path.join(root, name)
        refs.append(ImageRef(os.path.normpath(path), _relative(os.path.normpath(path), root)))
    return ImageSet(root, refs, "coco")


def collect(data):
    """Resolve `--data`; raises UserError when it names nothing usable."""
    if os.path.isdir(data):
        found = _from_folder(os.path.abspath(data))
    elif not os.path.isfile(data):
        raise UserError(f"--data {data}: no such file or folder")
    elif data.lower().endswith(".json"):
        found = _from_coco(data)
    elif is_image_name(data):
        path = os.path.abspath(data)
        found = ImageSet(os.path.dirname(path), [ImageRef(path, os.path.basename(path))], "image")
    else:
        found = _from_list(data)
    if not found.images:
        raise UserError(f"--data {data}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found
