"""mmdet's StandardRoIHead with the sampler's counts read once per training step, not once per image.

mmdet's `StandardRoIHead.loss` assigns and samples one image at a time, and sampling needs the numbers of positive
and negative proposals on the host (how many to draw, the size of the random permutation): on a GPU a wait per
image. `CvtkStandardRoIHead.loss` assigns every image first, reads all the counts at once
(`CvtkRandomSampler.sample_counts`) and then samples each image with mmdet's code in mmdet's order, so the same
random permutations are drawn and the losses are mmdet's, bit for bit (tests/unit/test_roi_head.py).

On the CPU, or with another sampler than `CvtkRandomSampler`, mmdet's loop runs. Swapped in where the training
model is built (`mmconfig.use_training_modules`); the written config keeps mmdet's name.
"""

from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.utils import unpack_gt_instances
from mmdet.registry import MODELS

from .assigner import CvtkRandomSampler


@MODELS.register_module()
class CvtkStandardRoIHead(StandardRoIHead):
    def loss(self, x, rpn_results_list, batch_data_samples):
        if not (isinstance(self.bbox_sampler, CvtkRandomSampler) and rpn_results_list
                and self.bbox_sampler.vectorized(rpn_results_list[0].bboxes)):
            return super().loss(x, rpn_results_list, batch_data_samples)
        assert len(rpn_results_list) == len(batch_data_samples)
        batch_gt_instances, batch_gt_instances_ignore, _ = unpack_gt_instances(batch_data_samples)
        assigned = []
        for rpn_results, gt, ignore in zip(rpn_results_list, batch_gt_instances, batch_gt_instances_ignore,
                                           strict=True):
            rpn_results.priors = rpn_results.pop("bboxes")
            assigned.append(self.bbox_assigner.assign(rpn_results, gt, ignore))
        counts = self.bbox_sampler.sample_counts(assigned)
        sampling_results = [
            self.bbox_sampler.sample(assign_result, rpn_results, gt, counts=n, feats=[lvl[i][None] for lvl in x])
            for i, (assign_result, rpn_results, gt, n) in enumerate(zip(assigned, rpn_results_list,
                                                                       batch_gt_instances, counts, strict=True))]
        # mmdet's StandardRoIHead.loss from here.
        losses = {}
        if self.with_bbox:
            bbox_results = self.bbox_loss(x, sampling_results)
            losses.update(bbox_results["loss_bbox"])
        if self.with_mask:
            mask_results = self.mask_loss(x, sampling_results, bbox_results["bbox_feats"], batch_gt_instances)
            losses.update(mask_results["loss_mask"])
        return losses
