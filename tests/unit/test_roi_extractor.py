"""cvtk_job/roi_extractor.py: under mixed precision each RoI takes its features from the level and at the
corners fp32 gives; in fp32, mmdet's results and gradients exactly; one host read per extraction where mmdet
makes one per level. (mmcv's RoIAlign runs fp16 on the CPU too, so mmdet's fp16 behaviour is reproduced here;
the CUDA twin is in tests/integration/test_gpu.py. Host reads are counted by bench/step_syncs.py's instrument.)"""

import math
import sys
from pathlib import Path

import pytest
import torch
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

from cvtk_job.roi_extractor import CvtkSingleRoIExtractor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_syncs  # noqa: E402

STRIDES = [4, 8, 16, 32]
# Mask R-CNN's bbox RoI extractor (mmdet's configs/_base_/models/mask-rcnn_r50_fpn.py), fewer channels.
SETTINGS = dict(roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0), out_channels=4,
                featmap_strides=STRIDES)
SIDES = [20, 60, 120, 200, 250, 255, 257, 300, 400, 440, 447, 449, 500, 800]


def expected_level(side):
    """mmdet's mapping (FPN paper, eq. 1; finest_scale 56) in float64: floor(log2(sqrt(area) / 56)), 0..3."""
    return min(3, max(0, math.floor(math.log2(side / 56 + 1e-6))))


def square_rois(sides, x0=10.0):
    return torch.tensor([[0, x0, x0, x0 + s, x0 + s] for s in sides], dtype=torch.float32)


