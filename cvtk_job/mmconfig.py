"""From options to an MMEngine config: model lookup and one pure function that patches the config.

`build_config` does no I/O beyond reading the base config: every path it needs arrives resolved
(local, staged), so the same inputs always give the same config, and tests can check it directly.
"""

import difflib
import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

from .errors import UserError

DEFAULT_MODELS = {"segm": "mask-rcnn_r101_fpn_1x_coco", "det": "faster-rcnn_r101_fpn_1x_coco"}
# MMDetection's learning rates are tuned for 8 GPUs x 2 images.
BASE_BATCH_SIZE = 16
# A warm-up longer than this share of the run means the run never trains at full rate.
MAX_WARMUP_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------
# Model lookup in the installed mmdet (its packaged configs and model index), without importing it


def _mmdet_mim_dir():
    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("mmdet is not installed; run `make setup`")
    return os.path.join(list(spec.submodule_search_locations)[0], ".mim")


@lru_cache(maxsize=1)
def packaged_configs():
    """{config name: path} of every model config that ships inside the mmdet wheel."""
    root = os.path.join(_mmdet_mim_dir(), "configs")
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("_base_", "__pycache__")]
        for name in files:
            if name.endswith(".py") and folder != root:
                found.setdefault(name[:-3], os.path.join(folder, name))
    return found


