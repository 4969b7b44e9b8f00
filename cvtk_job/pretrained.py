"""`--pretrained auto|none|PATH|URL` → a local checkpoint path (or None), downloading at most once."""

import logging
import os
import urllib.parse

from . import checkpoints, mmconfig
from .errors import StorageError, UserError

log = logging.getLogger(__name__)


def cache_dir():
    root = os.environ.get("CVTK_JOB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cvtk-job")
    return os.path.join(root, "checkpoints")


def _search_dirs():
    # CVTK_JOB_PRETRAINED_DIR: checkpoints baked into an image for offline clusters.
    baked = os.environ.get("CVTK_JOB_PRETRAINED_DIR")
    return [d for d in (baked, cache_dir()) if d]


def _fetch(url):
    name = os.path.basename(urllib.parse.urlparse(url).path)
    for folder in _search_dirs():
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    target = os.path.join(cache_dir(), name)
    os.makedirs(cache_dir(), exist_ok=True)
    log.info("downloading %s to %s", url, target)
    import torch

    try:
        # Downloads into a temporary file beside the target and renames it when complete.
        torch.hub.download_url_to_file(url, target, progress=True)
    except Exception as err:  # noqa: BLE001 - any network failure gets the same advice
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(f"could not download the pretrained checkpoint {url} ({reason}); use "
                           "--pretrained none for random init, or --pretrained PATH with a local "
                           "file") from None
    return target


def resolve(pretrained, base_config):
    if pretrained == "none":
        return None
    if pretrained == "auto":
        url = mmconfig.checkpoint_url(base_config)
        if url is None:
            raise UserError(f"no COCO checkpoint is known for {os.path.basename(base_config)}; use "
                            "--pretrained none or --pretrained PATH")
        return _fetch(url)
    if pretrained.startswith(("http://", "https://")):
        return _fetch(pretrained)
    if not os.path.isfile(pretrained):
        raise UserError(f"--pretrained {pretrained}: file not found; use auto, none, a path or a URL")
    if not checkpoints.intact(pretrained):
        raise UserError(f"--pretrained {pretrained}: not a readable torch checkpoint (truncated, or not a .pth "
                        "file); use auto, none, or another file")
    return os.path.abspath(pretrained)


def bake(names, folder):
    """Download the COCO checkpoints of the given model names into `folder` (image builds)."""
    os.makedirs(folder, exist_ok=True)
    import torch

    for name in names:
        url = mmconfig.checkpoint_url(mmconfig.resolve_model(name, "segm"))
        if url is None:
            raise UserError(f"{name}: mmdet's model index has no checkpoint for it")
        torch.hub.download_url_to_file(url, os.path.join(folder, os.path.basename(urllib.parse.urlparse(url).path)))


if __name__ == "__main__":
    import sys

    bake(sys.argv[1:], os.environ.get("CVTK_JOB_PRETRAINED_DIR", "."))
