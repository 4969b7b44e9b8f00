"""CvtkMaxIoUAssigner: mmdet's MaxIoUAssigner's assignment, exactly, without a host read per object.

Its whole-matrix way runs where the overlaps are on a GPU; here (CPU tensors) the tests force it, except where
they check that the CPU keeps mmdet's loop."""

import pytest
import torch
from mmdet.models.task_modules.assigners import MaxIoUAssigner

from cvtk_job.assigner import CvtkMaxIoUAssigner


@pytest.fixture(autouse=True)
def whole_matrix_way(monkeypatch):
    monkeypatch.setattr(CvtkMaxIoUAssigner, "vectorized", staticmethod(lambda overlaps: True))

SETTINGS = {  # as in mmdet's Mask R-CNN config (RPN, R-CNN), plus the other branches of the loop
    "rpn": dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
    "rcnn": dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=True, ignore_iof_thr=-1),
    "one best prior": dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.2, match_low_quality=True,
                           gt_max_assign_all=False),
    "no low quality": dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.2, match_low_quality=False),
}


def overlaps_with_ties(num_gts, num_priors, seed):
    """IoUs in steps of 0.05: many priors share an object's best IoU, and many objects share a best prior."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(num_gts, num_priors, generator=g) ** 3 * 20).round() / 20


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("num_gts,num_priors", [(0, 50), (1, 1), (1, 40), (7, 3), (60, 500), (300, 2000)])
def test_same_assignment_as_mmdet(setting, num_gts, num_priors):
    for seed in range(3):
        overlaps = overlaps_with_ties(num_gts, num_priors, seed)
        labels = torch.randint(0, 5, (num_gts,), generator=torch.Generator().manual_seed(seed))
        want = MaxIoUAssigner(**SETTINGS[setting]).assign_wrt_overlaps(overlaps.clone(), labels)
        got = CvtkMaxIoUAssigner(**SETTINGS[setting]).assign_wrt_overlaps(overlaps.clone(), labels)
        assert got.num_gts == want.num_gts
        for field in ("gt_inds", "labels", "max_overlaps"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and torch.equal(a, b), (field, seed)


def test_the_whole_assign_call_with_boxes_and_ignored_regions():
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(400, 2, generator=g) * 200
    priors = torch.cat([xy, xy + 10 + torch.rand(400, 2, generator=g) * 40], 1)
    gxy = torch.rand(30, 2, generator=g) * 200
    gt = InstanceData(bboxes=torch.cat([gxy, gxy + 10 + torch.rand(30, 2, generator=g) * 40], 1),
                      labels=torch.randint(0, 3, (30,), generator=g))
    ignored = InstanceData(bboxes=torch.tensor([[0.0, 0.0, 50.0, 50.0]]))
    for kw in (SETTINGS["rpn"], dict(SETTINGS["rcnn"], ignore_iof_thr=0.5)):
        want = MaxIoUAssigner(**kw).assign(InstanceData(priors=priors), gt, ignored)
        got = CvtkMaxIoUAssigner(**kw).assign(InstanceData(priors=priors), gt, ignored)
        assert torch.equal(got.gt_inds, want.gt_inds) and torch.equal(got.labels, want.labels)
        assert (got.gt_inds > 0).sum() > 5  # positives were assigned


def test_no_host_read_per_object(monkeypatch):
    """mmdet's loop reads each object's best IoU on the host (a GPU synchronisation each): counted through
    Tensor.__bool__/item; ours reads as many for 300 objects as for 1."""
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, **k: reads.append(1) or _o(self, *a, **k))

    def count(cls, num_gts):
        reads.clear()
        cls(**SETTINGS["rpn"]).assign_wrt_overlaps(overlaps_with_ties(num_gts, 1000, 0), torch.zeros(num_gts,
                                                                                                     dtype=torch.long))
        return len(reads)

    assert count(MaxIoUAssigner, 300) >= 300  # the loop being replaced
    assert count(CvtkMaxIoUAssigner, 300) == count(CvtkMaxIoUAssigner, 1) <= 2
    monkeypatch.setattr(CvtkMaxIoUAssigner, "vectorized", staticmethod(lambda overlaps: False))  # as on the CPU
    assert count(CvtkMaxIoUAssigner, 300) == count(MaxIoUAssigner, 300) >= 300  # mmdet's loop: no waits to save


def test_the_whole_matrix_way_is_for_devices_other_than_the_cpu(monkeypatch):
    monkeypatch.undo()
    assert not CvtkMaxIoUAssigner.vectorized(torch.zeros(2, 3))
    assert CvtkMaxIoUAssigner.vectorized(torch.zeros(2, 3, device="meta"))
