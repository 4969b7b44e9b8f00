"""CvtkShared2FCBBoxHead: mmdet's box head losses and gradients, bit for bit, without the loss's host reads (the
average factor's `.item()`, `pos_inds.any()`, four boolean-mask indexings, and the mask's scatter in backward).

Its way for GPU tensors is forced here (CPU tensors); mmdet's Shared2FCBBoxHead built from the same config is the
reference. The sampling results are real ones: mmdet's MaxIoUAssigner and RandomSampler on random boxes."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from mmdet.models.task_modules.samplers import RandomSampler
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox2roi
from mmengine.config import Config
from mmengine.registry import init_default_scope

from cvtk_job import mmconfig
from cvtk_job.bbox_head import CvtkShared2FCBBoxHead
from tests.unit.test_assigner import assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_syncs  # noqa: E402

NUM_CLASSES = 3  # test_assigner.assignment's labels: 0-2


@pytest.fixture(autouse=True)
def gpu_way(monkeypatch):
    init_default_scope("mmdet")
    monkeypatch.setattr(CvtkShared2FCBBoxHead, "vectorized", staticmethod(lambda rois: True))


def heads(**changes):
    """mmdet's box head and ours, from the default Mask R-CNN config's (cvtk-job's training modules in ours)."""
    model = Config.fromfile(mmconfig.resolve_model(None, "segm")).model
    cfg = dict(model.roi_head.bbox_head, num_classes=NUM_CLASSES, **changes)
    ours = copy.deepcopy(cfg)
    mmconfig.use_training_modules(ours)
    assert ours["type"] == "CvtkShared2FCBBoxHead"
    torch.manual_seed(0)
    mmdets = MODELS.build(cfg)
    torch.manual_seed(0)
    return mmdets, MODELS.build(ours), model.train_cfg.rcnn


def sampled(images, seed):
    """Real sampling results, one per (priors, objects) of `images`, as the R-CNN stage draws them."""
    results = []
    torch.manual_seed(seed)
    for i, (num_priors, num_gts) in enumerate(images):
        assigned, priors, gt = assignment(num_priors, num_gts, seed * 10 + i)
        sampler = RandomSampler(num=64, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True)
        results.append(sampler.sample(assigned, priors, gt))
    return results


def outputs(head, results, seed, device="cpu"):
    """Fixed random scores and deltas for the sampled RoIs → (scores, deltas, RoIs)."""
    rois = bbox2roi([r.priors for r in results])
    g = torch.Generator().manual_seed(seed)
    cls_score = torch.randn(len(rois), NUM_CLASSES + 1, generator=g)
    bbox_pred = torch.randn(len(rois), 4 if head.reg_class_agnostic else 4 * NUM_CLASSES, generator=g)
    return cls_score.to(device).requires_grad_(), bbox_pred.to(device).requires_grad_(), rois.to(device)


def loss_step(head, results, train_cfg, seed, given=None):
    """loss_and_target and backward on outputs() (or `given` ones) → (losses, their targets, the two gradients)."""
    cls_score, bbox_pred, rois = given or outputs(head, results, seed)
    got = head.loss_and_target(cls_score, bbox_pred, rois, results, train_cfg)
    sum(v.sum() * (k + 1) for k, v in enumerate(got["loss_bbox"].values())).backward()
    return got["loss_bbox"], got["bbox_targets"], cls_score.grad, bbox_pred.grad


CASES = {  # (priors, objects) per image
    "three images, one without objects": [(300, 6), (200, 0), (500, 25)],
    "one object": [(80, 1)],
    "no positives at all": [(100, 0), (40, 0)],
    "many positives": [(2000, 60), (1500, 40)],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("changes", [{}, {"reg_class_agnostic": True}, {"reg_decoded_bbox": True}],
                         ids=["default", "class agnostic", "decoded boxes"])
def test_the_losses_and_gradients_are_mmdets(case, changes):
    mmdets, ours, train_cfg = heads(**changes)
    for seed in range(2):
        results = sampled(CASES[case], seed)
        want, got = loss_step(mmdets, results, train_cfg, seed), loss_step(ours, results, train_cfg, seed)
        assert ours._positives is None  # nothing left behind for a later call of loss() alone
        assert want[0].keys() == got[0].keys() == {"loss_cls", "acc", "loss_bbox"}
        for key in want[0]:
            assert torch.equal(got[0][key], want[0][key]), key
        for a, b in zip(got[1], want[1], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(got[2:], want[2:], strict=True):  # gradients of the scores and the deltas
            assert torch.equal(a, b)
        if case == "no positives at all":
            assert float(got[0]["loss_bbox"]) == 0 and not got[3].any()
        else:
            assert float(got[0]["loss_bbox"]) > 0 and got[3].any()


def test_no_host_read_in_the_loss_forward_or_backward():
    mmdets, ours, train_cfg = heads()
    results = sampled(CASES["three images, one without objects"], 0)
    reads = {}
    for name, head in (("mmdet", mmdets), ("ours", ours)):
        with step_syncs.Counter() as reads[name]:
            loss_step(head, results, train_cfg, 0)
    assert reads["ours"].total == 0, reads["ours"].sites
    # mmdet's: 6 in the head's loss, its L1 loss's `any()` (losses.py), the mask's scatter in backward.
    assert reads["mmdet"].total == 8, reads["mmdet"].sites


def test_on_the_cpu_and_without_loss_and_target_it_is_mmdets_code(monkeypatch):
    mmdets, ours, train_cfg = heads()
    results = sampled(CASES["one object"], 0)
    monkeypatch.undo()
    init_default_scope("mmdet")
    assert not CvtkShared2FCBBoxHead.vectorized(torch.zeros(1, 5))
    with step_syncs.Counter() as reads:
        loss_step(ours, results, train_cfg, 0)
    assert reads.total == 7  # (the L1 loss is cvtk-job's in both)
