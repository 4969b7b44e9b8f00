"""CvtkStandardRoIHead: mmdet's R-CNN losses and gradients, bit for bit, with the sampler's counts read once for all
images (mmdet's loop samples one image at a time: a read per image, plus its sampler's own).

The sampler's way for GPU tensors is forced here (CPU tensors); mmdet's StandardRoIHead built from the same config
with the same seed is the reference, each run from the same random state."""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

from cvtk_job import mmconfig
from cvtk_job.assigner import CvtkRandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_syncs  # noqa: E402

NUM_CLASSES, SIZE = 3, (96, 128)  # (height, width) of every image
STRIDES = (4, 8, 16, 32)


@pytest.fixture(autouse=True)
def gpu_way(monkeypatch):
    init_default_scope("mmdet")
    monkeypatch.setattr(CvtkRandomSampler, "vectorized", staticmethod(lambda gt_inds: True))


def heads(task="segm"):
    """mmdet's StandardRoIHead and ours (cvtk-job's training modules), from the default config's, same weights."""
    model = Config.fromfile(mmconfig.resolve_model(None, task)).model
    cfg = copy.deepcopy(dict(model.roi_head, train_cfg=model.train_cfg.rcnn, test_cfg=model.test_cfg.rcnn))
    cfg["train_cfg"]["sampler"]["num"] = 64  # (512 in the config: the fully connected head's time, nothing more)
    cfg["bbox_head"]["num_classes"] = NUM_CLASSES
    if "mask_head" in cfg:
        cfg["mask_head"]["num_classes"] = NUM_CLASSES
    ours = copy.deepcopy(cfg)
    mmconfig.use_training_modules(ours)
    assert ours["type"] == "CvtkStandardRoIHead" and ours["train_cfg"]["sampler"]["type"] == "CvtkRandomSampler"
    built = []
    for c in (cfg, ours):
        torch.manual_seed(0)
        built.append(MODELS.build(c))
    return built


def inputs(objects, seed):
    """Pyramid features, RPN proposals (some around each object) and data samples for images with `objects[i]`
    objects each."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    feats = tuple(torch.randn(len(objects), 256, SIZE[0] // s, SIZE[1] // s, generator=g) for s in STRIDES)
    proposals, samples = [], []
    for n in objects:
        xy = rng.uniform(0, 80, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 40, (n, 2))], 1).clip(0, SIZE[1] - 1).astype(np.float32)
        masks = np.zeros((n, *SIZE), np.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
            masks[k, y0:y1 + 1, x0:x1 + 1] = 1
        sample = DetDataSample(metainfo=dict(img_shape=SIZE, pad_shape=SIZE, batch_input_shape=SIZE))
        sample.gt_instances = InstanceData(bboxes=torch.from_numpy(boxes),
                                           labels=torch.from_numpy(rng.integers(0, NUM_CLASSES, n)),
                                           masks=BitmapMasks(masks, *SIZE))
        samples.append(sample)
        near = np.repeat(boxes, 20, 0) + rng.normal(0, 4, (20 * n, 4)).astype(np.float32)
        near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 1)  # proposals are decoded boxes: never inverted
        anywhere = rng.uniform(0, 90, (300, 2))
        anywhere = np.concatenate([anywhere, anywhere + rng.uniform(4, 50, (300, 2))], 1)
        bboxes = torch.from_numpy(np.concatenate([near, anywhere]).astype(np.float32))
        proposals.append(InstanceData(bboxes=bboxes, scores=torch.rand(len(bboxes), generator=g)))
    return feats, proposals, samples


def loss_step(head, objects, seed, device="cpu"):
    """head.loss and backward from a fixed random state → (losses, feature gradients, random state after)."""
    feats, proposals, samples = inputs(objects, seed)
    feats = tuple(f.to(device).requires_grad_() for f in feats)
    proposals, samples = [p.to(device) for p in proposals], [s.to(device) for s in samples]
    torch.manual_seed(seed)
    losses = head.loss(feats, proposals, samples)
    sum(v.sum() for v in losses.values()).backward()
    return losses, [f.grad for f in feats], torch.get_rng_state()


CASES = {"three images": [5, 1, 12], "one image": [3], "an image without objects": [4, 0]}


@pytest.mark.parametrize("task", ["segm", "det"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_losses_gradients_and_draws_are_mmdets(task, case):
    mmdets, ours = heads(task)
    for seed in range(2):
        want, got = loss_step(mmdets, CASES[case], seed), loss_step(ours, CASES[case], seed)
        assert got[0].keys() == want[0].keys() and ("loss_mask" in want[0]) == (task == "segm")
        for key in want[0]:
            assert torch.equal(got[0][key], want[0][key]), key
        for a, b in zip(got[1], want[1], strict=True):
            assert torch.equal(a, b)
        assert torch.equal(got[2], want[2])  # the same random draws (the sampler's permutations), in order


def test_the_sampler_reads_its_counts_once_for_all_images():
    mmdets, ours = heads()
    reads = {}
    for name, head in (("mmdet", mmdets), ("ours", ours)):
        with step_syncs.Counter() as reads[name]:
            loss_step(head, CASES["three images"], 0)
    sampling = {name: sorted(site for _, site in counter.sites.elements()
                             if "sampler" in site or "cvtk_job/assigner.py" in site)
                for name, counter in reads.items()}
    assert len(sampling["ours"]) == 1 and "(sample_counts)" in sampling["ours"][0]
    assert len(sampling["mmdet"]) == 4 * 3  # nonzero and unique, positives and negatives, per image


def test_on_the_cpu_it_is_mmdets_loop(monkeypatch):
    monkeypatch.undo()
    init_default_scope("mmdet")
    _, ours = heads("det")
    with step_syncs.Counter() as reads:
        loss_step(ours, CASES["three images"], 0)
    assert not any("sample_counts" in site for _, site in reads.sites)
