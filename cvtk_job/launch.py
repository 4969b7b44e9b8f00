"""Where a job runs: the device (and, with the clusters issue, the torch.distributed context)."""

import os

from .errors import UserError


def select_device(requested):
    """`--device auto|cpu|cuda` → "cpu" or "cuda"; call before anything imports torch for `cpu`."""
    if requested == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # mmengine picks the device itself: hide the GPUs
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or run on a GPU node")
    return "cpu"
