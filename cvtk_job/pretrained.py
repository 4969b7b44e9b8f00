"""`--pretrained auto|none|PATH|URL` → a local checkpoint path (or None), downloading at most once."""

import logging
import os
import urllib.parse
from dataclasses import dataclass
from typing import Optional

from . import checkpoints, mmconfig, storage
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


def shown(url):
    """A URL fit for logs and failure records: a presigned URL's query (X-Amz-Signature=…, tokens) is a
    credential, so it is cut to `?…`."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(query="…" if parts.query else "", fragment="")) \
        if parts.scheme else url


@dataclass(frozen=True)
class Source:
    """Where the starting weights come from (decided from the arguments) and where they are read locally."""

    path: str  # the local file the run reads (it exists once `fetch` returned)
    url: Optional[str] = None  # downloaded from here first when `path` is missing
    uri: Optional[str] = None  # an s3:// object staged to `path`


def _from_url(url):
    name = os.path.basename(urllib.parse.urlparse(url).path)
    for folder in _search_dirs():
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return Source(candidate)
    return Source(os.path.join(cache_dir(), name), url=url)


def locate(pretrained, base_config):
    """`--pretrained` → a Source, or None for random init. Checks what can be checked without a download
    (the model index knows the model, the local file or S3 object exists and is a torch archive)."""
    if pretrained == "none":
        return None
    if pretrained == "auto":
        url = mmconfig.checkpoint_url(base_config)
        if url is None:
            raise UserError(f"no COCO checkpoint is known for {os.path.basename(base_config)}; use "
                            "--pretrained none or --pretrained PATH")
        return _from_url(url)
    if pretrained.startswith(("http://", "https://")):
        return _from_url(pretrained)
    if storage.is_s3(pretrained):
        if not storage.exists(pretrained):
            raise UserError(f"--pretrained {pretrained}: no such object; use auto, none, a path or a URL")
        return Source(storage.cache_path(pretrained), uri=pretrained)
    if not os.path.isfile(pretrained):
        raise UserError(f"--pretrained {pretrained}: file not found; use auto, none, a path or a URL")
    check_file(pretrained)
    return Source(os.path.abspath(pretrained))


def check_file(path, shown_as=None):
    if not checkpoints.intact(path):
        raise UserError(f"--pretrained {shown_as or path}: not a readable torch checkpoint (truncated, or not a "
                        ".pth file); use auto, none, or another file")


def fetch(source):
    """Download (or stage from S3) what a Source names, once; returns the local path."""
    if source is None:
        return None
    if source.uri:
        check_file(storage.stage_file(source.uri), source.uri)
        return source.path
    if source.url and not os.path.isfile(source.path):
        _download(source.url, source.path)
    return source.path


def _download(url, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    log.info("downloading %s to %s", shown(url), target)
    import torch

    try:
        # Downloads into a temporary file beside the target and renames it when complete.
        torch.hub.download_url_to_file(url, target, progress=True)
    except Exception as err:  # noqa: BLE001 - any network failure gets the same advice
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(f"could not download the pretrained checkpoint {shown(url)} ({reason}); use "
                           "--pretrained none for random init, or --pretrained PATH with a local "
                           "file") from None


def _module_names(keys):
    """Tensor names → their modules, in order: roi_head.bbox_head.fc_cls.{weight,bias} → one name."""
    return list(dict.fromkeys(key.rsplit(".", 1)[0] for key in keys))


def _tensors(path, mmap=False):
    """The tensors of a checkpoint file (its state_dict, or the dict itself), as plain data."""
    import torch

    checkpoints.allow_mmengine_checkpoints()  # COCO checkpoints and MMEngine training states: plain data
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--pretrained {path}: cannot be read as plain weights ({first}); use auto, none or "
                        "another checkpoint") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"--pretrained {path}: holds no state_dict; use auto, none or another checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _fitting(state, own):
    return {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}


def _nothing_fits(path, state):
    return UserError(f"--pretrained {path}: none of its {len(state)} tensors fits this model (another "
                     "architecture?); pass a checkpoint of the same --model, or --pretrained none")


def check_fits(shapes, path):
    """Refuse, before the run starts (and writes anything), a checkpoint of which nothing fits the model, given
    the model's {tensor name: shape} (mmconfig.model_shapes); the file is memory-mapped, not loaded twice."""
    state = _tensors(path, mmap=True)
    if not any(k in shapes and tuple(v.shape) == shapes[k] for k, v in state.items()):
        raise _nothing_fits(path, state)


def load_into(model, path):
    """Load a checkpoint's weights into `model` where names and shapes agree; say in one line what stays
    at random init (the class-dependent layers of a COCO checkpoint, typically)."""
    name = os.path.basename(path)
    state = _tensors(path)
    own = model.state_dict()
    fits = _fitting(state, own)
    if not fits:
        raise _nothing_fits(path, state)
    model.load_state_dict(fits, strict=False)
    left = [k for k in own if k not in fits and not k.endswith("num_batches_tracked")]
    reshaped = [k for k in left if k in state]
    absent = [k for k in left if k not in state]
    unused = [k for k in state if k not in own]
    random = []
    if reshaped:
        random.append(f"{', '.join(_module_names(reshaped))} (other shape in the checkpoint)")
    if absent:
        names = _module_names(absent)
        random.append(f"{', '.join(names[:8])}{' …' if len(names) > 8 else ''} (not in the checkpoint)")
    log.info("pretrained %s: loaded %d of %d tensors%s%s", name, len(fits), len(own),
             f"; left at random init: {'; '.join(random)}" if random else "",
             f"; {len(unused)} checkpoint tensors unused" if unused else "")


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


def resolve(pretrained, base_config):
    """`--pretrained` → a local checkpoint path (downloaded or staged when needed), or None."""
    return fetch(locate(pretrained, base_config))
