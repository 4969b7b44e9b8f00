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
            # torch.save writes <name>/data.pkl (the pickle) beside the tensors; any other zip is not a checkpoint.
            return archive.testzip() is None and any(n.endswith("/data.pkl") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _read(path, flag, fix):
    """torch.load with weights_only=True; every way a foreign file fails becomes one UserError line."""
    if not os.path.isfile(path):
        raise UserError(f"{flag}: file not found; {fix}")
    if not intact(path):
        raise UserError(f"{flag}: not a readable torch checkpoint (truncated, or not a .pth file); {fix}")
    import torch  # after the cheap checks: importing torch alone takes a second

    allow_mmengine_checkpoints()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported global" in line or "refusing" in line), lines[0] if lines
                   else "")
        raise UserError(f"{flag}: not a plain weights file: it holds objects that are not plain data "
                        f"({why[:160]}); {fix}") from None
    except Exception as err:  # noqa: BLE001 - a zip that is not a torch archive, a foreign pickle protocol
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{flag}: not a torch checkpoint ({first}); {fix}") from None


def state_dict_of(ckpt, flag, fix):
    """The tensors of a loaded checkpoint: its `state_dict`, or the dict itself when it is one."""
    import torch

    if not isinstance(ckpt, dict):
        raise UserError(f"{flag}: holds a {type(ckpt).__name__}, not a model checkpoint (a dict with a "
                        f"state_dict); {fix}")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag}: holds no state_dict of tensors (not a model checkpoint); {fix}")
    return state


def head_classes(state):
    """How many classes the detection head of these tensors predicts (None when they have no such head):
    Faster/Mask R-CNN's classifier has one row per class plus the background."""
    for key, value in state.items():
        if key.endswith("bbox_head.fc_cls.weight") and value.dim() == 2:
            return int(value.shape[0]) - 1
    return None


def check_head(state, classes, flag, fix):
    found = head_classes(state)
    if found is not None and found != len(classes):
        raise UserError(f"{flag}: its head predicts {found} classes but the label file lists {len(classes)}; {fix}")


def load_weights(path, shown_as=None):
    """Open a weights file someone hands us: tensors and plain data only (cvtk-job's weights, or an MMEngine
    training checkpoint such as upstream cvtk's X.pth, whose extra state is allow-listed plain data)."""
    flag = shown_as or path
    fix = "pass the .pth written by cvtk-job train"
    weights = _read(path, flag, fix)
    if not isinstance(weights, dict) or not isinstance(weights.get("state_dict"), dict):
        state_dict_of(weights, flag, fix)  # says what the file holds instead
        raise UserError(f"{flag}: holds bare tensors without the model's metadata; {fix}")
    state_dict_of(weights, flag, fix)
    if not isinstance(weights.get("meta", {}), dict):
        weights["meta"] = {}
    weights.setdefault("meta", {})
    return weights


def check_resumable(path, task, classes):
    """Refuse, before anything is written, a `--resume` file that cannot continue this run.

    Three mistakes are common: the final weights file (no optimizer state), a checkpoint of the other
    task (a box-only model for a mask run or the reverse), and one trained on other classes.
    """
    flag = f"--resume {path}"
    fix = "use auto, none or an epoch_N.pth from the run's workspace"
    ckpt = _read(path, flag, fix)
    state = state_dict_of(ckpt, flag, fix)
    if "optimizer" not in ckpt:
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
    check_head(state, classes, flag, "resume with the run's label file or start over with --resume none")
