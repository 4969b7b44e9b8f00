"""mmconfig.build_config: a pure function from options to the MMEngine config."""

import functools

import pytest

from cvtk_job import mmconfig
from cvtk_job.errors import UserError
from cvtk_job.options import TrainOptions

CLASSES = ["flower", "green_fruit", "red_fruit"]


def build(tmp_path, task="segm", context=None, **overrides):
    fields = dict(label="l.txt", train="t.json", output_weights=str(tmp_path / "x.pth"), pretrained="none",
                  task=task, num_workers=2)
    fields.update(overrides)
    opts = TrainOptions(**fields)
    ctx = mmconfig.RunContext(
        classes=CLASSES, data=mmconfig.DataFiles(str(tmp_path / "train.json"), str(tmp_path / "valid.json"),
                                                 str(tmp_path / "test.json")),
        work_dir=str(tmp_path / "x"), output_prefix=str(tmp_path / "x"), num_train_images=60, **(context or {}))
    return mmconfig.build_config(opts, mmconfig.resolve_model(opts.model, task), ctx)


def _all_values(node, key):
    found = []
    mmconfig._walk(node, lambda d: found.append(d[key]) if key in d else None)
    return found


def test_default_models_follow_the_task():
    assert mmconfig.resolve_model(None, "segm").endswith("mask-rcnn_r101_fpn_1x_coco.py")
    assert mmconfig.resolve_model(None, "det").endswith("faster-rcnn_r101_fpn_1x_coco.py")


def test_unknown_model_name_suggests_the_closest_names():
    with pytest.raises(UserError, match=r"--model mask-rcnn_r51_fpn_1x_coco: no such config in mmdet; "
                                        r"did you mean mask-rcnn_r50_fpn_1x_coco"):
        mmconfig.resolve_model("mask-rcnn_r51_fpn_1x_coco", "segm")


def test_every_num_classes_comes_from_the_label_file(tmp_path):
    cfg = build(tmp_path)
    assert _all_values(cfg.model, "num_classes") == [3, 3]  # bbox head and mask head
    assert cfg.train_dataloader.dataset.metainfo.classes == tuple(CLASSES)


def test_random_init_leaves_no_download_in_the_model(tmp_path):
    cfg = build(tmp_path, pretrained="none")
    assert not [i for i in _all_values(cfg.model, "init_cfg") if isinstance(i, dict) and i.get("type") == "Pretrained"]
    assert cfg.load_from is None


def _pretrained_inits(cfg):
    return [i for i in _all_values(cfg.model, "init_cfg") if isinstance(i, dict) and i.get("type") == "Pretrained"]


@pytest.mark.parametrize("task", ["segm", "det"])
def test_a_checkpoint_to_start_from_leaves_no_imagenet_init_and_is_loaded_by_our_hook(tmp_path, task):
    cfg = build(tmp_path, task, pretrained="auto", context=dict(pretrained="/ckpt/coco.pth"))
    assert not _pretrained_inits(cfg)  # the default R101 configs name torchvision://resnet101
    assert cfg.load_from is None and cfg.resume is False
    assert [h for h in cfg.custom_hooks if h["type"] == "CvtkPretrained"] == [
        dict(type="CvtkPretrained", checkpoint="/ckpt/coco.pth")]
    assert "custom_imports" not in cfg  # X.py must load where cvtk-job is not installed


def test_the_run_guard_comes_after_the_upload_of_an_epoch(tmp_path):
    cfg = build(tmp_path, context=dict(remote_prefix="s3://b/run/x"))
    types = [h["type"] for h in cfg.custom_hooks]
    assert types[-2:] == ["CvtkSyncOut", "CvtkRunGuard"]  # equal priority: registration order decides
    assert cfg.train_dataloader.worker_init_fn == dict(type="cvtk_worker_init", num_workers=2, seed=0)


def test_resuming_loads_the_training_state_and_not_the_pretrained_file(tmp_path):
    cfg = build(tmp_path, pretrained="auto", context=dict(load_from="/w/epoch_2.pth", resume=True))
    assert not _pretrained_inits(cfg)
    assert cfg.load_from == "/w/epoch_2.pth" and cfg.resume is True
    assert not [h for h in cfg.custom_hooks if h["type"] == "CvtkPretrained"]


def test_masks_only_for_segm(tmp_path):
    segm, det = build(tmp_path, "segm"), build(tmp_path / "d", "det")
    load = [s for s in segm.train_dataloader.dataset.pipeline if s["type"] == "LoadAnnotations"][0]
    assert load["with_mask"] is True and segm.val_evaluator.metric == ["bbox", "segm"]
    load = [s for s in det.train_dataloader.dataset.pipeline if s["type"] == "LoadAnnotations"][0]
    assert load["with_mask"] is False and det.val_evaluator.metric == ["bbox"]


