"""mmdet's MaxIoUAssigner without a host-device synchronisation per object.

Its low-quality matching (on in Mask R-CNN's and Faster R-CNN's RPN and R-CNN assigners) walks the ground-truth
objects in a Python loop and tests each one's best IoU on the host (`if gt_max_overlaps[i] >= min_pos_iou`):
on a GPU every object of every image costs a synchronisation and a few tiny kernels, twice per training step
(RPN, then R-CNN). With 100 objects per image and 8 images a step that is ~1,600 waits in which the GPU runs
dry (issue 18: mixed precision gave only 1.14x). `CvtkMaxIoUAssigner` gives exactly the same assignment
with a few whole-tensor operations: the objects are visited in order and a later one overwrites an earlier one,
so each prior ends with the *last* object that claims it, which is what is computed below.

`mmconfig` swaps the type in the training config (the dumped config's hooks are cvtk-job's too); inference
builds no assigner.
"""

import torch
from mmdet.models.task_modules.assigners import MaxIoUAssigner
from mmdet.registry import TASK_UTILS


@TASK_UTILS.register_module()
class CvtkMaxIoUAssigner(MaxIoUAssigner):
    def assign_wrt_overlaps(self, overlaps, gt_labels):
        if not self.match_low_quality:
            return super().assign_wrt_overlaps(overlaps, gt_labels)
        # Steps 1-3 (negatives, positives) are mmdet's own; only the per-object loop of step 4 is replaced.
        self.match_low_quality = False
        try:
            result = super().assign_wrt_overlaps(overlaps, gt_labels)
        finally:
            self.match_low_quality = True
        num_gts, num_priors = overlaps.shape
        if num_gts == 0 or num_priors == 0:
            return result
        gt_max, gt_argmax = overlaps.max(dim=1)
        eligible = gt_max >= self.min_pos_iou
        if self.gt_max_assign_all:
            # Every prior at an object's best IoU is claimed by it; the last claiming object wins.
            claims = (overlaps == gt_max[:, None]) & eligible[:, None]
            claimed = claims.any(dim=0)
            last = num_gts - 1 - claims.flip(0).to(torch.uint8).argmax(dim=0)
        else:
            # Each eligible object claims its one best prior; the last claiming object wins.
            order = torch.arange(1, num_gts + 1, device=overlaps.device)
            best = torch.zeros(num_priors, dtype=torch.long, device=overlaps.device)
            best = best.scatter_reduce(0, gt_argmax, torch.where(eligible, order, 0), reduce="amax")
            claimed, last = best > 0, best - 1
        gt_inds = torch.where(claimed, last + 1, result.gt_inds)
        result.gt_inds = gt_inds
        result.labels = torch.where(gt_inds > 0, gt_labels[(gt_inds - 1).clamp(min=0)], gt_inds.new_full((), -1))
        return result
