"""mmdet's RPNHead with its training targets built on every anchor, without the host waits of keeping the inside ones.

mmdet's `AnchorHead._get_targets_single` keeps the anchors inside the image (`flat_anchors[inside_flags]`, after an
`inside_flags.any()` check), assigns and samples those, then maps the four target tensors back to all anchors with
`unmap` (`ret[inside_flags] = data`). On a GPU each of those six is a host wait (a boolean index reads its count
back), per image and training step, before a single target exists. `CvtkRPNHead` hands all anchors to the
assigner with the inside mask (`CvtkMaxIoUAssigner` leaves the others unassigned, -1, as if they were not there),
so the sampler draws from the same positives and negatives in the same order with the same random permutation,
and writes the targets straight into tensors of all anchors: mmdet's targets, bit for bit (tests/unit/
test_rpn_head.py), with no host read of its own; mmdet's "no valid anchor" error is checked only when the
sampler found nothing (it knows its counts on the host already). All images are assigned before any is sampled,
so the sampler's counts are read once per step, not once per image (`CvtkRandomSampler.sample_counts`).

On the CPU (no synchronisation to save; the assigner then also keeps mmdet's loop), with another assigner than
`CvtkMaxIoUAssigner`, with box-type anchors or without `unmap_outputs`, mmdet's code runs. Swapped in where the
training model is built (`mmconfig.use_training_modules`); the written config keeps mmdet's name.
"""

import torch
from mmdet.models.dense_heads import RPNHead
from mmdet.models.task_modules.prior_generators import anchor_inside_flags
from mmdet.registry import MODELS
from mmdet.structures.bbox import cat_boxes, get_box_tensor
from mmengine.structures import InstanceData

from .assigner import CvtkMaxIoUAssigner, CvtkRandomSampler


@MODELS.register_module()
class CvtkRPNHead(RPNHead):
    _assigned = None  # during get_targets: each image's (inside mask, assignment, sample counts), in order

    def get_targets(self, anchor_list, valid_flag_list, batch_gt_instances, batch_img_metas,
                    batch_gt_instances_ignore=None, unmap_outputs=True, return_sampling_results=False):
        """mmdet's, with every image assigned first and the sampler's counts read once for all images (mmdet's
        loop assigns and samples one image at a time: a wait per image)."""
        if unmap_outputs and isinstance(self.sampler, CvtkRandomSampler) and anchor_list and \
                self._sync_free(anchor_list[0][0]):
            ignores = batch_gt_instances_ignore or [None] * len(batch_img_metas)
            assigned = [self._assign(cat_boxes(anchors), torch.cat(valid), gt, meta, ignore)
                        for anchors, valid, gt, meta, ignore in zip(anchor_list, valid_flag_list,
                                                                    batch_gt_instances, batch_img_metas, ignores,
                                                                    strict=True)]
            counts = self.sampler.sample_counts([result for _, result in assigned])
            if counts is not None:
                self._assigned = iter([(*a, c) for a, c in zip(assigned, counts, strict=True)])
        try:
            return super().get_targets(anchor_list, valid_flag_list, batch_gt_instances, batch_img_metas,
                                       batch_gt_instances_ignore, unmap_outputs, return_sampling_results)
        finally:
            self._assigned = None

    def _sync_free(self, anchors):
        """Whether this head takes its own way for these anchors (see the module's text), not mmdet's."""
        return isinstance(anchors, torch.Tensor) and self.vectorized(anchors) and \
            isinstance(self.assigner, CvtkMaxIoUAssigner)

    def _assign(self, flat_anchors, valid_flags, gt_instances, img_meta, gt_instances_ignore):
        """(inside mask, assignment of all anchors)."""
        inside = anchor_inside_flags(flat_anchors, valid_flags, img_meta["img_shape"][:2],
                                     self.train_cfg["allowed_border"])
        return inside, self.assigner.assign(InstanceData(priors=flat_anchors, inside=inside), gt_instances,
                                            gt_instances_ignore)

    def _get_targets_single(self, flat_anchors, valid_flags, gt_instances, img_meta, gt_instances_ignore=None,
                            unmap_outputs=True):
        if self._assigned is not None:
            inside, assign_result, counts = next(self._assigned)
        elif unmap_outputs and self._sync_free(flat_anchors):  # (another sampler: each image reads its own)
            (inside, assign_result), counts = self._assign(flat_anchors, valid_flags, gt_instances, img_meta,
                                                           gt_instances_ignore), None
        else:
            return super()._get_targets_single(flat_anchors, valid_flags, gt_instances, img_meta,
                                               gt_instances_ignore, unmap_outputs)
        kwargs = {} if counts is None else {"counts": counts}
        sampling_result = self.sampler.sample(assign_result, InstanceData(priors=flat_anchors), gt_instances,
                                              **kwargs)
        pos_inds, neg_inds = sampling_result.pos_inds, sampling_result.neg_inds
        # Nothing sampled: perhaps no anchor inside (mmdet checks before assigning, with a host read every time).
        if not len(pos_inds) and not len(neg_inds) and not inside.any():
            raise ValueError("There is no valid anchor inside the image boundary. Please check the image size and "
                             "anchor sizes, or set ``allowed_border`` to -1 to skip the condition.")

        # mmdet's targets, written where `unmap` puts them: the anchors outside are background with weight 0.
        num_anchors = flat_anchors.size(0)
        target_dim = gt_instances.bboxes.size(-1) if self.reg_decoded_bbox else self.bbox_coder.encode_size
        bbox_targets = flat_anchors.new_zeros(num_anchors, target_dim)
        bbox_weights = flat_anchors.new_zeros(num_anchors, target_dim)
        labels = flat_anchors.new_full((num_anchors,), self.num_classes, dtype=torch.long)
        label_weights = flat_anchors.new_zeros(num_anchors, dtype=torch.float)
        if len(pos_inds) > 0:
            if not self.reg_decoded_bbox:
                pos_bbox_targets = self.bbox_coder.encode(sampling_result.pos_priors, sampling_result.pos_gt_bboxes)
            else:
                pos_bbox_targets = get_box_tensor(sampling_result.pos_gt_bboxes)
            bbox_targets[pos_inds, :] = pos_bbox_targets
            bbox_weights[pos_inds, :] = 1.0
            labels[pos_inds] = sampling_result.pos_gt_labels
            label_weights[pos_inds] = 1.0 if self.train_cfg["pos_weight"] <= 0 else self.train_cfg["pos_weight"]
        if len(neg_inds) > 0:
            label_weights[neg_inds] = 1.0
        return labels, label_weights, bbox_targets, bbox_weights, pos_inds, neg_inds, sampling_result

    @staticmethod
    def vectorized(anchors):
        """As the assigner's: the waits are what costs on a GPU; on the CPU, mmdet's code (fewer anchors to
        assign)."""
        return anchors.device.type != "cpu"
