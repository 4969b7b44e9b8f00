"""masktargets.get_targets gives mmdet's FCNMaskHead.get_targets, exactly, without the host round trips."""

import numpy as np
import pytest
import torch
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmdet.structures.mask import BitmapMasks, PolygonMasks
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

from cvtk_job import masktargets


class Sampled:  # what get_targets reads of a SamplingResult
    def __init__(self, pos_priors, pos_assigned_gt_inds):
        self.pos_priors, self.pos_assigned_gt_inds = pos_priors, pos_assigned_gt_inds


def batch(seed, images=3, height=60, width=80, polygons=False):
    """Objects anywhere (also at the image's edges), and positive proposals around the object they are assigned,
    some reaching past the image (mmdet clips those)."""
    rng = np.random.default_rng(seed)
    results, gts = [], []
    for i in range(images):
        n_gt = int(rng.integers(1, 6)) if i else 0  # the first image has no objects
        masks = np.zeros((n_gt, height, width), np.uint8)
        polys, extents = [], []
        for k in range(n_gt):
            w, h = int(rng.integers(5, 30)), int(rng.integers(5, 30))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            masks[k, y:y + h, x:x + w] = 1
            masks[k, y + h // 2:y + h, x:x + w // 2] = 0  # not a plain rectangle
            polys.append([np.array([x, y, x + w, y, x + w, y + h, x, y + h], float)])
            extents.append((x, y, x + w, y + h))
        n_pos = int(rng.integers(0, 12)) if n_gt else 0
        assigned = rng.integers(0, max(n_gt, 1), n_pos)
        boxes = np.array([extents[k] for k in assigned], np.float32).reshape(-1, 4) + rng.uniform(-12, 12, (n_pos, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)  # proposals are never inverted
        results.append(Sampled(torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(assigned)))
        gts.append(InstanceData(masks=PolygonMasks(polys, height, width) if polygons
                                else BitmapMasks(masks, height, width)))
    return results, gts


@pytest.mark.parametrize("soft,polygons", [(False, False), (True, False), (False, True)])  # mmdet: no soft polygons
def test_same_targets_as_mmdet(soft, polygons):
    head = FCNMaskHead(num_convs=1, in_channels=4, conv_out_channels=4, num_classes=2)
    cfg = ConfigDict(mask_size=28, soft_mask_target=soft)
    for seed in range(5):
        # Each on its own copy: on the CPU mmdet clips the proposals in place (its .cpu().numpy() is a view).
        results, gts = batch(seed, polygons=polygons)
        want = head.get_targets(results, gts, cfg)
        results, gts = batch(seed, polygons=polygons)
        got = masktargets.get_targets(head, results, gts, cfg)
        fresh, _ = batch(seed, polygons=polygons)
        if not polygons:  # (polygons go through mmdet's own function)
            assert all(torch.equal(a.pos_priors, b.pos_priors) for a, b in zip(fresh, results, strict=True))
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), seed
        assert len(want) == sum(len(r.pos_priors) for r in results) > 0


def test_one_host_read_per_image_instead_of_a_round_trip(monkeypatch):
    reads = []
    for name in ("cpu", "numpy", "item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: reads.append(_n)
                            or _o(self, *a, **k))
    head = FCNMaskHead(num_convs=1, in_channels=4, conv_out_channels=4, num_classes=2)
    results, gts = batch(1, images=4)
    cfg = ConfigDict(mask_size=28)
    head.get_targets(results, gts, cfg)
    assert reads.count("cpu") >= 2 * sum(len(r.pos_priors) > 0 for r in results)  # mmdet: there and back
    reads.clear()
    masktargets.get_targets(head, results, gts, cfg)
    assert reads == []


def test_install_puts_it_on_the_mask_heads_of_a_built_model():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from tests.conftest import REPO

    register_all_modules()
    model = MODELS.build(Config.fromfile(REPO / "examples" / "configs" / "tiny_mask_rcnn.py").model)
    assert masktargets.install(model) == 1
    assert model.roi_head.mask_head.get_targets.__func__ is masktargets.get_targets
