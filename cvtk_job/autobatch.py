"""`train --batch_size auto`: the largest batch per process that fits the GPU, measured rather than guessed.

Rank 0 builds the model and the real optimizer wrapper (the run's precision), and runs real training steps on
copies of the densest training image (the most objects: mmdet's assignment and mask targets grow with them),
padded to the largest batch tensor the training images can make (a batch is padded to its tallest and its
widest image: a portrait and a landscape photo together make a square), reading the peak of CUDA memory after
each: at 1 and 2 images the two peaks fix a line (fixed + per image), the line gives the largest batch under
SHARE of the memory free at the start, and steps at that batch check it (refitting the slope where memory grows
faster than the line). The choice is broadcast, so every rank of a torchrun/srun job trains with it; the
learning rate follows from the global batch as for a given batch.
Ultralytics' AutoBatch fits a curve the same way but works on one GPU only.

A resumed run keeps the batch of the checkpoint it resumes (its schedule was laid out for that batch).

Test hook (documented in the README): CVTK_JOB_TEST_MEMORY_PROBE="FIXED_MIB,PER_IMAGE_MIB,FREE_MIB" replaces
the CUDA memory readings (not the steps, which still run, on any device) with that linear model; a step whose
modelled peak exceeds the free memory counts as out of memory.
"""

import logging
import os

log = logging.getLogger(__name__)

SHARE = 0.85  # of the free memory: the rest absorbs fragmentation and the variation between batches
PROBE_HOOK = "CVTK_JOB_TEST_MEMORY_PROBE"
MAX_CHECKS = 6  # steps spent checking predictions beyond the first two measurements