def level_valued_features(dtype, size=1024):
    """Level i is the constant i everywhere: an RoI's pooled value says which level it came from."""
    return tuple(torch.full((1, 4, size // s, size // s), float(i), dtype=dtype) for i, s in enumerate(STRIDES))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_each_roi_pools_from_the_level_fp32_gives(dtype):
    want = [expected_level(s) for s in SIDES]
    assert want.count(2) >= 5  # the sides between 256 and 448 where fp16's w * h overflows are covered
    out = CvtkSingleRoIExtractor(**SETTINGS)(level_valued_features(dtype), square_rois(SIDES))
    assert out.dtype == dtype and out.shape == (len(SIDES), 4, 7, 7)
    got = [sorted(set(o.float().flatten().tolist())) for o in out]
    assert got == [[float(level)] for level in want]


def test_mmdets_own_extractor_misplaces_large_rois_in_fp16():
    """Why the swap: mmdet 3.3 computes the level from fp16 RoIs, whose area overflows beyond 256 x 256."""
    out = SingleRoIExtractor(**SETTINGS)(level_valued_features(torch.float16), square_rois(SIDES))
    got = [int(o[0, 0, 0]) for o in out]
    wrong = [s for s, g in zip(SIDES, got, strict=True) if g != expected_level(s)]
    assert wrong == [257, 300, 400, 440, 447]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rois_are_sampled_at_their_fp32_corners(dtype):
    """Corners beyond x = 1024 (fp16: 1-pixel steps; bf16: 8) pool what fp32 pools, rounded once at the end;
    RoIAlign run here directly on the level the mapping picks (side 100: level 0, stride 4)."""
    from mmcv.ops import RoIAlign

    torch.manual_seed(0)
    feats = tuple(torch.randn(1, 4, 1400 // s, 1400 // s).to(dtype) for s in STRIDES)
    rois = torch.tensor([[0, 1030.3, 200.6, 1130.3, 300.6], [0, 1200.7, 1000.2, 1300.7, 1100.2]])
    want = RoIAlign(7, 1 / 4, 0)(feats[0].float(), rois).to(dtype)
    got = CvtkSingleRoIExtractor(**SETTINGS)(feats, rois)
    assert torch.equal(got, want)
    if dtype == torch.float16:
        mmdets = SingleRoIExtractor(**SETTINGS)(feats, rois)
        assert not torch.equal(mmdets, want)  # its corners were rounded to the features' dtype first
    else:  # mmcv 2.1's RoIAlign has no bf16 kernel, on the CPU as on CUDA: mmdet's --precision bf16 stops here
        with pytest.raises(NotImplementedError, match="BFloat16"):
            SingleRoIExtractor(**SETTINGS)(feats, rois)


def random_rois(n, seed=0, images=2):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    return torch.cat([torch.randint(0, images, (n, 1), generator=g).float(), xy,
                      xy + 4 + torch.rand(n, 2, generator=g) * 250], 1)


def run(cls, feats, rois, roi_scale_factor=None):
    """Output and the gradients of the features and of the extractor's parameters (none in mmdet's RoIAlign, but
    mmdet adds them to the graph: kept generic) for a loss that weighs every output element differently."""
    torch.manual_seed(1)
    extractor = cls(**SETTINGS)
    leaves = tuple(f.detach().clone().requires_grad_() for f in feats)
    out = extractor(leaves, rois, roi_scale_factor)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weights).sum().backward()
    return out, [f.grad for f in leaves]


@pytest.mark.parametrize("roi_scale_factor", [None, 1.5])
@pytest.mark.parametrize("sides", ["all levels", "level 1 empty", "only level 0"])
def test_fp32_results_and_gradients_are_mmdets_exactly(sides, roi_scale_factor):
    """Bit-equal: each level's RoIAlign gets mmdet's RoIs in mmdet's order. A level no RoI maps to still gets a
    (zero) gradient, as in mmdet: DDP waits for every level."""
    torch.manual_seed(0)
    feats = tuple(torch.randn(2, 4, 512 // s, 512 // s) for s in STRIDES)
    rois = random_rois(40)
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    level = [expected_level(math.sqrt(a)) for a in area.tolist()]
    if sides == "level 1 empty":
        rois = rois[[lv != 1 for lv in level]]
    elif sides == "only level 0":
        rois = rois[[lv == 0 for lv in level]]
    assert len(rois) >= 3
    got, got_grads = run(CvtkSingleRoIExtractor, feats, rois, roi_scale_factor)
    want, want_grads = run(SingleRoIExtractor, feats, rois, roi_scale_factor)
    assert got.dtype == want.dtype and torch.equal(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a is not None and b is not None and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rois_with_no_level_keep_zero_features_as_in_mmdet(dtype):
    """NaN coordinates (a diverging fp16 step decodes NaN deltas into NaN proposals; dynamic loss scaling is meant
    to skip such a step, not to crash on it) and inverted boxes (a negative area) map to no level in mmdet: their
    features stay zero. Ours pools the others exactly as mmdet and leaves those zero too."""
    torch.manual_seed(0)
    feats = tuple(torch.randn(2, 4, 512 // s, 512 // s) for s in STRIDES)
    rois = random_rois(30)
    rois[[3, 17], 1:] = float("nan")
    rois[8, 1:] = torch.tensor([100.0, 100.0, 60.0, 180.0])  # x2 < x1
    got, got_grads = run(CvtkSingleRoIExtractor, tuple(f.to(dtype) for f in feats), rois)
    want, want_grads = run(SingleRoIExtractor, feats, rois)
    assert not got[[3, 17, 8]].any() and got[[0, 1, 2]].abs().sum() > 0
    if dtype == torch.float32:
        assert torch.equal(got, want)
        for a, b in zip(got_grads, want_grads, strict=True):
            assert torch.equal(a, b)
    else:  # fp16 features, pooled in fp32 (test_each_roi_pools_from_the_level_fp32_gives): the same zeros
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_no_rois_every_level_in_the_graph():
    feats = tuple(torch.randn(1, 4, 256 // s, 256 // s) for s in STRIDES)
    got, grads = run(CvtkSingleRoIExtractor, feats, torch.zeros(0, 5))
    assert got.shape == (0, 4, 7, 7) and all(g is not None and not g.any() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_host_read_per_extraction(dtype):
    """mmdet: a nonzero per level (each a GPU wait); ours: the per-level counts, read once."""
    feats = tuple(torch.randn(2, 4, 512 // s, 512 // s).to(dtype) for s in STRIDES)
    rois = random_rois(60)
    reads = {}
    for cls in (CvtkSingleRoIExtractor, SingleRoIExtractor):
        with step_syncs.Counter() as counter:
            cls(**SETTINGS)(feats, rois)
        reads[cls.__name__] = counter.total
    assert reads == {"CvtkSingleRoIExtractor": 1, "SingleRoIExtractor": 4}


def test_gradients_reach_half_precision_features():
    torch.manual_seed(0)
    feats = tuple(torch.randn(2, 4, 512 // s, 512 // s) for s in STRIDES)
    rois = random_rois(30)

    half = tuple(f.half().requires_grad_() for f in feats)
    CvtkSingleRoIExtractor(**SETTINGS)(half, rois).float().square().sum().backward()
    assert all(f.grad is not None and f.grad.dtype == torch.float16 for f in half)
    assert sum(bool(f.grad.abs().sum() > 0) for f in half) >= 2  # RoIs of several sizes: several levels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_features_pool_what_contiguous_ones_do(dtype):
    """mmcv's RoIAlign indexes the raw buffer as NCHW: given a channels_last map, mmdet's extractor pools scrambled
    values without an error; ours hands it NCHW."""
    torch.manual_seed(0)
    feats = tuple(torch.randn(2, 4, 512 // s, 512 // s).to(dtype) for s in STRIDES)
    last = tuple(f.contiguous(memory_format=torch.channels_last) for f in feats)
    assert all(not f.is_contiguous() for f in last)
    rois = random_rois(40)
    want = CvtkSingleRoIExtractor(**SETTINGS)(feats, rois)
    assert torch.equal(CvtkSingleRoIExtractor(**SETTINGS)(last, rois), want)
    if dtype == torch.float32:
        assert not torch.allclose(SingleRoIExtractor(**SETTINGS)(last, rois), want, atol=0.1)
