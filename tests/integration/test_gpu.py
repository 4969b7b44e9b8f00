"""The CUDA paths, on a real GPU. Skipped where there is none (CI, this project's development machine).

`tools/gpu_check.sh` runs these (and the GPU benchmark) on a lent GPU machine; the results of the last
such run are recorded in docs/benchmarks-gpu.md.
"""

import functools
import json

import pytest

from tests.conftest import TINY_MODELS, run_cli

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh)")]
FAST = ["--pretrained", "none", "--batch_size", "4", "--num_workers", "2", "--model", TINY_MODELS["segm"]]
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # what a laptop without a GPU looks like to torch


def _train(data, out, *extra, env=None):
    return run_cli("train", "--label", data / "label.txt", "--train", data / "train" / "segm.json",
                   "--valid", data / "valid" / "segm.json", "--test", data / "test" / "segm.json",
                   "--output_weights", out, *FAST, *extra, env=env)


def _rows(tsv):
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def _best(instances):
    """file name → its detections as (category, score, box), best first."""
    names = {img["id"]: img["file_name"] for img in instances["images"]}
    found = {name: [] for name in names.values()}
    for ann in instances["annotations"]:
        found[names[ann["image_id"]]].append((ann["category_id"], ann["score"], ann["bbox"]))
    return {name: sorted(dets, key=lambda d: -d[1]) for name, dets in found.items()}


def _twinned_fraction(ours, theirs, k=10):
    """The fraction of `ours` k best detections that `theirs` also found (same class, IoU > 0.8, score ± 0.02)."""
    total = twinned = 0
    for name, dets in ours.items():
        for cat, score, box in dets[:k]:
            total += 1
            twinned += any(c == cat and abs(s - score) < 0.02 and _iou(b, box) > 0.8 for c, s, b in theirs[name])
    return twinned / total if total else 0.0


