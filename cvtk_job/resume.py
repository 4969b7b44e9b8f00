"""Where a training run continues from: `--resume auto|none|PATH`.

`auto` looks for MMEngine's `last_checkpoint` pointer in the run's workspace; on a fresh machine with
outputs on S3 it first brings the last checkpoint and the stats files back from there. A damaged latest
checkpoint (a write cut short) falls back to the newest intact one. An explicit PATH must be a training
state of the same task and classes (checkpoints.check_resumable).
"""

import glob
import logging
import os
import re

from . import artifacts, checkpoints, storage
from .errors import UserError

log = logging.getLogger(__name__)


def resume_point(resume, task, outputs, remote, labels):
    """`--resume auto|none|PATH` → (resume?, checkpoint or None for the workspace's latest).

    `auto` continues when the workspace (local, else on S3) holds an intact checkpoint.
    """
    if resume == "none":
        return False, None
    if resume == "auto":
        pointer = os.path.join(outputs.workspace, "last_checkpoint")
        if remote is not None and not fetch_remote_workspace(outputs, remote):
            # Outputs on S3: the bucket is the truth. A run deleted there starts over, whatever an earlier
            # attempt left in this machine's workspace.
            if os.path.isfile(pointer):
                log.info("no checkpoint under %s: starting over (ignoring this machine's %s)", remote.workspace,
                         pointer)
                os.unlink(pointer)
            return False, None
        if not os.path.isfile(pointer):
            return False, None
        if not usable_checkpoint(outputs.workspace, pointer):
            return False, None
        with open(pointer, encoding="utf-8") as fh:
            checkpoints.check_resumable(fh.read().strip(), task, labels)  # same task and classes, or one line
        return True, None
    path = storage.stage_file(resume)
    if not os.path.isfile(path):
        raise UserError(f"--resume {resume}: checkpoint not found; use auto, none or a .pth path")
    checkpoints.check_resumable(path, task, labels)
    return True, os.path.abspath(path)


def usable_checkpoint(workspace, pointer):
    """Point `last_checkpoint` at the newest intact epoch checkpoint; False when there is none."""
    with open(pointer, encoding="utf-8") as fh:
        latest = fh.read().strip()
    if checkpoints.intact(latest):
        return True
    candidates = sorted(glob.glob(os.path.join(workspace, "epoch_*.pth")),
                        key=lambda p: int(re.search(r"epoch_(\d+)\.pth$", p).group(1)), reverse=True)
    for candidate in candidates:
        if os.path.abspath(candidate) != os.path.abspath(latest) and checkpoints.intact(candidate):
            log.warning("the latest checkpoint %s is damaged; resuming from %s instead", latest, candidate)
            artifacts.write_text(pointer, os.path.abspath(candidate))
            return True
    log.warning("the latest checkpoint %s is damaged and no earlier one is intact; starting over", latest)
    return False


def fetch_remote_workspace(outputs, remote):
    """Bring the last checkpoint and the stats of an interrupted run back from S3 (unless this machine holds
    the same checkpoint already); False when S3 holds no checkpoint of the run."""
    pointer_uri = storage.join(remote.workspace, "last_checkpoint")
    if not storage.exists(pointer_uri):
        return False
    with open(storage.stage_file(pointer_uri), encoding="utf-8") as fh:
        name = os.path.basename(fh.read().strip())
    local_ckpt = os.path.join(outputs.workspace, name)
    ckpt_uri = storage.join(remote.workspace, name)
    os.makedirs(outputs.workspace, exist_ok=True)
    fetched = not (os.path.isfile(local_ckpt) and os.path.getsize(local_ckpt) == storage.head(ckpt_uri)[0])
    if fetched:
        os.replace(storage.stage_file(ckpt_uri), local_ckpt)
    for local, uri in ((outputs.train_txt, remote.train_txt), (outputs.valid_txt, remote.valid_txt)):
        staged = storage.stage_optional(uri)
        if staged:
            artifacts.write_text(local, open(staged, encoding="utf-8").read())
    # mmengine's pointer holds an absolute path: point it at this machine's copy.
    artifacts.write_text(os.path.join(outputs.workspace, "last_checkpoint"), local_ckpt)
    log.info("resuming from %s (%s)", ckpt_uri, "fetched from S3" if fetched else "the same as this machine's copy")
    return True
