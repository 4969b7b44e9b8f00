"""mmdet's SingleRoIExtractor with its RoIs in fp32 under mixed precision, and one host read per extraction.

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

mmdet also finds each level's RoIs with a `nonzero` per level: on a GPU, a host wait per level (4 per extraction,
8 per Mask R-CNN training step). Here the RoIs are ordered by level (a stable sort: within a level they keep
mmdet's order, so every level's RoIAlign sees exactly mmdet's input, forward and backward) and the host reads
the per-level counts once. The levels no RoI maps to still join the graph with a zero, as in mmdet (DDP waits
for a gradient of every parameter). RoIAlign gets NCHW features whatever their memory format (`_nchw_fp32`).

Swapped in where the training model is built (`mmconfig.use_training_modules`); validation, test and inference
run in fp32 with mmdet's extractor.
"""

import torch
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from mmdet.registry import MODELS


@MODELS.register_module()
class CvtkSingleRoIExtractor(SingleRoIExtractor):
    def forward(self, feats, rois, roi_scale_factor=None):
        if len(feats) == 1:  # no level to choose: nothing of the above applies
            return super().forward(feats, rois, roi_scale_factor)
        dtype = feats[0].dtype
        with torch.autocast(feats[0].device.type, enabled=False):
            out = self._pool(tuple(_nchw_fp32(f) for f in feats), rois.float(), roi_scale_factor)
        return out.to(dtype)

    def _pool(self, feats, rois, roi_scale_factor):
        num_levels = len(feats)
        roi_feats = feats[0].new_zeros(rois.size(0), self.out_channels, *self.roi_layers[0].output_size)
        levels = self.map_roi_levels(rois, num_levels)
        # A RoI with no level (NaN coordinates, as a diverging fp16 step can make, or an inverted box) is pooled
        # nowhere and keeps zero features, as in mmdet (no level's mask holds it): sorted last, after the levels.
        levels = torch.where((levels >= 0) & (levels < num_levels), levels, num_levels)
        if roi_scale_factor is not None:
            rois = self.roi_rescale(rois, roi_scale_factor)
        order = torch.argsort(levels, stable=True)
        # Counted by comparison, not torch.bincount: on CUDA that reads its input's maximum back first.
        counts = (levels[None, :] == torch.arange(num_levels + 1, device=levels.device)[:, None]).sum(1).tolist()
        pooled = []
        for i, (inds, n) in enumerate(zip(order.split(counts)[:num_levels], counts[:num_levels], strict=True)):
            if n:
                pooled.append(self.roi_layers[i](feats[i], rois[inds]))
            else:
                roi_feats = roi_feats + (sum(p.view(-1)[0] for p in self.parameters()) * 0.0 + feats[i].sum() * 0.0)
        if pooled:
            roi_feats = roi_feats.index_put((order[:rois.size(0) - counts[-1]],), torch.cat(pooled))
        return roi_feats


def _nchw_fp32(feature):
    """The feature map as mmcv's RoIAlign reads it: fp32 and contiguous NCHW. Its kernels index the raw buffer as
    NCHW, so a channels_last map (the fast layout for half-precision convolutions on tensor cores) would be read
    as scrambled values, without an error. No copy where the map is already so (fp32 training)."""
    return feature.to(torch.float32, memory_format=torch.contiguous_format)
