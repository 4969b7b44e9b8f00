"""`cvtk-job doctor`: show the stack and prove it can train (mmcv's compiled ops actually run)."""

import importlib
import importlib.metadata
import platform
import sys

from ..errors import SetupError

# import name → distribution name
PACKAGES = {"torch": "torch", "mmcv": "mmcv", "mmengine": "mmengine", "mmdet": "mmdet",
            "pycocotools": "pycocotools", "numpy": "numpy", "boto3": "boto3", "matplotlib": "matplotlib"}


def _version(module_name):
    try:
        importlib.import_module(module_name)
        return importlib.metadata.version(PACKAGES[module_name])
    except Exception as err:  # noqa: BLE001 - any import failure is the finding we report
        raise SetupError(f"cannot import {module_name} ({type(err).__name__}: {err}); "
                         "run `make setup` or reinstall the image") from None


def _check_mmcv_ops(device):
    """Run two compiled ops; a CPU-only or mismatched mmcv build fails here, not mid-training.

    On a GPU machine the ops run on the GPU too: an mmcv built without CUDA ops imports and runs on the
    CPU, then fails at the first CUDA RoIAlign of a training run ("not compiled with GPU support").
    """
    import torch

    try:
        from mmcv.ops import RoIAlign, nms
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]],
                             device=device)
        scores = torch.tensor([0.9, 0.8, 0.7], device=device)
        _, keep = nms(boxes, scores, iou_threshold=0.5)
        rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]], device=device)
        pooled = RoIAlign((2, 2), 1.0, 0)(torch.ones(1, 1, 8, 8, device=device), rois)
    except Exception as err:  # noqa: BLE001
        build = "with CUDA ops (FORCE_CUDA=1; the image does)" if device == "cuda" else "with MMCV_WITH_OPS=1"
        raise SetupError(f"mmcv's compiled ops do not run on {device} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); rebuild mmcv {build}") from None
    if keep.tolist() != [0, 2] or tuple(pooled.shape) != (1, 1, 2, 2):
        raise SetupError(f"mmcv ops gave wrong results on {device} (nms kept {keep.tolist()}); rebuild mmcv")
    return f"nms, RoIAlign ok on {device}"


def run(opts):
    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    for name in PACKAGES:
        rows.append((name, _version(name)))
    import torch

    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("cuda", f"{torch.version.cuda} ({torch.cuda.device_count()} GPU: {gpus})"))
    else:
        rows.append(("cuda", f"not available (torch CUDA build: {torch.version.cuda}); runs on CPU"))
    rows.append(("mmcv ops", _check_mmcv_ops("cpu")))
    if torch.cuda.is_available():
        rows.append(("mmcv ops", _check_mmcv_ops("cuda")))
    for key, value in rows:
        print(f"{key:<12} {value}", file=sys.stdout)
