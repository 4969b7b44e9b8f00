"""mmdet's Shared2FCBBoxHead with its loss computed without host reads.

mmdet's `BBoxHead.loss` reads the number of weighted samples back (`.item()`, its average factor), asks
`pos_inds.any()` and indexes by the boolean positive mask four times: on a GPU six waits per training step (and
one more in the backward pass, where a boolean index's gradient is scattered by the mask). All of it is known on
the host already: `BBoxHead.get_targets` writes each image's positives first and then its negatives, every one with
a weight above 0 (`pos_weight` 1 or the configured one, negatives 1), so the samples of weight > 0 are all the rows
and the positives are the first `len(pos_priors)` rows of each image, counts the sampler had on the host.
`CvtkShared2FCBBoxHead.loss_and_target` builds those rows' indices from the sampling results (`arange` on the
device, no copy) and `loss` indexes by them: the same rows in the same order, so mmdet's losses and gradients, bit
for bit (tests/unit/test_bbox_head.py).

On the CPU, and where `loss` is called without `loss_and_target` (or with `concat=False`), mmdet's code runs.
Swapped in where the training model is built (`mmconfig.use_training_modules`); the written config keeps mmdet's
name.
"""

import torch
from mmdet.models.losses import accuracy
from mmdet.models.roi_heads.bbox_heads import Shared2FCBBoxHead
from mmdet.registry import MODELS
from mmdet.structures.bbox import get_box_tensor


@MODELS.register_module()
class CvtkShared2FCBBoxHead(Shared2FCBBoxHead):
    _positives = None  # during loss_and_target: the rows of the positive samples, on the device

    def loss_and_target(self, cls_score, bbox_pred, rois, sampling_results, rcnn_train_cfg, concat=True,
                        reduction_override=None):
        if concat and self.vectorized(rois):
            self._positives = _positive_rows(sampling_results, rois.device)
        try:
            return super().loss_and_target(cls_score, bbox_pred, rois, sampling_results, rcnn_train_cfg, concat,
                                           reduction_override)
        finally:
            self._positives = None

    def loss(self, cls_score, bbox_pred, rois, labels, label_weights, bbox_targets, bbox_weights,
             reduction_override=None):
        positives = self._positives
        if positives is None:
            return super().loss(cls_score, bbox_pred, rois, labels, label_weights, bbox_targets, bbox_weights,
                                reduction_override)
        # mmdet's BBoxHead.loss, with what it reads from the device known beforehand.
        losses = {}
        if cls_score is not None:
            avg_factor = max(float(labels.numel()), 1.0)  # mmdet: the samples of weight > 0, here all of them
            if cls_score.numel() > 0:
                loss_cls = self.loss_cls(cls_score, labels, label_weights, avg_factor=avg_factor,
                                         reduction_override=reduction_override)
                if isinstance(loss_cls, dict):
                    losses.update(loss_cls)
                else:
                    losses["loss_cls"] = loss_cls
                if self.custom_activation:
                    losses.update(self.loss_cls.get_accuracy(cls_score, labels))
                else:
                    losses["acc"] = accuracy(cls_score, labels)
        if bbox_pred is not None:
            if len(positives):
                if self.reg_decoded_bbox:
                    bbox_pred = get_box_tensor(self.bbox_coder.decode(rois[:, 1:], bbox_pred))
                if self.reg_class_agnostic:
                    pos_bbox_pred = bbox_pred.view(bbox_pred.size(0), -1)[positives]
                else:
                    pos_bbox_pred = bbox_pred.view(bbox_pred.size(0), self.num_classes, -1)[positives,
                                                                                            labels[positives]]
                losses["loss_bbox"] = self.loss_bbox(pos_bbox_pred, bbox_targets[positives],
                                                     bbox_weights[positives], avg_factor=bbox_targets.size(0),
                                                     reduction_override=reduction_override)
            else:
                losses["loss_bbox"] = bbox_pred[positives].sum()  # 0, in the graph (as mmdet's)
        return losses

    @staticmethod
    def vectorized(rois):
        """As the assigner's: the waits are what costs on a GPU; on the CPU, mmdet's code."""
        return rois.device.type != "cpu"


def _positive_rows(sampling_results, device):
    """The rows of the positive samples in get_targets' concatenated targets: each image's first
    `len(pos_priors)` of its `len(pos_priors) + len(neg_priors)`."""
    rows, start = [], 0
    for result in sampling_results:
        num_pos = len(result.pos_priors)
        rows.append(torch.arange(start, start + num_pos, device=device))
        start += num_pos + len(result.neg_priors)
    return torch.cat(rows)
