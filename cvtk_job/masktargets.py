"""Mask R-CNN's training mask targets, built on the device without round trips through the host.

mmdet's `mask_target` (FCNMaskHead.get_targets) takes each image's positive proposals to the host (a
synchronisation), uploads every object's full-image mask, makes one float copy of a full-image mask *per
positive proposal* (128 proposals of a 1333x800 image: 546 MB), RoIAligns them to 28x28, brings the result
back to the host (a second synchronisation) and uploads it again. Here each object's mask is converted once
and RoIAlign picks it by index (its `rois` batch column), and the targets stay where they are made: the same
values (the same RoIAlign over the same inputs), with one wait per image instead of two, no copy per proposal
and no trip back.

Installed on the model's mask heads by `mmhooks.CvtkRunner` (and the `--batch_size auto` probe), not named in
the config: the written config stays mmdet's own, loadable where cvtk-job is not installed. Masks that are not
BitmapMasks (polygons kept as polygons) go through mmdet's own function.
"""

import types

import torch


def get_targets(head, sampling_results, batch_gt_instances, rcnn_train_cfg):
    """FCNMaskHead.get_targets, same result."""
    from mmdet.structures.mask import BitmapMasks, mask_target

    masks = [gt.masks for gt in batch_gt_instances]
    proposals = [res.pos_priors for res in sampling_results]
    assigned = [res.pos_assigned_gt_inds for res in sampling_results]
    if not all(isinstance(m, BitmapMasks) for m in masks):
        return mask_target(proposals, assigned, masks, rcnn_train_cfg)
    size = tuple(torch.nn.modules.utils._pair(rcnn_train_cfg.mask_size))
    binarize = not rcnn_train_cfg.get("soft_mask_target", False)
    targets = [_image_targets(p, a, m, size, binarize) for p, a, m in zip(proposals, assigned, masks, strict=True)]
    return torch.cat(targets) if targets else torch.zeros((0, *size))


def _image_targets(proposals, assigned, masks, size, binarize):
    from mmcv.ops import roi_align

    device = proposals.device
    if proposals.size(0) == 0 or len(masks.masks) == 0:
        return proposals.new_zeros((0, *size))
    boxes = proposals.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, masks.width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, masks.height)
    # One float copy of each object that has a positive proposal (not one per proposal), picked by RoIAlign's
    # batch column. `unique` is this image's one synchronisation (its output size).
    used, slot = torch.unique(assigned, return_inverse=True)
    whole = torch.from_numpy(masks.masks).to(device).index_select(0, used).to(boxes.dtype)[:, None]
    rois = torch.cat([slot.to(boxes.dtype)[:, None], boxes], dim=1)
    targets = roi_align(whole, rois, size, 1.0, 0, "avg", True).squeeze(1)
    return (targets >= 0.5).float() if binarize else targets.float()  # float32 as mmdet's, whatever the boxes' dtype


def install(model):
    """Use `get_targets` in every FCNMaskHead of `model` that has mmdet's own (a subclass with its own is left
    alone). Returns how many heads."""
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead

    heads = [m for m in model.modules() if isinstance(m, FCNMaskHead)
             and type(m).get_targets is FCNMaskHead.get_targets]
    for head in heads:
        head.get_targets = types.MethodType(get_targets, head)
    return len(heads)
