"""mmdet's L1Loss and sigmoid CrossEntropyLoss without their host-device synchronisations.

Mask R-CNN's RPN computes both losses once per FPN level (5 levels), and each makes the host wait for the GPU:
`L1Loss` asks `torch.any(weight > 0)` to skip the arithmetic of a level with no positive anchor (the answer is
zero either way), and the sigmoid cross-entropy finds the rows to one-hot with a `nonzero`. With the box head's
L1 that is 11 of a training step's host reads (bench/step_syncs.py). Here the L1 loss always does the
arithmetic, and the one-hot labels are scattered where mmdet indexes by the nonzero rows: the same losses and
gradients (asserted bit-equal in tests/unit/test_losses.py; a level with no positive gives zero both ways).

Swapped in where the training model is built (`mmconfig.use_training_modules`); validation and test compute no
loss.
"""

from mmdet.models.losses import CrossEntropyLoss, L1Loss
from mmdet.models.losses.cross_entropy_loss import binary_cross_entropy
from mmdet.models.losses.smooth_l1_loss import l1_loss
from mmdet.registry import MODELS


@MODELS.register_module()
class CvtkL1Loss(L1Loss):
    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        reduction = reduction_override or self.reduction
        # mmdet's early return differs from the arithmetic in more than its value where the loss is kept per
        # element (it returns one sum) or averages nothing (0, not nan): mmdet's forward there. Neither is what
        # the RPN or the box head asks for.
        if weight is None or reduction == "none" or pred.numel() == 0:
            return super().forward(pred, target, weight, avg_factor, reduction_override)
        if pred.dim() == weight.dim() + 1:  # as mmdet's early return broadcasts it
            weight = weight.unsqueeze(1)
        return self.loss_weight * l1_loss(pred, target, weight, reduction=reduction, avg_factor=avg_factor)


@MODELS.register_module()
class CvtkCrossEntropyLoss(CrossEntropyLoss):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.use_sigmoid:
            self.cls_criterion = binary_cross_entropy_one_hot


def binary_cross_entropy_one_hot(pred, label, weight=None, reduction="mean", avg_factor=None, class_weight=None,
                                 ignore_index=-100, avg_non_ignore=False):
    """mmdet's binary_cross_entropy, given labels already one-hot where it would expand them with a nonzero.
    Its own path stays where the expanded labels would read as ignored (an ignore_index of 0 or 1) and where
    it counts the non-ignored labels on the host anyway (avg_non_ignore without avg_factor)."""
    ignore = -100 if ignore_index is None else ignore_index
    if (pred.dim() != label.dim() and ignore not in (0, 1)
            and not (avg_factor is None and avg_non_ignore and reduction == "mean")):
        label, weight = one_hot(label, weight, pred.size(-1), ignore)
    return binary_cross_entropy(pred, label, weight, reduction=reduction, avg_factor=avg_factor,
                                class_weight=class_weight, ignore_index=ignore_index, avg_non_ignore=avg_non_ignore)


def one_hot(labels, label_weights, channels, ignore_index):
    """(N,) labels → (N, channels) 0/1 labels and their weights, as mmdet's _expand_onehot_labels makes them: a
    row is one-hot for a label in [0, channels), zero for the background (channels) and ignored labels, whose
    weight is zero."""
    valid = (labels >= 0) & (labels != ignore_index)
    hot = valid & (labels < channels)
    bin_labels = labels.new_zeros(labels.size(0), channels)
    bin_labels.scatter_(1, labels.clamp(0, channels - 1).long().unsqueeze(1), hot.to(labels.dtype).unsqueeze(1))
    valid = valid.view(-1, 1).expand(labels.size(0), channels).float()
    weights = valid if label_weights is None else label_weights.view(-1, 1).repeat(1, channels) * valid
    return bin_labels, weights