def test_auto_lr_scales_from_batch_16_and_a_number_overrides_it(tmp_path):
    assert build(tmp_path).auto_scale_lr == dict(enable=True, base_batch_size=16)
    cfg = build(tmp_path, lr="0.001")
    assert cfg.optim_wrapper.optimizer.lr == 0.001 and cfg.auto_scale_lr.enable is False
    with pytest.raises(UserError, match="--lr fast: not a number"):
        build(tmp_path, lr="fast")


def test_schedule_follows_epochs_and_warmup_is_capped(tmp_path):
    cfg = build(tmp_path, epoch=24, batch_size=4)  # 60 images / 4 = 15 iterations an epoch, 360 in all
    warmup, steps = cfg.param_scheduler
    assert warmup["end"] == 36  # 10% of the run, not 500 iterations
    assert steps["milestones"] == [16, 22] and steps["end"] == 24  # [8, 11] of 12 epochs, stretched


def test_validation_and_test_keep_images_without_annotations(tmp_path):
    cfg = build(tmp_path)
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        assert loader.dataset.test_mode is True and "filter_cfg" not in loader.dataset
        assert loader.sampler.shuffle is False


def test_image_size_resizes_every_pipeline(tmp_path):
    cfg = build(tmp_path, image_size=[256, 192])
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        assert [s["scale"] for s in loader.dataset.pipeline if s["type"] == "Resize"] == [(256, 192)]


def test_seed_reaches_mmengine_randomness(tmp_path):
    assert build(tmp_path, seed=42).randomness == dict(seed=42, deterministic=False)


def test_model_index_knows_the_default_checkpoints():
    url = mmconfig.checkpoint_url(mmconfig.resolve_model(None, "segm"))
    assert url.startswith("https://") and "mask_rcnn_r101_fpn_1x_coco" in url


@pytest.mark.parametrize("task", ["segm", "det"])
def test_the_models_detection_cap_follows_the_data(tmp_path, task):
    """With max_detections 250 the model outputs up to 250 detections per image (mmdet's 100 cut dense images),
    and the RPN proposes at least that many (its 1000 is kept); without it the config's numbers stay."""
    cfg = build(tmp_path, task, context={"max_detections": 250})
    assert cfg.model.test_cfg.rcnn.max_per_img == 250
    assert cfg.model.test_cfg.rpn.max_per_img == 1000
    cfg = build(tmp_path, task, context={"max_detections": 1500})
    assert (cfg.model.test_cfg.rcnn.max_per_img, cfg.model.test_cfg.rpn.max_per_img) == (1500, 1500)
    cfg = build(tmp_path, task)
    assert (cfg.model.test_cfg.rcnn.max_per_img, cfg.model.test_cfg.rpn.max_per_img) == (100, 1000)


@pytest.mark.parametrize(("flags", "device", "chosen", "warned"), [
    ({}, "cuda", "fp16", False),  # the default on a GPU: mixed precision
    ({}, "cpu", "fp32", False),
    ({"precision": "bf16"}, "cuda", "bf16", False),
    ({"precision": "fp32"}, "cuda", "fp32", False),
    ({"amp": True}, "cuda", "fp16", False),  # the old flag
    ({"precision": "fp16"}, "cpu", "fp32", True),
    ({"amp": True}, "cpu", "fp32", True),
])
def test_precision_defaults_to_fp16_on_cuda_and_says_when_it_cannot_be_had(tmp_path, flags, device, chosen, warned):
    fields = dict(label="l.txt", train="t.json", output_weights="x.pth", **flags)
    got, why = mmconfig.precision(TrainOptions(**fields), device)
    assert got == chosen and bool(why) == warned
    if warned:
        assert why == f"--precision {flags.get('precision', 'fp16')} needs a CUDA GPU; training in fp32 on {device}"


@pytest.mark.parametrize(("precision", "wrapper"), [
    ("fp32", {"type": "OptimWrapper"}),
    ("fp16", {"type": "AmpOptimWrapper", "loss_scale": "dynamic", "dtype": "float16"}),
    ("bf16", {"type": "AmpOptimWrapper", "loss_scale": 1.0, "dtype": "bfloat16"}),
])
def test_the_precision_sets_the_optimizer_wrapper(tmp_path, precision, wrapper):
    cfg = build(tmp_path, context={"precision": precision, "device": "cuda"})
    assert {k: cfg.optim_wrapper.get(k) for k in wrapper} == wrapper


def test_dense_training_images_move_the_rpn_assignment_to_the_cpu_above_what_fits(tmp_path):
    # 2 GiB / (36 bytes x 0.25 anchors per pixel x 1333 x 800 pixels) = 223.7 objects
    assert mmconfig.assign_threshold(1333, 800) == 223
    assert mmconfig.assign_threshold(256, 192) == 2 * 2**30 // (36 * 0.25 * 256 * 192)
    dense = build(tmp_path, context={"densest_train": 224})
    assert dense.model.train_cfg.rpn.assigner.gpu_assign_thr == 223
    assert "gpu_assign_thr" not in dense.model.train_cfg.rcnn.assigner
    sparse = build(tmp_path, context={"densest_train": 223})
    assert "gpu_assign_thr" not in sparse.model.train_cfg.rpn.assigner
    small = build(tmp_path, context={"densest_train": 224}, image_size=[256, 192])
    assert "gpu_assign_thr" not in small.model.train_cfg.rpn.assigner  # 4,854 fit at 256x192


