"""Loading and saving model files safely under torch >= 2.6 (`weights_only=True` by default).

mmengine 0.10.7 calls `torch.load` without `weights_only`, so its own training checkpoints (which
hold a MessageHub with HistoryBuffers and numpy scalars) fail to load. Instead of switching the
check off for every file (`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`, which lets a file from a stranger
run code), we allow-list exactly the plain-data classes those checkpoints contain.

One of them is not plain data: a HistoryBuffer pickles its statistics methods as
`getattr(HistoryBuffer, "mean")`. Allowing `builtins.getattr` itself would reopen the door (getattr
walks to any attribute), so `builtins.getattr` is mapped to a getattr that only answers for those
HistoryBuffer methods. The weights file we hand to users holds only tensors and plain metadata, so
it loads with the strict default.
"""

import os
import pickle

from .artifacts import atomic_path
from .errors import UserError

# HistoryBuffer's built-in statistics (it registers them lazily, on its first instance).
STATISTICS = {"min", "max", "current", "mean"}


def allow_mmengine_checkpoints():
    """Allow-list the data-only classes found in mmengine training checkpoints (idempotent)."""
    import numpy as np
    import torch
    from mmengine.logging.history_buffer import HistoryBuffer

    def history_buffer_method(owner, name):
        if owner is HistoryBuffer and name in STATISTICS | set(HistoryBuffer._statistics_methods):
            return getattr(owner, name)
        raise pickle.UnpicklingError(f"refusing getattr({owner!r}, {name!r}) in a checkpoint")

    dtype_classes = {type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)}
    torch.serialization.add_safe_globals([
        HistoryBuffer, (history_buffer_method, "builtins.getattr"),
        np.core.multiarray._reconstruct, np.core.multiarray.scalar, np.ndarray, np.dtype,
        *dtype_classes,
    ])


def save_weights(path, model, meta):
    """Model weights + plain metadata, written atomically; loadable with weights_only=True."""
    import torch

    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"meta": meta, "state_dict": state}, tmp)


def intact(path):
    """A torch checkpoint is a zip file: a truncated, torn or foreign one has no readable central directory."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def load_weights(path):
    """Open a weights file someone hands us: tensors and plain data only (cvtk-job's weights, or an MMEngine
    training checkpoint such as upstream cvtk's X.pth, whose extra state is allow-listed plain data)."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"{path}: weights file not found; pass the .pth written by train")
    if not intact(path):
        raise UserError(f"{path}: not a readable torch checkpoint (truncated, or not a .pth file); pass the .pth "
                        "written by cvtk-job train")
    allow_mmengine_checkpoints()
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: not a plain weights file ({first}); use the .pth written by "
                        "cvtk-job train") from None
    if not isinstance(weights, dict) or not isinstance(weights.get("state_dict"), dict):
        raise UserError(f"{path}: holds no state_dict (not a model checkpoint); use the .pth written by "
                        "cvtk-job train")
    if not isinstance(weights.get("meta", {}), dict):
        weights["meta"] = {}
    weights.setdefault("meta", {})
    return weights


def check_resumable(path, task, classes):
    """Refuse, before anything is written, a `--resume` file that cannot continue this run.

    Three mistakes are common: the final weights file (no optimizer state), a checkpoint of the other
    task (a box-only model for a mask run or the reverse), and one trained on other classes.
    """
    import torch

    flag = f"--resume {path}"
    if not intact(path):
        raise UserError(f"{flag}: not a readable torch checkpoint (truncated, or not a .pth file); use auto, "
                        "none or an epoch_N.pth from the run's workspace")
    allow_mmengine_checkpoints()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{flag}: holds objects that are not plain data ({str(err).strip().splitlines()[0]}); "
                        "use an epoch_N.pth written by cvtk-job train") from None
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    if not state or "optimizer" not in ckpt:
        raise UserError(f"{flag}: holds weights only, not a training state (optimizer, epoch); to continue a run "
                        "use --resume auto or its workspace's epoch_N.pth, to start from these weights use "
                        "--pretrained")
    has_masks = any(".mask_head." in key for key in state)
    if has_masks != (task == "segm"):
        found, other = ("segm", "a mask") if has_masks else ("det", "a box-only")
        raise UserError(f"{flag}: is {other} model (task {found}) but this run is --task {task}; pass --task "
                        f"{found} or a checkpoint of a {task} run")
    saved = (ckpt.get("meta") or {}).get("dataset_meta", {}).get("classes")
    if saved is not None and list(saved) != list(classes):
        raise UserError(f"{flag}: was trained on classes {list(saved)} but the label file lists {list(classes)}; "
                        "resume with the run's label file or start over with --resume none")