def resolve_model(model: Optional[str], task: str) -> str:
    """A config name or path → the path of its config file; unknown names get the closest names."""
    name = model or DEFAULT_MODELS[task]
    if name.endswith(".py") or os.sep in name:
        if not os.path.isfile(name):
            raise UserError(f"--model {name}: config file not found; pass an existing .py config or a "
                            "packaged name such as mask-rcnn_r50_fpn_1x_coco")
        return os.path.abspath(name)
    configs = packaged_configs()
    if name not in configs:
        close = difflib.get_close_matches(name, list(configs), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see mmdet's configs folder for names"
        raise UserError(f"--model {name}: no such config in mmdet; {hint}")
    return configs[name]


@lru_cache(maxsize=1)
def _model_index():
    """{config name: checkpoint URL} from mmdet's model index and its metafiles."""
    import yaml

    mim = _mmdet_mim_dir()
    with open(os.path.join(mim, "model-index.yml"), encoding="utf-8") as fh:
        index = yaml.safe_load(fh)
    urls = {}
    for entry in index.get("Import", []):
        path = os.path.join(mim, entry)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as fh:
            meta = yaml.safe_load(fh) or {}
        for model in meta.get("Models", []) or []:
            config, weights = model.get("Config"), model.get("Weights")
            if config and weights:
                urls[os.path.splitext(os.path.basename(config))[0]] = weights
    return urls


def checkpoint_url(config_path: str) -> Optional[str]:
    """The COCO checkpoint URL that mmdet's model index gives for this config, if any."""
    return _model_index().get(os.path.splitext(os.path.basename(config_path))[0])


# ---------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class DataFiles:
    """Local, absolute paths of the COCO files (staged in already)."""

    train: str
    valid: Optional[str] = None
    test: Optional[str] = None


@dataclass(frozen=True)
class RunContext:
    """What the config depends on besides the options."""

    classes: Sequence[str]
    data: DataFiles
    work_dir: str
    output_prefix: str
    num_train_images: int
    world_size: int = 1
    launcher: str = "none"  # "pytorch" when the process group is joined (see launch.init_distributed)
    device: str = "cpu"
    load_from: Optional[str] = None  # the training checkpoint to resume from (with resume=True)
    resume: bool = False
    pretrained: Optional[str] = None  # weights to start from (loaded by CvtkPretrained, shapes permitting)
    remote_prefix: Optional[str] = None  # s3:// prefix the outputs are synced to after every epoch
    max_detections: Optional[int] = None  # detections per image the model outputs (None: the config's)
    precision: str = "fp32"  # fp32, fp16 or bf16 (decided by `precision()`)
    densest_train: int = 0  # the most objects in one training image: above assign_threshold, RPN assigns on CPU
    profile: Optional[Tuple[int, int]] = None  # (skip, steps): capture these training steps (profiling.py)


def _walk(node, visit):
    """Call visit(dict) on every dict inside nested dicts and lists."""
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _walk(value, visit)


def _set_num_classes(model, n):
    def visit(d):
        for key in ("num_classes", "num_things_classes"):
            if key in d:
                d[key] = n
    _walk(model, visit)


def _drop_pretrained_init(model):
    """Drop `Pretrained` init_cfgs (e.g. the backbone's torchvision://resnet101).

    Either a checkpoint provides every weight (--pretrained, --resume) or the user asked for random init
    (--pretrained none): in no case may initialisation download ImageNet weights (and import torchvision)
    that the checkpoint would overwrite a moment later.
    """
    def visit(d):
        init = d.get("init_cfg")
        if isinstance(init, dict) and init.get("type") == "Pretrained":
            d["init_cfg"] = None
        elif isinstance(init, list):
            d["init_cfg"] = [i for i in init if not (isinstance(i, dict) and i.get("type") == "Pretrained")]
    _walk(model, visit)
    model.pop("pretrained", None)


def _innermost_dataset(dataset):
    # RepeatDataset / ClassBalancedDataset / MultiImageMixDataset wrap the real one.
    while isinstance(dataset, dict) and isinstance(dataset.get("dataset"), dict):
        dataset = dataset["dataset"]
    return dataset


def _patch_pipeline(pipeline, with_mask, image_size):
    for step in pipeline:
        kind = str(step.get("type", ""))
        if kind == "LoadAnnotations":
            step["with_mask"] = with_mask
        if image_size and kind.endswith("Resize") and "scale" in step:
            step["scale"] = tuple(image_size)
    return pipeline


def _dataset(base, ann_file, classes, pipeline, test_mode):
    dataset = dict(base)
    dataset.update(
        data_root=os.path.dirname(ann_file), ann_file=ann_file, data_prefix=dict(img=""),
        metainfo=dict(classes=tuple(classes)), pipeline=pipeline, test_mode=test_mode,
        backend_args=None)
    if test_mode:
        # Keep images without annotations in validation and test (upstream cvtk dropped them).
        dataset.pop("filter_cfg", None)
    return dataset


def _worker_init(opts):
    # Loader workers in a process group of their own (signals.detach_loader_worker), seeded as MMEngine does.
    return dict(type="cvtk_worker_init", num_workers=opts.num_workers, seed=opts.seed)


def _eval_loader(base_dataset, ann_file, classes, pipeline, opts):
    return dict(
        batch_size=opts.batch_size, num_workers=opts.num_workers,
        persistent_workers=opts.num_workers > 0, drop_last=False, worker_init_fn=_worker_init(opts),
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=_dataset(base_dataset, ann_file, classes, pipeline, test_mode=True))


def _scale_schedule(schedulers, base_epochs, epochs, total_iters):
    """Stretch epoch-based milestones to --epoch; cap iteration-based warm-up to a share of the run."""
    factor = epochs / base_epochs
    scaled = []
    for sched in schedulers:
        sched = dict(sched)
        if sched.get("by_epoch", True):
            if "milestones" in sched:
                sched["milestones"] = sorted({min(epochs, max(1, round(m * factor)))
                                              for m in sched["milestones"]})
            for key in ("begin", "end", "T_max"):
                if isinstance(sched.get(key), (int, float)) and sched[key] > 0:
                    sched[key] = max(1, round(sched[key] * factor))
        else:
            # MMEngine's LinearLR never leaves its start factor when it spans a single iteration.
            cap = max(2, int(total_iters * MAX_WARMUP_FRACTION))
            if isinstance(sched.get("end"), int) and sched["end"] > cap:
                sched["end"] = cap
        scaled.append(sched)
    return scaled


def parse_lr(text):
    """`--lr auto|FLOAT` → None (auto) or a positive finite rate."""
    if text == "auto":
        return None
    try:
        lr = float(text)
    except ValueError:
        raise UserError(f"--lr {text}: not a number; give e.g. --lr 0.005 or --lr auto") from None
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"--lr {text}: the learning rate must be a positive number")
    return lr


def load_base(path):
    """Read the base config (`--model`); a broken config file is one line, not a traceback. A file the user
    names with --model is the user's own code and runs (it may inherit with `_base_`)."""
    from mmengine.config import Config

    try:
        cfg = Config.fromfile(path)
    except Exception as err:  # noqa: BLE001 - whatever the user's config does wrong, say so in one line
        detail = (str(err).strip().splitlines() or [""])[-1][:200]
        raise UserError(f"--model {path}: cannot be read as an MMEngine config ({type(err).__name__}: {detail}); "
                        "fix the file or pass a packaged name such as mask-rcnn_r50_fpn_1x_coco") from None
    if not isinstance(cfg.get("model"), dict) or not cfg.get("train_dataloader"):
        raise UserError(f"--model {path}: has no `model` and `train_dataloader`: not an MMDetection training "
                        "config; inherit from one with _base_ = ['mmdet::...']")
    return cfg