def _iou(a, b):
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax2, bx2) - max(a[0], b[0])) * max(0.0, min(ay2, by2) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def test_doctor_runs_mmcv_ops_on_the_gpu():
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.cuda.get_device_name(0) in result.stdout
    assert "nms, RoIAlign ok on cuda" in result.stdout


def test_auto_device_trains_on_the_gpu_and_the_weights_serve_on_a_machine_without_one(small_data, tmp_path):
    weights = tmp_path / "out" / "gpu.pth"
    result = _train(small_data, weights, "--epoch", "2")  # --device auto (the default)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(weights.with_suffix(".train_stats.train.txt"))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # MMEngine logs peak GPU memory only when it trains on CUDA: proof that the GPU did the work.
    assert all(float(r["memory"]) > 0 for r in rows), rows
    assert len(_rows(weights.with_suffix(".train_stats.valid.txt"))) == 2
    stats = json.loads(weights.with_suffix(".test_stats.json").read_text())
    assert set(stats) >= {"stats", "class_stats"}

    # Weights saved from GPU tensors load where torch sees no GPU (the usual train-on-cluster, infer-on-laptop).
    outputs = {}
    for name, device, env in (("gpu", "cuda", None), ("cpu", "cpu", NO_GPU)):
        out = tmp_path / f"pred_{name}"
        result = run_cli("inference", "--label", small_data / "label.txt", "--data", small_data / "test" / "images",
                         "--model_weights", weights, "--output", out, "--score_threshold", "0.0",
                         "--device", device, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = json.loads((out / "instances.json").read_text())
    assert len(outputs["gpu"]["images"]) == len(outputs["cpu"]["images"]) == 5
    gpu, cpu = _best(outputs["gpu"]), _best(outputs["cpu"])
    assert any(gpu.values()), "no detections at all"
    # Same weights, same images: the GPU finds what the CPU finds. Not bit for bit: cuDNN's convolutions
    # (TF32 on Ampere and later) round differently, which can reorder near-equal scores.
    assert _twinned_fraction(gpu, cpu) >= 0.9 and _twinned_fraction(cpu, gpu) >= 0.9, (gpu, cpu)


def test_amp_trains_with_mixed_precision_and_finite_losses(small_data, tmp_path):
    weights = tmp_path / "amp.pth"
    result = _train(small_data, weights, "--epoch", "1", "--amp", "--device", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AmpOptimWrapper" in weights.with_suffix(".py").read_text()
    (row,) = _rows(weights.with_suffix(".train_stats.train.txt"))
    assert 0 < float(row["loss"]) < float("inf")


def test_the_default_on_the_gpu_is_fp16_with_its_loss_scale_in_the_weights(small_data, tmp_path):
    weights = tmp_path / "default.pth"
    result = _train(small_data, weights, "--epoch", "1", "--device", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision: fp16 (mixed, dynamic loss scaling)" in result.stderr
    meta = torch.load(weights, map_location="cpu", weights_only=True)["meta"]
    assert meta["precision"]["precision"] == "fp16" and meta["precision"]["loss_scale"] > 0
    fp32 = tmp_path / "fp32.pth"
    assert _train(small_data, fp32, "--epoch", "1", "--device", "cuda", "--precision", "fp32").returncode == 0
    assert "AmpOptimWrapper" not in fp32.with_suffix(".py").read_text()


def test_bf16_trains_with_every_op_of_the_model_on_the_gpu(small_data, tmp_path):
    """mmcv 2.1's RoIAlign has no bf16 kernel: mmdet's own extractor stops a --precision bf16 run in its first
    step; cvtk-job's extracts in fp32 (cvtk_job/roi_extractor.py)."""
    weights = tmp_path / "bf16.pth"
    result = _train(small_data, weights, "--epoch", "1", "--device", "cuda", "--precision", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SingleRoIExtractor(s) as CvtkSingleRoIExtractor" in result.stderr
    (row,) = _rows(weights.with_suffix(".train_stats.train.txt"))
    assert 0 < float(row["loss"]) < float("inf")
    assert torch.load(weights, map_location="cpu", weights_only=True)["meta"]["precision"]["precision"] == "bf16"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_under_autocast_each_roi_pools_from_the_level_and_corners_of_fp32(dtype):
    from mmcv.ops import RoIAlign

    from cvtk_job.roi_extractor import CvtkSingleRoIExtractor
    from tests.unit.test_roi_extractor import SETTINGS, SIDES, STRIDES, expected_level, square_rois

    extractor = CvtkSingleRoIExtractor(**SETTINGS).cuda()
    conv = torch.nn.Conv2d(4, 4, 1).cuda()  # an identity, to make the features under autocast as the FPN does
    torch.nn.init.dirac_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    levels = [torch.full((1, 4, 1024 // s, 1024 // s), float(i), device="cuda") for i, s in enumerate(STRIDES)]
    with torch.autocast("cuda", dtype=getattr(torch, dtype)):
        feats = tuple(conv(f) for f in levels)
        assert feats[0].dtype == getattr(torch, dtype)
        out = extractor(feats, square_rois(SIDES).cuda())
        rois = torch.tensor([[0, 1030.3, 200.6, 1130.3, 300.6]], device="cuda")
        corner = extractor(feats, rois)
    assert [sorted(set(o.float().flatten().tolist())) for o in out] == [[float(expected_level(s))] for s in SIDES]
    assert torch.equal(corner, RoIAlign(7, 1 / 4, 0)(feats[0].float(), rois).to(feats[0].dtype))


def test_batch_size_auto_measures_the_gpu_and_the_next_batch_would_not_fit_the_share(small_data, tmp_path):
    """What auto picks, from CUDA's own peaks: the peak it measured at its batch is under 85% of the free
    memory, and the line through its measurements puts one more image above it (within one step)."""
    weights = tmp_path / "auto.pth"
    args = [a if a != "4" else "auto" for a in FAST]
    result = run_cli("train", "--label", small_data / "label.txt", "--train", small_data / "train" / "segm.json",
                     "--output_weights", weights, *args, "--epoch", "1", "--device", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    auto = torch.load(weights, map_location="cpu", weights_only=True)["meta"]["batch_size_auto"]
    batch, peaks = auto["batch_size"], {int(b): v for b, v in auto["peak_mib"].items() if isinstance(v, int)}
    assert batch >= 1 and peaks[min(batch, max(peaks))] <= 0.85 * auto["free_mib"] + 1
    assert batch == auto["limit"] or max(peaks) >= batch  # either the data ran out, or the batch was measured


def test_resume_on_the_gpu_continues_from_the_checkpoint(small_data, tmp_path):
    weights = tmp_path / "r.pth"
    assert _train(small_data, weights, "--epoch", "1", "--device", "cuda").returncode == 0
    result = _train(small_data, weights, "--epoch", "2", "--device", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in _rows(weights.with_suffix(".train_stats.train.txt"))] == ["1", "2"]



def test_the_assigner_sampler_and_mask_targets_on_cuda_equal_mmdets():
    """On CUDA the assigner takes its whole-matrix way (int16 amax, int64 scatter_reduce), the sampler its stable
    sort, and the mask targets stay on the device: all must still give mmdet's results there."""
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    from mmdet.models.task_modules.assigners import MaxIoUAssigner
    from mmengine.config import ConfigDict

    from cvtk_job import masktargets
    from cvtk_job.assigner import CvtkMaxIoUAssigner
    from tests.unit.test_assigner import SETTINGS, overlaps_with_ties
    from tests.unit.test_masktargets import batch

    for setting in SETTINGS.values():
        for num_gts, num_priors in ((1, 40), (60, 500), (300, 20000)):
            overlaps = overlaps_with_ties(num_gts, num_priors, 0).cuda()
            labels = torch.randint(0, 5, (num_gts,)).cuda()
            want = MaxIoUAssigner(**setting).assign_wrt_overlaps(overlaps.clone(), labels)
            got = CvtkMaxIoUAssigner(**setting).assign_wrt_overlaps(overlaps.clone(), labels)
            assert torch.equal(got.gt_inds, want.gt_inds) and torch.equal(got.labels, want.labels)
    from mmdet.models.task_modules.samplers import RandomSampler

    from cvtk_job.assigner import CvtkRandomSampler
    from tests.unit.test_assigner import SAMPLERS, assignment

    for setting in SAMPLERS.values():
        for num_priors, num_gts in ((200_000, 100), (3000, 1), (200, 0), (40, 30)):
            results = []
            for cls in (RandomSampler, CvtkRandomSampler):
                assigned, priors, gt = assignment(num_priors, num_gts, 0)
                assigned.gt_inds, assigned.labels = assigned.gt_inds.cuda(), assigned.labels.cuda()
                assigned.max_overlaps = assigned.max_overlaps.cuda()
                priors.priors, gt.bboxes, gt.labels = priors.priors.cuda(), gt.bboxes.cuda(), gt.labels.cuda()
                torch.manual_seed(0)
                results.append(cls(**setting).sample(assigned, priors, gt))
            assert results[1].pos_inds.is_cuda
            for field in ("pos_inds", "neg_inds", "pos_gt_bboxes", "pos_is_gt"):
                assert torch.equal(getattr(results[1], field), getattr(results[0], field)), field
    head = FCNMaskHead(num_convs=1, in_channels=4, conv_out_channels=4, num_classes=2)
    for soft in (False, True):
        cfg = ConfigDict(mask_size=28, soft_mask_target=soft)
        results, gts = batch(3)
        for r in results:
            r.pos_priors, r.pos_assigned_gt_inds = r.pos_priors.cuda(), r.pos_assigned_gt_inds.cuda()
        want = head.get_targets(results, gts, cfg)
        got = masktargets.get_targets(head, results, gts, cfg)
        assert got.is_cuda and got.dtype == want.dtype and torch.equal(got, want)


def test_the_rpn_targets_on_cuda_equal_mmdets_with_fewer_syncs():
    """CvtkRPNHead takes its GPU way by itself on CUDA: mmdet's targets and random draws, and CUDA's own count of
    its synchronisations holds only the sampler's (one read of its counts per image, and a copy of each random
    permutation to the GPU), where mmdet's head adds 6 per image (tests/unit/test_rpn_head.py counts them on the
    CPU) to its sampler's and assigner's."""
    from mmengine.registry import init_default_scope

    from tests.unit.test_rpn_head import CASES, assert_same, batch, heads, targets

    init_default_scope("mmdet")
    for allowed_border in (-1, 0):
        mmdets, ours = (head.cuda() for head in heads(allowed_border))
        for case in CASES.values():
            gts, metas = batch(*case, device="cuda")
            want, n_mmdet = _cuda_syncs(functools.partial(targets, mmdets, gts, metas, device="cuda"))
            got, n_ours = _cuda_syncs(functools.partial(targets, ours, gts, metas, device="cuda"))
            assert got[0][0][0].is_cuda
            assert_same(got, want)
            assert n_ours <= 3 * len(gts) and n_ours + 6 * len(gts) <= n_mmdet, (case, n_ours, n_mmdet)


def test_the_box_head_losses_on_cuda_equal_mmdets_without_syncs():
    """CvtkShared2FCBBoxHead on CUDA: mmdet's losses and gradients, and no synchronisation in its loss, forward or
    backward, where mmdet's head makes 6 in the forward and one in the backward (the L1 loss is cvtk-job's in
    both, so it adds none; tests/unit/test_bbox_head.py counts the same on the CPU)."""
    from mmengine.registry import init_default_scope

    from tests.unit.test_bbox_head import CASES, heads, loss_step, outputs, sampled

    init_default_scope("mmdet")
    for agnostic in (False, True):
        mmdets, ours, train_cfg = (x.cuda() if isinstance(x, torch.nn.Module) else x
                                   for x in heads(reg_class_agnostic=agnostic))
        mmdets.loss_bbox = ours.loss_bbox  # (cvtk-job's L1 loss: the head's own reads only)
        for case in CASES.values():
            results = [r.to("cuda") for r in sampled(case, 0)]
            got, n = {}, {}
            for name, head in (("mmdet", mmdets), ("ours", ours)):
                given = outputs(head, results, 0, device="cuda")
                got[name], n[name] = _cuda_syncs(functools.partial(loss_step, head, results, train_cfg, 0, given))
            for key in got["mmdet"][0]:
                assert torch.equal(got["ours"][0][key], got["mmdet"][0][key]), key
            for a, b in zip(got["ours"][2:], got["mmdet"][2:], strict=True):
                assert a.is_cuda and torch.equal(a, b)
            positives = sum(len(r.pos_priors) for r in results)
            # mmdet's: the average factor, any(), 3 boolean indexings (4 unless class-agnostic) and the mask's
            # scatter in backward; with no positives the empty box loss's boolean index and its backward instead.
            assert n["ours"] == 0 and n["mmdet"] >= (6 if positives else 4), (case, n)


def test_the_roi_head_losses_on_cuda_equal_mmdets_with_the_same_draws():
    """CvtkStandardRoIHead on CUDA (its sampler reads all images' counts at once, then samples each in mmdet's
    order): mmdet's losses, gradients within RoIAlign's atomic-add reordering, and the same random draws."""
    from mmengine.registry import init_default_scope

    from tests.unit.test_roi_head import CASES, heads, loss_step

    init_default_scope("mmdet")
    for task in ("segm", "det"):
        mmdets, ours = (head.cuda() for head in heads(task))
        for objects in CASES.values():
            want, got = loss_step(mmdets, objects, 0, "cuda"), loss_step(ours, objects, 0, "cuda")
            assert got[0].keys() == want[0].keys()
            for key in want[0]:
                torch.testing.assert_close(got[0][key], want[0][key], rtol=1e-5, atol=1e-6)
            for a, b in zip(got[1], want[1], strict=True):
                assert a.is_cuda
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            assert torch.equal(got[2], want[2])


def _cuda_syncs(fn):
    """fn()'s result and the synchronisations CUDA itself reports while it runs (torch's sync debug mode warns
    once per synchronizing call: .item(), nonzero, a copy to the host...)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def _loss_step(loss, pred, *args, **kwargs):
    value = loss(pred, *args, **kwargs)
    value.backward()
    return value.detach()


def test_the_roi_extractor_and_losses_on_cuda_equal_mmdets_with_the_syncs_cuda_counts():
    """bench/step_syncs.py counts host reads on the CPU; here CUDA counts them: the extractor reads once where
    mmdet reads once per level, the L1 and sigmoid cross-entropy losses (forward and backward) not at all, and
    all still give mmdet's results on the GPU."""
    from mmdet.models.losses import CrossEntropyLoss, L1Loss
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

    from cvtk_job.losses import CvtkCrossEntropyLoss, CvtkL1Loss
    from cvtk_job.roi_extractor import CvtkSingleRoIExtractor
    from tests.unit.test_losses import box_case, label_case
    from tests.unit.test_roi_extractor import SETTINGS, STRIDES, random_rois

    torch.manual_seed(0)
    feats = tuple(torch.randn(2, 4, 512 // s, 512 // s, device="cuda") for s in STRIDES)
    rois = random_rois(200).cuda()
    out, syncs, grads = {}, {}, {}
    for cls in (CvtkSingleRoIExtractor, SingleRoIExtractor):
        leaves = tuple(f.clone().requires_grad_() for f in feats)
        out[cls], syncs[cls] = _cuda_syncs(lambda c=cls, x=leaves: c(**SETTINGS).cuda()(x, rois))
        out[cls].square().sum().backward()
        grads[cls] = [f.grad for f in leaves]
    assert torch.equal(out[CvtkSingleRoIExtractor], out[SingleRoIExtractor])
    for a, b in zip(grads[CvtkSingleRoIExtractor], grads[SingleRoIExtractor], strict=True):
        torch.testing.assert_close(a, b)  # RoIAlign's CUDA backward adds atomically: the order is not fixed
    assert syncs == {CvtkSingleRoIExtractor: 1, SingleRoIExtractor: 4}

    pred, target, weight = (t.cuda() for t in box_case(3000, 40, 0))
    scores, labels, label_weights = (t.cuda() for t in label_case(3000, 1, 0))
    cases = ((CvtkL1Loss, L1Loss, {}, (pred, target, weight), {"avg_factor": 256.0}),
             (CvtkCrossEntropyLoss, CrossEntropyLoss, {"use_sigmoid": True}, (scores, labels, label_weights),
              {"avg_factor": 256.0}))
    for ours, theirs, settings, args, kwargs in cases:
        results = {}
        for cls in (ours, theirs):
            leaf = args[0].clone().requires_grad_()
            value, n = _cuda_syncs(functools.partial(_loss_step, cls(**settings), leaf, *args[1:], **kwargs))
            results[cls] = value, leaf.grad, n
        (a, grad_a, n_ours), (b, grad_b, n_theirs) = results[ours], results[theirs]
        assert torch.equal(a, b) and torch.equal(grad_a, grad_b)
        assert (n_ours, n_theirs) == (0, 1), ours.__name__
