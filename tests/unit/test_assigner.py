"""CvtkMaxIoUAssigner and CvtkRandomSampler: mmdet's assignment and samples, exactly, without a host read per
object and with one per sampling.

Their whole-tensor ways run where the tensors are on a GPU; here (CPU tensors) the tests force them, except where
they check that the CPU keeps mmdet's code. Host reads are counted by bench/step_syncs.py's instrument (the
`make bench` row's), which sees the reads a GPU would wait for (nonzero, unique, masks, .item(), .tolist())."""

import sys
from pathlib import Path

import pytest
import torch
from mmdet.models.task_modules.assigners import MaxIoUAssigner
from mmdet.models.task_modules.samplers import RandomSampler
from mmengine.structures import InstanceData

from cvtk_job.assigner import CvtkMaxIoUAssigner, CvtkRandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_syncs  # noqa: E402


@pytest.fixture(autouse=True)
def whole_matrix_way(monkeypatch):
    monkeypatch.setattr(CvtkMaxIoUAssigner, "vectorized", staticmethod(lambda overlaps: True))
    monkeypatch.setattr(CvtkRandomSampler, "vectorized", staticmethod(lambda gt_inds: True))

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
    assert count(CvtkMaxIoUAssigner, 300) == count(CvtkMaxIoUAssigner, 1) == 0
    monkeypatch.setattr(CvtkMaxIoUAssigner, "vectorized", staticmethod(lambda overlaps: False))  # as on the CPU
    assert count(CvtkMaxIoUAssigner, 300) == count(MaxIoUAssigner, 300) >= 300  # mmdet's loop: no waits to save


def test_the_whole_matrix_way_is_for_devices_other_than_the_cpu(monkeypatch):
    monkeypatch.undo()
    assert not CvtkMaxIoUAssigner.vectorized(torch.zeros(2, 3))
    assert CvtkMaxIoUAssigner.vectorized(torch.zeros(2, 3, device="meta"))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_no_host_read_at_all_in_the_whole_matrix_way(setting):
    """Not even by the negatives', positives' and labels' boolean masks (mmdet: 3 reads besides its loop)."""
    overlaps = overlaps_with_ties(60, 2000, 0)
    labels = torch.zeros(60, dtype=torch.long)
    with step_syncs.Counter() as ours:
        CvtkMaxIoUAssigner(**SETTINGS[setting]).assign_wrt_overlaps(overlaps.clone(), labels)
    with step_syncs.Counter() as mmdet:
        MaxIoUAssigner(**SETTINGS[setting]).assign_wrt_overlaps(overlaps.clone(), labels)
    assert ours.total == 0 and mmdet.total >= 3


SAMPLERS = {  # as in mmdet's Mask R-CNN config (RPN, R-CNN), and with an upper bound of negatives per positive
    "rpn": dict(num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
    "rcnn": dict(num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
    "bounded": dict(num=64, pos_fraction=0.25, neg_pos_ub=3, add_gt_as_proposals=True),
}


def boxes(g, n, size=200.0):
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 40], 1)


def assignment(num_priors, num_gts, seed):
    """An assignment with ignored priors (-1), negatives (0) and positives, and the boxes it was made for."""
    g = torch.Generator().manual_seed(seed)
    gt = InstanceData(bboxes=boxes(g, num_gts), labels=torch.randint(0, 3, (num_gts,), generator=g))
    priors = InstanceData(priors=boxes(g, num_priors))
    kw = dict(pos_iou_thr=0.5, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
    return MaxIoUAssigner(**kw).assign(priors, gt), priors, gt


@pytest.mark.parametrize("setting", sorted(SAMPLERS))
@pytest.mark.parametrize("num_priors,num_gts", [(3000, 40), (3000, 1), (200, 0), (40, 30), (5, 2)])
def test_same_samples_as_mmdet_with_one_host_read(setting, num_priors, num_gts):
    """Many positives (more than the sampler takes: a random choice), few, none; a handful of priors (fewer than
    asked for). The same global random state before each: the same permutations must be drawn."""
    for seed in range(3):
        results, reads = {}, {}
        for name, cls in (("mmdet", RandomSampler), ("ours", CvtkRandomSampler)):
            assigned, priors, gt = assignment(num_priors, num_gts, seed)
            torch.manual_seed(seed)
            with step_syncs.Counter() as counter:
                results[name] = cls(**SAMPLERS[setting]).sample(assigned, priors, gt)
            reads[name] = counter.total
        want, got = results["mmdet"], results["ours"]
        for field in ("pos_inds", "neg_inds", "pos_priors", "neg_priors", "pos_assigned_gt_inds", "pos_gt_labels",
                      "pos_gt_bboxes", "pos_is_gt", "priors"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (field, seed)
        assert reads["ours"] == 1 and reads["mmdet"] >= 4, reads
        # The cases that draw at random do (add_gt_ has put the ground truth into `assigned`).
        if num_priors == 3000:
            assert (assigned.gt_inds == 0).sum() > len(want.neg_inds)  # negatives chosen
        if (setting, num_priors, num_gts) == ("bounded", 40, 30):
            assert (assigned.gt_inds > 0).sum() > len(want.pos_inds) > 0  # positives chosen


def test_the_same_random_state_after_sampling():
    """Training draws from the same generator afterwards (flips, dropout): it must be where mmdet leaves it."""
    after = {}
    for name, cls in (("mmdet", RandomSampler), ("ours", CvtkRandomSampler)):
        assigned, priors, gt = assignment(3000, 40, 0)
        torch.manual_seed(7)
        cls(**SAMPLERS["rpn"]).sample(assigned, priors, gt)
        after[name] = torch.rand(4)
    assert torch.equal(after["ours"], after["mmdet"])


def test_the_cpu_keeps_mmdets_sampler(monkeypatch):
    monkeypatch.undo()
    assert not CvtkRandomSampler.vectorized(torch.zeros(3, dtype=torch.long))
    assert CvtkRandomSampler.vectorized(torch.zeros(3, dtype=torch.long, device="meta"))