def _learning_rate(opts, cfg):
    lr = parse_lr(opts.lr)
    if lr is None:
        cfg.auto_scale_lr = dict(enable=True, base_batch_size=BASE_BATCH_SIZE)
        return
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=BASE_BATCH_SIZE)


def precision(opts, device):
    """(precision, why): --precision, else --amp (fp16), else fp16 on CUDA and fp32 elsewhere. Mixed precision
    exists on CUDA only (MMEngine's AmpOptimWrapper): asked for elsewhere, the run is fp32 and says so."""
    asked = opts.precision or ("fp16" if opts.amp else None)
    if device != "cuda":
        if asked in ("fp16", "bf16"):
            return "fp32", f"--precision {asked} needs a CUDA GPU; training in fp32 on {device}"
        return "fp32", None
    return asked or "fp16", None


def build_config(opts, base_config, ctx: RunContext):
    """Options + run context → the complete MMEngine config for training (and the test step).

    `base_config` is the path of the base config or the Config that `load_base` read (left unchanged)."""
    import copy

    from mmengine.config import ConfigDict

    cfg = copy.deepcopy(base_config) if not isinstance(base_config, str) else load_base(base_config)
    classes, with_mask = list(ctx.classes), opts.task == "segm"
    _set_num_classes(cfg.model, len(classes))
    _drop_pretrained_init(cfg.model)
    if ctx.max_detections:
        set_max_detections(cfg.model, ctx.max_detections)
    limit = assign_threshold(*(opts.image_size or DEFAULT_INPUT))
    if ctx.densest_train > limit:
        set_gpu_assign_threshold(cfg.model, limit)

    base_train = cfg.train_dataloader
    base_train_dataset = _innermost_dataset(base_train.dataset)
    train_pipeline = _patch_pipeline(list(base_train_dataset.get("pipeline", [])), with_mask, opts.image_size)
    base_eval_dataset = _innermost_dataset((cfg.get("test_dataloader") or cfg.val_dataloader).dataset)
    eval_pipeline = _patch_pipeline(list(base_eval_dataset.get("pipeline", [])), with_mask, opts.image_size)

    cfg.test_pipeline = eval_pipeline  # inference reads it, also when training had no --valid/--test
    train_dataset = _dataset(base_train_dataset, ctx.data.train, classes, train_pipeline, test_mode=False)
    train_dataset["filter_cfg"] = dict(filter_empty_gt=True, min_size=0)
    cfg.train_dataloader = ConfigDict(
        batch_size=opts.batch_size, num_workers=opts.num_workers,
        persistent_workers=opts.num_workers > 0, worker_init_fn=_worker_init(opts),
        sampler=dict(type="DefaultSampler", shuffle=True),
        batch_sampler=dict(type="AspectRatioBatchSampler"),
        dataset=train_dataset)

    metrics = ["bbox", "segm"] if with_mask else ["bbox"]
    if ctx.data.valid:
        cfg.val_dataloader = _eval_loader(base_eval_dataset, ctx.data.valid, classes,
                                          eval_pipeline, opts)
        cfg.val_evaluator = dict(type="CocoMetric", ann_file=ctx.data.valid, metric=metrics,
                                 format_only=False, backend_args=None)
        cfg.val_cfg = dict(type="ValLoop")
    else:
        cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    if ctx.data.test and not getattr(opts, "tile", None):  # on tiles the test step is train's own (tiled)
        cfg.test_dataloader = _eval_loader(base_eval_dataset, ctx.data.test, classes,
                                           eval_pipeline, opts)
        cfg.test_evaluator = dict(type="CvtkCocoDetections", ann_file=ctx.data.test,
                                  output_file=os.path.join(ctx.work_dir, "test_outputs.coco.json"),
                                  with_mask=with_mask)
        cfg.test_cfg = dict(type="TestLoop")
    else:
        cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None

    base_epochs = cfg.train_cfg.get("max_epochs", 12)
    global_batch = opts.batch_size * ctx.world_size
    iters_per_epoch = max(1, math.ceil(ctx.num_train_images / global_batch))
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=opts.epoch, val_interval=1)
    cfg.param_scheduler = _scale_schedule(cfg.get("param_scheduler") or [], base_epochs, opts.epoch,
                                          iters_per_epoch * opts.epoch)
    _learning_rate(opts, cfg)
    if ctx.precision in ("fp16", "bf16"):
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        # fp16's narrow exponent range needs the loss scaled (dynamically: raised while no gradient overflows);
        # bf16 has fp32's range, and a fixed scale of 1 leaves its gradients as they are.
        cfg.optim_wrapper.loss_scale = "dynamic" if ctx.precision == "fp16" else 1.0
        cfg.optim_wrapper.dtype = "float16" if ctx.precision == "fp16" else "bfloat16"

    cfg.randomness = dict(seed=opts.seed, deterministic=False)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, by_epoch=True,
                                        max_keep_ckpts=2, save_last=True)
    # A progress line (epoch, iteration, loss, ETA) at least twice an epoch and every 10 iterations.
    log_interval = max(1, min(10, iters_per_epoch // 2))
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=log_interval, ignore_last=False)
    cfg.log_processor = dict(type="LogProcessor", window_size=log_interval, by_epoch=True)
    # No `custom_imports`: train imports cvtk_job.mmhooks itself, and the dumped X.py must stay loadable
    # where cvtk-job is not installed (upstream cvtk's and mmdet's `init_detector` import custom modules).
    cfg.custom_hooks = [dict(type="CvtkEpochStats", output_prefix=ctx.output_prefix)]
    if ctx.pretrained and not ctx.resume:
        # Not `load_from`: MMEngine would log every class-dependent tensor as a multi-line size mismatch.
        cfg.custom_hooks.append(dict(type="CvtkPretrained", checkpoint=ctx.pretrained))
    if ctx.remote_prefix:
        cfg.custom_hooks.append(dict(type="CvtkSyncOut", output_prefix=ctx.output_prefix,
                                     remote_prefix=ctx.remote_prefix))
    # Last among equal priorities: a stop requested while the epoch's checkpoint was being written still
    # lets CvtkSyncOut upload it first.
    cfg.custom_hooks.append(dict(type="CvtkRunGuard"))
    if ctx.profile:
        cfg.custom_hooks.append(dict(type="CvtkProfile", skip=ctx.profile[0], steps=ctx.profile[1],
                                     folder=ctx.work_dir))
    cfg.env_cfg = dict(cudnn_benchmark=False,
                       mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                       dist_cfg=dict(backend="nccl" if ctx.device == "cuda" else "gloo"))
    cfg.launcher = ctx.launcher
    if ctx.launcher != "none" and ctx.device == "cpu":
        # MMEngine's default wrapper pins DDP to device_ids=[LOCAL_RANK], which only exists on GPUs.
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    cfg.work_dir = ctx.work_dir
    cfg.load_from = ctx.load_from if ctx.resume else None
    cfg.resume = ctx.resume
    cfg.metainfo = dict(classes=tuple(classes))
    cfg.cvtk_job = dict(task=opts.task, classes=classes)
    return cfg


def set_max_detections(model_cfg, count):
    """The model outputs up to `count` detections per image (every `max_per_img` after the RPN); the RPN
    proposes at least as many boxes (its own `max_per_img`, 1000 in mmdet's configs, only ever raised)."""
    def visit(d):
        if isinstance(d.get("max_per_img"), int):
            d["max_per_img"] = count

    for key, part in (model_cfg.get("test_cfg") or {}).items():
        if key == "rpn" and isinstance(part, dict):
            if isinstance(part.get("max_per_img"), int) and part["max_per_img"] < count:
                part["max_per_img"] = count
        else:
            _walk(part, visit)


DEFAULT_INPUT = (1333, 800)  # mmdet's Mask/Faster R-CNN training scale
# GPU memory the RPN's anchor-to-object assignment of one image may take. MaxIoUAssigner builds IoU tensors of
# anchors x objects: ~36 bytes per pair at its peak (float32 corners, widths and IoUs); FPN's 3 anchors per
# location at strides 4-64 are ~0.25 anchors per input pixel. At 1333x800 that is 9.6 MB per object: 500 fruits
# in one image ask for 4.8 GB at once, on top of the model's activations.
ASSIGN_BUDGET_BYTES = 2 * 2**30


def assign_threshold(width, height):
    """The most objects whose assignment fits ASSIGN_BUDGET_BYTES at this input size (223 at 1333x800)."""
    return max(1, int(ASSIGN_BUDGET_BYTES // (36 * 0.25 * width * height)))


def set_gpu_assign_threshold(model_cfg, limit):
    """Images with more than `limit` objects have their anchors assigned on the CPU (mmdet's gpu_assign_thr):
    slower for those images, but a dense image no longer runs the GPU out of memory. Only the RPN's assigner:
    the second stage assigns ~1000 proposals, not hundreds of thousands of anchors."""
    rpn = (model_cfg.get("train_cfg") or {}).get("rpn") or {}
    assigner = rpn.get("assigner")
    if isinstance(assigner, dict) and str(assigner.get("type")).removeprefix("mmdet.") in ("MaxIoUAssigner",
                                                                                         "CvtkMaxIoUAssigner"):
        assigner["gpu_assign_thr"] = limit


# mmdet's module → cvtk-job's drop-in for the training model: the assigner and sampler without host-device waits
# (assigner.py), the RoI extractor with its RoIs in fp32 under mixed precision and one wait per extraction
# (roi_extractor.py), the L1 and sigmoid cross-entropy losses without theirs (losses.py); in fp32 all give mmdet's
# results exactly.
TRAINING_MODULES = {"MaxIoUAssigner": "CvtkMaxIoUAssigner", "RandomSampler": "CvtkRandomSampler",
                    "SingleRoIExtractor": "CvtkSingleRoIExtractor", "L1Loss": "CvtkL1Loss",
                    "CrossEntropyLoss": "CvtkCrossEntropyLoss", "RPNHead": "CvtkRPNHead",
                    "Shared2FCBBoxHead": "CvtkShared2FCBBoxHead", "StandardRoIHead": "CvtkStandardRoIHead"}


def use_training_modules(model_cfg):
    """Swap TRAINING_MODULES into a model config, in place. Applied where the training model is built
    (mmhooks.CvtkRunner, autobatch), not in the written config, which stays loadable where cvtk-job is not
    installed. Returns {mmdet's name: how many}."""
    from . import assigner, bbox_head, losses, roi_extractor, roi_head, rpn_head  # noqa: F401 (registers the names)

    swapped = dict.fromkeys(TRAINING_MODULES, 0)

    def visit(d):
        kind = d.get("type")
        name = kind.removeprefix("mmdet.") if isinstance(kind, str) else None  # a config may name the scope
        if name in TRAINING_MODULES:
            swapped[name] += 1
            d["type"] = TRAINING_MODULES[name]
    _walk(model_cfg, visit)
    return swapped


def raise_score_threshold(model_cfg, threshold):
    """Drop detections below `threshold` inside the model, before the mask head runs on them.

    The final per-class NMS only ever removes a box in favour of a higher-scoring one, so boxes at or
    above the threshold come out the same; the mask head and RoIAlign, the slowest steps on CPU, no
    longer run for boxes that would be thrown away afterwards.
    """
    # mmdet keeps scores strictly above score_thr and we keep those at least the threshold: a hair lower, so a
    # detection scoring exactly the threshold (as a class's auto threshold, a score itself, always has one) stays.
    floor = threshold * (1 - 1e-6)

    def visit(d):
        if isinstance(d.get("score_thr"), (int, float)) and d["score_thr"] < floor:
            d["score_thr"] = floor
    _walk(model_cfg.get("test_cfg") or {}, visit)


def model_shapes(cfg, name):
    """{tensor name: shape} of the model a config describes, built on the meta device (shapes only: ~0.8 s
    for Mask R-CNN R101, no memory, no weights). A model that does not build (a type no registry knows, a
    wrong argument in a user's --model file) is one line here, before the run starts, not a traceback later."""
    import copy

    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    register_all_modules(init_default_scope=False)
    try:
        with torch.device("meta"):
            model = MODELS.build(copy.deepcopy(cfg.model))
    except Exception as err:  # noqa: BLE001 - whatever the config gets wrong, say so in one line
        detail = (str(err).strip().splitlines() or [type(err).__name__])[-1].split(". ")[0][:200]
        raise UserError(f"--model {name}: its model does not build ({type(err).__name__}: {detail}); fix the "
                        "config") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