@pytest.mark.parametrize("task", ["segm", "det"])
def test_the_training_modules_keep_every_setting_and_stay_out_of_the_written_config(tmp_path, task):
    """The config (written as X.py) names mmdet's assigner, sampler, RoI extractor and losses; the model CvtkRunner
    builds from it uses cvtk-job's, with the same settings (including the dense-image CPU threshold)."""
    import copy

    from mmengine.config import Config

    base = Config.fromfile(mmconfig.resolve_model(None, task))
    cfg = build(tmp_path, task=task, context={"densest_train": 224})
    model = copy.deepcopy(cfg.model)
    extractors = {"segm": ("bbox_roi_extractor", "mask_roi_extractor"), "det": ("bbox_roi_extractor",)}[task]
    losses = {"rpn_head.loss_cls": "CrossEntropyLoss", "rpn_head.loss_bbox": "L1Loss",
              "roi_head.bbox_head.loss_cls": "CrossEntropyLoss", "roi_head.bbox_head.loss_bbox": "L1Loss"}
    if task == "segm":
        losses["roi_head.mask_head.loss_mask"] = "CrossEntropyLoss"
    assert mmconfig.use_training_modules(model) == {
        "MaxIoUAssigner": 2, "RandomSampler": 2, "SingleRoIExtractor": len(extractors), "L1Loss": 2,
        "CrossEntropyLoss": len(losses) - 2, "RPNHead": 1, "Shared2FCBBoxHead": 1, "StandardRoIHead": 1}
    for where, name in (("rpn_head", "RPNHead"), ("roi_head.bbox_head", "Shared2FCBBoxHead"),
                        ("roi_head", "StandardRoIHead")):
        # Against the written config (the box head's classes are the dataset's): only the type differs.
        got, want = (dict(functools.reduce(lambda d, k: d[k], where.split("."), m)) for m in (model, cfg.model))
        assert want.pop("type") == name and got.pop("type") == "Cvtk" + name
        for part in ("loss_cls", "loss_bbox", "bbox_head", "bbox_roi_extractor", "mask_roi_extractor", "mask_head"):
            got.pop(part, None), want.pop(part, None)  # (their own swaps: checked in this loop and below)
        assert got == want
    for where, name in losses.items():
        got, want, written = (functools.reduce(lambda d, k: d[k], where.split("."), m)
                              for m in (model, base.model, cfg.model))
        got, want = dict(got), dict(want)
        assert written.type == want.pop("type") == name and got.pop("type") == "Cvtk" + name
        assert got == want
    for name in extractors:
        assert cfg.model.roi_head[name].type == "SingleRoIExtractor"
        got, want = dict(model.roi_head[name]), dict(base.model.roi_head[name])
        assert want.pop("type") == "SingleRoIExtractor" and got.pop("type") == "CvtkSingleRoIExtractor"
        assert got == want
    for stage in ("rpn", "rcnn"):
        assert cfg.model.train_cfg[stage].assigner.type == "MaxIoUAssigner"
        assert cfg.model.train_cfg[stage].sampler.type == "RandomSampler"
        got, want = dict(model.train_cfg[stage].assigner), dict(base.model.train_cfg[stage].assigner)
        assert want.pop("type") == "MaxIoUAssigner" and got.pop("type") == "CvtkMaxIoUAssigner"
        got.pop("gpu_assign_thr", None)
        assert got == want
        got, want = dict(model.train_cfg[stage].sampler), dict(base.model.train_cfg[stage].sampler)
        assert want.pop("type") == "RandomSampler" and got.pop("type") == "CvtkRandomSampler"
        assert got == want
    assert model.train_cfg.rpn.assigner.gpu_assign_thr == 223


def test_training_modules_named_with_mmdets_scope_are_swapped_too():
    scoped = {"roi_head": {"bbox_roi_extractor": {"type": "mmdet.SingleRoIExtractor", "out_channels": 8}},
              "train_cfg": {"rcnn": {"assigner": {"type": "mmdet.MaxIoUAssigner"}, "sampler": {"type": "Other"}}}}
    assert mmconfig.use_training_modules(scoped) == {"MaxIoUAssigner": 1, "RandomSampler": 0, "SingleRoIExtractor": 1,
                                                     "L1Loss": 0, "CrossEntropyLoss": 0, "RPNHead": 0,
                                                     "Shared2FCBBoxHead": 0, "StandardRoIHead": 0}
    assert scoped["roi_head"]["bbox_roi_extractor"] == {"type": "CvtkSingleRoIExtractor", "out_channels": 8}
    assert scoped["train_cfg"]["rcnn"] == {"assigner": {"type": "CvtkMaxIoUAssigner"}, "sampler": {"type": "Other"}}
