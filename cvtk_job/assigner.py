"""mmdet's MaxIoUAssigner and RandomSampler without host-device synchronisations.

Its low-quality matching (on in Mask R-CNN's and Faster R-CNN's RPN and R-CNN assigners) walks the ground-truth
objects in a Python loop and tests each one's best IoU on the host (`if gt_max_overlaps[i] >= min_pos_iou`):
on a GPU every object of every image costs a synchronisation and a few tiny kernels, twice per training step
(RPN, then R-CNN). With 100 objects per image and 8 images a step that is ~1,600 waits in which the GPU runs
dry (issue 18: mixed precision gave only 1.14x). `CvtkMaxIoUAssigner` gives exactly the same assignment
with a few whole-tensor operations: the objects are visited in order and a later one overwrites an earlier one,
so each prior ends with the *last* object that claims it, which is what `low_quality_matches` computes. Its
other steps (negatives, positives, labels) index by boolean masks, one more wait each (`torch.where` needs
none). On the CPU (no synchronisation to save; also mmdet's dense-image fallback, `gpu_assign_thr`) mmdet's
loop runs.

`CvtkRandomSampler` reads the numbers of positives and negatives once where mmdet's sampler waits four times
per image and stage (two `nonzero`, two `unique`), and samples exactly what it samples (the same random
permutations, the same sorted indices): bench/step_syncs.py counts both.

Used where the training model is built (`mmhooks.CvtkRunner.build_model`, `autobatch`, through
`mmconfig.use_training_modules`); the written config keeps mmdet's names.
"""

import torch
from mmdet.models.task_modules.assigners import AssignResult, MaxIoUAssigner
from mmdet.models.task_modules.samplers import RandomSampler, SamplingResult
from mmdet.registry import TASK_UTILS
from mmdet.structures.bbox import BaseBoxes, cat_boxes
from mmengine.structures import InstanceData


@TASK_UTILS.register_module()
class CvtkMaxIoUAssigner(MaxIoUAssigner):
    _outside = None  # during `assign` with an `inside` mask: the priors to leave out

    def assign(self, pred_instances, gt_instances, gt_instances_ignore=None, **kwargs):
        """mmdet's; where `pred_instances` has an `inside` mask (CvtkRPNHead: all anchors, not only those in the
        image) the priors outside it are left unassigned (-1), and the others get what they would get alone: the
        outside ones' IoUs read as -1, below every threshold and every object's best IoU."""
        if "inside" not in pred_instances:
            return super().assign(pred_instances, gt_instances, gt_instances_ignore, **kwargs)
        outside = ~pred_instances.inside
        self._outside = outside
        try:
            result = super().assign(InstanceData(priors=pred_instances.priors), gt_instances, gt_instances_ignore,
                                    **kwargs)
        finally:
            self._outside = None
        # (With no objects mmdet makes every prior a negative without looking at the IoUs.)
        result.gt_inds = result.gt_inds.masked_fill(outside, -1)
        if result.labels is not None:
            result.labels = result.labels.masked_fill(outside, -1)
        return result

    def assign_wrt_overlaps(self, overlaps, gt_labels):
        if self._outside is not None:  # (on the CPU when gpu_assign_thr moved the matrix there)
            overlaps = overlaps.masked_fill(self._outside.to(overlaps.device), -1)
        num_gts, num_priors = overlaps.shape
        if not self.vectorized(overlaps) or not num_gts or not num_priors:
            return super().assign_wrt_overlaps(overlaps, gt_labels)  # (nothing to match: no waits either)
        # mmdet's steps, each on the whole vector: 1. unassigned (-1), 2. negatives (0), 3. positives (object + 1).
        max_overlaps, argmax_overlaps = overlaps.max(dim=0)
        gt_inds = overlaps.new_full((num_priors,), -1, dtype=torch.long)
        neg = self.neg_iou_thr
        if isinstance(neg, float):
            gt_inds = torch.where((max_overlaps >= 0) & (max_overlaps < neg), 0, gt_inds)
        elif isinstance(neg, tuple):
            assert len(neg) == 2
            gt_inds = torch.where((max_overlaps >= neg[0]) & (max_overlaps < neg[1]), 0, gt_inds)
        gt_inds = torch.where(max_overlaps >= self.pos_iou_thr, argmax_overlaps + 1, gt_inds)
        # 4. each object claims the priors at its best IoU (low-quality matching).
        if self.match_low_quality:
            gt_inds = low_quality_matches(overlaps, gt_inds, self.min_pos_iou, self.gt_max_assign_all)
        labels = torch.where(gt_inds > 0, gt_labels[(gt_inds - 1).clamp(min=0)], gt_inds.new_full((), -1))
        return AssignResult(num_gts=num_gts, gt_inds=gt_inds, max_overlaps=max_overlaps, labels=labels)

    @staticmethod
    def vectorized(overlaps):
        """On a GPU the loop's waits are what costs; on the CPU there are none, and the loop, one row at a time
        in cache, was ~2x faster than the whole-matrix operations (bench/run.py --only step_waits)."""
        return overlaps.device.type != "cpu"


