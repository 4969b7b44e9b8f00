"""CvtkRPNHead: mmdet's RPN training targets, bit for bit, without mmdet's host reads (the inside-anchor check and
index, and `unmap`'s four boolean writes per image) and with the sampler's counts read once for all images.

Its way for GPU tensors is forced here (CPU tensors), as for the assigner and sampler it relies on; mmdet's RPNHead
built from the same config is the reference, each run from the same random state."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

from cvtk_job import mmconfig
from cvtk_job.assigner import CvtkMaxIoUAssigner, CvtkRandomSampler
from cvtk_job.rpn_head import CvtkRPNHead

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_syncs  # noqa: E402

PAD = (256, 320)  # the batch's padded input (height, width)


@pytest.fixture(autouse=True)
def gpu_way(monkeypatch):
    init_default_scope("mmdet")
    monkeypatch.setattr(CvtkRPNHead, "vectorized", staticmethod(lambda anchors: True))
    monkeypatch.setattr(CvtkRandomSampler, "vectorized", staticmethod(lambda gt_inds: True))


def heads(allowed_border=-1, gpu_assign_thr=-1, sampler="CvtkRandomSampler", **changes):
    """mmdet's RPNHead and ours, from the default Mask R-CNN config's (cvtk-job's training modules in ours; with
    mmdet's sampler, each image samples on its own)."""
    model = Config.fromfile(mmconfig.resolve_model(None, "segm")).model
    cfg = dict(model.rpn_head, train_cfg=copy.deepcopy(model.train_cfg.rpn), test_cfg=model.test_cfg.rpn, **changes)
    cfg["train_cfg"]["allowed_border"] = allowed_border
    cfg["train_cfg"]["assigner"]["gpu_assign_thr"] = gpu_assign_thr
    ours = copy.deepcopy(cfg)
    mmconfig.use_training_modules(ours)
    assert ours["type"] == "CvtkRPNHead" and ours["train_cfg"]["assigner"]["type"] == "CvtkMaxIoUAssigner"
    ours["train_cfg"]["sampler"]["type"] = sampler
    return MODELS.build(cfg), MODELS.build(ours)


def batch(objects, shapes, seed=0, device="cpu"):
    """Images of `shapes` (height, width) padded to PAD, with `objects[i]` boxes each (RPN labels are all 0)."""
    g = torch.Generator().manual_seed(seed)
    metas, gts = [], []
    for n, (h, w) in zip(objects, shapes, strict=True):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.9, h * 0.9])
        wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], 1)
        gts.append(InstanceData(bboxes=boxes, labels=torch.zeros(n, dtype=torch.long)).to(device))
        metas.append({"img_shape": (h, w), "pad_shape": PAD, "batch_input_shape": PAD})
    return gts, metas


def targets(head, gts, metas, device="cpu"):
    """head.get_targets on its anchors for the batch, from a fixed random state → (targets, random state after)."""
    sizes = [(PAD[0] // s, PAD[1] // s) for s in (4, 8, 16, 32, 64)]
    anchors, valid = head.get_anchors(sizes, metas, device=device)
    torch.manual_seed(7)
    got = head.get_targets(anchors, valid, gts, metas)
    return got, torch.get_rng_state()


def assert_same(got, want):
    (*lists, avg_factor), state = got
    (*want_lists, want_avg_factor), want_state = want
    assert avg_factor == want_avg_factor
    for ours, mmdets in zip(lists, want_lists, strict=True):  # labels, their weights, box targets, their weights
        assert len(ours) == len(mmdets) == 5  # FPN levels
        for a, b in zip(ours, mmdets, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(state, want_state)  # the same random draws, so every later step is the same too


CASES = {
    "dense, one image smaller than the batch": ([60, 25], [PAD, (200, 150)]),
    "one object each": ([1, 1], [(256, 300), (180, 320)]),
    "an image without objects": ([0, 12], [(230, 320), PAD]),
    "many objects, a thin image": ([150, 3], [PAD, (40, 320)]),
}


@pytest.mark.parametrize("allowed_border", [-1, 0, 16])  # mmdet's RPN default, then anchors in the image only
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("assigner", ["whole matrix", "mmdet's loop on the CPU (gpu_assign_thr)",
                                      "whole matrix, mmdet's sampler"])
def test_the_targets_are_mmdets(monkeypatch, case, allowed_border, assigner):
    if assigner.startswith("whole matrix"):
        monkeypatch.setattr(CvtkMaxIoUAssigner, "vectorized", staticmethod(lambda overlaps: True))
    mmdets, ours = heads(allowed_border, gpu_assign_thr=1 if "gpu_assign_thr" in assigner else -1,
                         sampler="RandomSampler" if "mmdet's sampler" in assigner else "CvtkRandomSampler")
    for seed in range(2):
        gts, metas = batch(*CASES[case], seed=seed)
        want = targets(mmdets, gts, metas)
        got = targets(ours, gts, metas)
        assert_same(got, want)
        assert ours._assigned is None  # nothing left for a later call
        labels, weights = torch.cat(got[0][0], 1), torch.cat(got[0][1], 1)
        assert (weights > 0).any() and ((labels == 0) & (weights > 0)).any() == any(len(g) for g in gts)


def test_decoded_box_targets_and_a_positive_weight_are_mmdets(monkeypatch):
    monkeypatch.setattr(CvtkMaxIoUAssigner, "vectorized", staticmethod(lambda overlaps: True))
    mmdets, ours = heads(reg_decoded_bbox=True)
    for head in (mmdets, ours):
        head.train_cfg["pos_weight"] = 2.0
    gts, metas = batch(*CASES["dense, one image smaller than the batch"])
    assert_same(targets(ours, gts, metas), targets(mmdets, gts, metas))


def test_no_host_read_of_its_own(monkeypatch):
    monkeypatch.setattr(CvtkMaxIoUAssigner, "vectorized", staticmethod(lambda overlaps: True))
    mmdets, ours = heads(allowed_border=0)
    gts, metas = batch(*CASES["dense, one image smaller than the batch"])
    with step_syncs.Counter() as mmdet_reads:
        targets(mmdets, gts, metas)
    with step_syncs.Counter() as our_reads:
        targets(ours, gts, metas)
    # Ours: one read of both images' sample counts, nothing else. mmdet's head: 6 per image of its own, and its
    # sampler's own for each image.
    (kind, site), = our_reads.sites.elements()
    assert kind == "tolist" and site.startswith("cvtk_job/assigner.py") and "(sample_counts)" in site
    own = [site for _, site in mmdet_reads.sites.elements() if "anchor_head.py" in site or "misc.py" in site]
    assert len(own) == 12


def test_no_anchor_inside_the_image_is_mmdets_error():
    mmdets, ours = heads(allowed_border=0)
    gts, metas = batch([2], [(8, 8)])  # every anchor (32 pixels and up) crosses the border of an 8x8 image
    for head in (mmdets, ours):
        with pytest.raises(ValueError, match="There is no valid anchor inside the image boundary"):
            targets(head, gts, metas)


def test_on_the_cpu_it_is_mmdets_code(monkeypatch):
    monkeypatch.undo()  # CvtkRPNHead.vectorized as it is: False for CPU tensors
    init_default_scope("mmdet")
    assert not CvtkRPNHead.vectorized(torch.zeros(1, 4))
    _, ours = heads()
    gts, metas = batch(*CASES["one object each"])
    with step_syncs.Counter() as reads:
        targets(ours, gts, metas)
    assert any("anchor_head.py" in site for _, site in reads.sites)
