"""mmdet's MaxIoUAssigner without a host-device synchronisation per object.

Its low-quality matching (on in Mask R-CNN's and Faster R-CNN's RPN and R-CNN assigners) walks the ground-truth
objects in a Python loop and tests each one's best IoU on the host (`if gt_max_overlaps[i] >= min_pos_iou`):
on a GPU every object of every image costs a synchronisation and a few tiny kernels, twice per training step
(RPN, then R-CNN). With 100 objects per image and 8 images a step that is ~1,600 waits in which the GPU runs
dry (issue 18: mixed precision gave only 1.14x). `CvtkMaxIoUAssigner` gives exactly the same assignment
with a few whole-tensor operations: the objects are visited in order and a later one overwrites an earlier one,
so each prior ends with the *last* object that claims it, which is what `low_quality_matches` computes. On the
CPU (no synchronisation to save; also mmdet's dense-image fallback, `gpu_assign_thr`) mmdet's loop runs.

Used where the training model is built (`mmhooks.CvtkRunner.build_model`, `autobatch`, through
`mmconfig.use_sync_free_assigners`); the written config keeps mmdet's name.
"""

import torch
from mmdet.models.task_modules.assigners import MaxIoUAssigner
from mmdet.registry import TASK_UTILS


@TASK_UTILS.register_module()
class CvtkMaxIoUAssigner(MaxIoUAssigner):
    def assign_wrt_overlaps(self, overlaps, gt_labels):
        if not self.match_low_quality or not self.vectorized(overlaps):
            return super().assign_wrt_overlaps(overlaps, gt_labels)
        # Steps 1-3 (negatives, positives) are mmdet's own; only the per-object loop of step 4 is replaced.
        self.match_low_quality = False
        try:
            result = super().assign_wrt_overlaps(overlaps, gt_labels)
        finally:
            self.match_low_quality = True
        if overlaps.shape[0] and overlaps.shape[1]:
            result.gt_inds = low_quality_matches(overlaps, result.gt_inds, self.min_pos_iou, self.gt_max_assign_all)
            gt_inds = result.gt_inds
            result.labels = torch.where(gt_inds > 0, gt_labels[(gt_inds - 1).clamp(min=0)], gt_inds.new_full((), -1))
        return result

    @staticmethod
    def vectorized(overlaps):
        """On a GPU the loop's waits are what costs; on the CPU there are none, and the loop, one row at a time
        in cache, was ~2x faster than the whole-matrix operations (bench/run.py --only step_waits)."""
        return overlaps.device.type != "cpu"


def low_quality_matches(overlaps, gt_inds, min_pos_iou, gt_max_assign_all):
    """mmdet's step 4 (each object claims the priors at its best IoU when that IoU reaches min_pos_iou, objects in
    order, a later one overwriting an earlier one) on the whole (objects, priors) matrix at once: gt_inds updated."""
    num_gts, num_priors = overlaps.shape
    gt_max, gt_argmax = overlaps.max(dim=1)
    eligible = gt_max >= min_pos_iou
    # Object numbers (1-based) in the narrowest type that holds them: the matrix below is objects x priors.
    kind = torch.int16 if num_gts < 2**15 else torch.int32
    order = torch.arange(1, num_gts + 1, device=overlaps.device, dtype=kind)
    if gt_max_assign_all:
        claims = (overlaps == gt_max[:, None]) & eligible[:, None]
        last = torch.where(claims, order[:, None], torch.zeros((), dtype=kind, device=overlaps.device)).amax(dim=0)
    else:
        # One value per prior (no matrix): int64, the type every device's scatter_reduce amax supports.
        order = order.long()
        last = torch.zeros(num_priors, dtype=torch.long, device=overlaps.device)
        last = last.scatter_reduce(0, gt_argmax, torch.where(eligible, order, 0), reduce="amax")
    return torch.where(last > 0, last.to(gt_inds.dtype), gt_inds)