def choose(peak, free, limit, share=SHARE):
    """The batch: `peak(b)` gives the peak bytes of a training step of b images, or None when it ran out of
    memory; `free` the free bytes; `limit` the most images a batch can hold. Returns (batch, measured {b: peak})."""
    budget = share * free
    measured = {1: peak(1)}
    if measured[1] is None or measured[1] > budget or limit < 2:
        return 1, measured  # one image is all there is room for (the OOM back-off then splits no further)
    measured[2] = peak(2)
    if measured[2] is None or measured[2] > budget:
        return 1, measured
    # The line through 1 and 2 images predicts; real steps check. Memory can grow faster than that line (mask
    # targets, assignment): each check refits the slope through the largest batch known to fit (a secant), and a
    # step that ran out of memory without a reading halves the gap.
    lo, hi = 2, limit + 1  # lo fits; hi does not (or is beyond the data)
    slope = max(measured[2] - measured[1], 1)
    candidate = min(hi - 1, lo + int((budget - measured[lo]) // slope))
    for _ in range(MAX_CHECKS):
        if candidate <= lo:
            break
        value = measured[candidate] = peak(candidate)
        if value is not None:
            slope = max((value - measured[lo]) / (candidate - lo), 1)
        if value is not None and value <= budget:
            lo = candidate
            candidate = min(hi - 1, lo + int((budget - measured[lo]) // slope))
        else:
            hi = candidate
            candidate = lo + int((budget - measured[lo]) // slope) if value is not None else (lo + hi) // 2
            candidate = min(hi - 1, candidate)
    return lo, measured


def _modelled():
    """The test hook's linear memory model, as (peak(b) in bytes, free bytes), or None."""
    value = os.environ.get(PROBE_HOOK)
    if not value:
        return None
    fixed, per_image, free = (float(v) * 2**20 for v in value.split(","))
    return (lambda b: fixed + b * per_image), free


class _Stepper:
    """Real training steps of b copies of the densest training image, on a model built for it alone."""

    def __init__(self, cfg, device):
        import copy

        from mmengine.optim import build_optim_wrapper
        from mmengine.registry import DATASETS, MODELS

        self.device = device
        cfg = copy.deepcopy(cfg)
        dataset = DATASETS.build(cfg.train_dataloader.dataset)
        infos = [dataset.get_data_info(i) for i in range(len(dataset))]
        counts = [len(info["instances"]) for info in infos]
        self.index = max(range(len(counts)), key=counts.__getitem__)
        self.objects = counts[self.index]
        self.sample = dataset[self.index]
        self.input_size = _largest_input(dataset, infos, self.sample)
        self.sample = _padded(self.sample, self.input_size)
        from . import masktargets, mmconfig

        mmconfig.use_training_modules(cfg.model)  # the model the run trains (mmhooks.CvtkRunner.build_model)
        self.model = MODELS.build(cfg.model).to(device)
        masktargets.install(self.model)
        self.model.train()
        self.optim = build_optim_wrapper(self.model, cfg.optim_wrapper)

    def __call__(self, batch):
        """Run one step; True when it ran, False when it ran out of memory."""
        import torch
        from mmengine.dataset import pseudo_collate

        try:
            self.model.train_step(pseudo_collate([self.sample] * batch), optim_wrapper=self.optim)
            if self.device == "cuda":
                torch.cuda.synchronize()
            return True
        except torch.OutOfMemoryError:
            from .mmhooks import forget_unfinished_step

            forget_unfinished_step(self.optim)  # else the next probe's step may fail on GradScaler's stale record
            return False
        finally:
            self.optim.zero_grad()
            if self.device == "cuda":
                torch.cuda.empty_cache()


def _largest_input(dataset, infos, sample):
    """(height, width) of the largest batch tensor training can give: a batch is padded to its tallest and its
    widest image, so a portrait and a landscape photo in one batch make a square of their long sides. The
    pipeline itself says what size each image becomes (resizing to a scale or by a factor, with or without its
    aspect ratio): it runs on the images that reach the extremes (the tallest and the widest shape, the largest
    height and width), read through the pipeline like any training image. A pipeline that resizes at random
    (multi-scale training) is drawn once per image here; a larger draw later is what the OOM back-off is for."""
    def pick(key):
        return max(range(len(infos)), key=lambda i: key(infos[i]))

    extremes = {pick(lambda d: d["height"] / d["width"]), pick(lambda d: d["width"] / d["height"]),
                pick(lambda d: d["height"]), pick(lambda d: d["width"])}
    shapes = [tuple(sample["inputs"].shape[-2:])] + [tuple(dataset[i]["inputs"].shape[-2:]) for i in sorted(extremes)]
    return max(h for h, _ in shapes), max(w for _, w in shapes)


def _padded(sample, size):
    """The sample with its image padded (bottom and right, as the data preprocessor pads a batch) to `size`:
    the densest image in a batch with the largest one. Its masks are padded by the model's data preprocessor."""
    import torch

    image = sample["inputs"]
    if tuple(image.shape[-2:]) == tuple(size):
        return sample
    padded = torch.zeros((*image.shape[:-2], *size), dtype=image.dtype)
    padded[..., :image.shape[-2], :image.shape[-1]] = image
    return {**sample, "inputs": padded}


def measure(cfg, device, limit):
    """Rank 0's choice: (batch, details for the log and the weights' metadata)."""
    import torch

    modelled = _modelled()
    if device == "cuda" and modelled is None:
        free, _ = torch.cuda.mem_get_info()
    stepper = _Stepper(cfg, device)

    def peak(batch):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ran = stepper(batch)
        if modelled is not None:
            value = modelled[0](batch)
            return value if ran and value <= modelled[1] else None
        return torch.cuda.max_memory_allocated() if ran else None

    batch, measured = choose(peak, modelled[1] if modelled else free, limit)
    details = {"batch_size": batch, "share": SHARE, "free_mib": round((modelled[1] if modelled else free) / 2**20),
               "peak_mib": {str(b): (round(v / 2**20) if v is not None else "out of memory")
                            for b, v in sorted(measured.items())},
               "densest_image_objects": stepper.objects, "input_size": list(stepper.input_size), "limit": limit}
    stepper.model = stepper.optim = stepper.sample = None  # freed before the real run builds its own
    if device == "cuda":
        torch.cuda.empty_cache()
    return batch, details


def decide(cfg, device, where, limit):
    """The batch every rank trains with: measured by rank 0, broadcast to the others. (batch, details)"""
    details = None
    if where.is_main:
        batch, details = measure(cfg, device, limit)
    if where.distributed:
        import torch.distributed as dist

        box = [details]
        dist.broadcast_object_list(box, src=0)
        details = box[0]
    return details["batch_size"], details


def probing_possible(device):
    return device == "cuda" or bool(os.environ.get(PROBE_HOOK))


def resumed_batch(checkpoint):
    """The batch size the checkpoint's run trained with (from the config MMEngine saved in it, read as data),
    or None when it cannot be read."""
    import torch

    from . import checkpoints, configdata

    try:
        checkpoints.allow_mmengine_checkpoints()
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        text = (ckpt.get("meta") or {}).get("cfg")
        return int(configdata.load(text, checkpoint).train_dataloader.batch_size)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: measure again instead
        log.warning("could not read the batch size of %s (%s); measuring it again", checkpoint, err)
        return None
