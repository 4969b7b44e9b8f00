"""Which file names found in data may be read: the containment rule for COCO file_names and list entries.

Names are relative to the file that lists them and stay inside its folder: no `..` segment, so data
never points at files outside its dataset, nor (on S3) outside its prefix and the local cache. An
absolute name is accepted only in a local file: it names a file on the user's own disk, which the user
could read anyway. On S3 it would read the machine's disk (and upload drawings of what it found).
"""

import json
import os
import re


def short(value, limit=60):
    """A value from a user's file, quoted for a one-line message and cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def name_problem(name, local=True):
    """None when `name` may be read, else (what is wrong, the fix)."""
    if not isinstance(name, str) or not name.strip():
        return f"file_name {short(name)} is not a file name", "give the image's path relative to the file's folder"
    if name.startswith("/") or os.path.isabs(name):
        if local:
            return None
        return f"{name!r} is an absolute path in a file on S3", "name images relative to the file's prefix"
    if ".." in re.split(r"[\\/]", name):
        return (f"{name!r} climbs out of the file's folder with '..'",
                "name images relative to the file's folder, inside it (move the file up, or use absolute paths)")
    return None


def key_problem(key):
    """None when an S3 key can be mirrored under a local folder, else what is wrong."""
    if ".." in key.split("/"):
        return "its key has a '..' segment, which would leave the local cache"
    return None
