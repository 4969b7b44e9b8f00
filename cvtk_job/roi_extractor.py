"""mmdet's SingleRoIExtractor with its RoIs in fp32 under mixed precision.

mmdet 3.3's extractor casts the RoIs to the features' dtype ("convert fp32 to fp16 when amp is on") and picks
each RoI's pyramid level from that copy: `sqrt(w * h)`, whose product overflows fp16 (largest 65504) for any
RoI of more than 256 x 256 pixels. `inf` then maps to the coarsest level, so under fp16 every RoI whose
sqrt(w * h) is between 256 and 448 pixels (most of P4's range, 224-448) takes its features from P5 while training,
and from P4 in validation, test and inference, which run in fp32: the heads learn on features they never see
afterwards.
The fp16 copy also rounds the corners RoIAlign samples at (to 1 pixel beyond x = 1024; bf16 to 8 pixels).
mmdet 2 ran the extractor in fp32 (`force_fp32(apply_to=('feats',), out_fp16=True)`), as torchvision's
`roi_align` does under autocast; mmcv's RoIAlign takes one dtype for features and RoIs, so the features go
to fp32 too (a copy freed after the forward: RoIAlign's backward keeps only the RoIs) and the result comes back
in the features' dtype, as mmdet 3 returns it.

In fp32 (the CPU, `--precision fp32`) mmdet's own forward runs unchanged. Swapped in where the training model
is built (`mmconfig.use_training_modules`); validation, test and inference run in fp32 and need no swap.
"""

import torch
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from mmdet.registry import MODELS


@MODELS.register_module()
class CvtkSingleRoIExtractor(SingleRoIExtractor):
    def forward(self, feats, rois, roi_scale_factor=None):
        dtype = feats[0].dtype
        if dtype == torch.float32:
            return super().forward(feats, rois, roi_scale_factor)
        with torch.autocast(feats[0].device.type, enabled=False):
            out = super().forward(tuple(f.float() for f in feats), rois.float(), roi_scale_factor)
        return out.to(dtype)