@TASK_UTILS.register_module()
class CvtkRandomSampler(RandomSampler):
    """mmdet's RandomSampler with one host read per call (the two counts) instead of four, or none where the
    caller read the counts of several images at once (`counts`: `sample_counts`'s for this assignment)."""

    def sample(self, assign_result, pred_instances, gt_instances, counts=None, **kwargs):
        if not self.vectorized(assign_result.gt_inds):
            return super().sample(assign_result, pred_instances, gt_instances, **kwargs)
        # mmdet's BaseSampler.sample, with the same priors, ground-truth proposals and flags.
        gt_bboxes, priors, gt_labels = gt_instances.bboxes, pred_instances.priors, gt_instances.labels
        if len(priors.shape) < 2:
            priors = priors[None, :]
        gt_flags = priors.new_zeros((priors.shape[0],), dtype=torch.uint8)
        added = 0
        if self.add_gt_as_proposals and len(gt_bboxes) > 0:
            as_priors = gt_bboxes.convert_to(type(priors)) if isinstance(gt_bboxes, BaseBoxes) and \
                isinstance(priors, BaseBoxes) else gt_bboxes
            priors = cat_boxes([as_priors, priors], dim=0)
            assign_result.add_gt_(gt_labels)  # the objects first, each a positive of itself
            added = as_priors.shape[0]
            gt_flags = torch.cat([priors.new_ones(added, dtype=torch.uint8), gt_flags])
        positive, negative = assign_result.gt_inds > 0, assign_result.gt_inds == 0
        if counts is None:
            num_pos, num_neg = torch.stack([positive.sum(), negative.sum()]).tolist()  # the one wait
        else:
            num_pos, num_neg = counts[0] + added, counts[1]
        pos_inds = self._choose(positive, num_pos, int(self.num * self.pos_fraction))
        num_expected_neg = self.num - len(pos_inds)
        if self.neg_pos_ub >= 0:
            num_expected_neg = min(num_expected_neg, int(self.neg_pos_ub * max(1, len(pos_inds))))
        neg_inds = self._choose(negative, num_neg, num_expected_neg)
        return SamplingResult(pos_inds=pos_inds, neg_inds=neg_inds, priors=priors, gt_bboxes=gt_bboxes,
                              assign_result=assign_result, gt_flags=gt_flags)

    def sample_counts(self, assign_results):
        """The numbers of positives and negatives of each assignment, as `sample(counts=)` takes them: one host
        read for all (several images' samplers would wait once each). None where `sample` keeps mmdet's code."""
        if not assign_results or not all(self.vectorized(r.gt_inds) for r in assign_results):
            return None
        counts = torch.stack([torch.stack([(r.gt_inds > 0).sum(), (r.gt_inds == 0).sum()]) for r in assign_results])
        return [tuple(c) for c in counts.tolist()]

    @staticmethod
    def _choose(mask, count, num_expected):
        """mmdet's `_sample_*` then `unique()`: the indices where `mask` holds (`count` of them), at most
        `num_expected` chosen by the same CPU permutation mmdet draws, ascending."""
        # A stable sort puts the True entries first, in order: nonzero's result, without reading its size.
        inds = torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]
        if count > num_expected:
            inds = inds[torch.randperm(count)[:num_expected].to(device=inds.device)]
        return torch.sort(inds).values  # the indices are distinct: unique() is a sort

    @staticmethod
    def vectorized(gt_inds):
        return gt_inds.device.type != "cpu"


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
