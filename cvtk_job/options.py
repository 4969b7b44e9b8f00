"""Typed options of every subcommand: one frozen dataclass each, parsed by argparse-dataclass.

Flags keep upstream cvtk's spelling (`--output_weights`); the dashed spelling (`--output-weights`)
is accepted too. No `from __future__ import annotations` here: argparse-dataclass reads the real
types from the fields.
"""

import dataclasses
import types
from dataclasses import MISSING, field
from typing import List, Literal, Optional, Union


def opt(help, default=MISSING, **metadata):
    """A dataclass field carrying its help text (and argparse extras) in its metadata."""
    metadata["help"] = help
    return field(default=default, metadata=metadata)


def _with_flags(cls):
    """Give every field `--name` (and `--dashed-name`), and show its default in the help."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if "args" not in meta:
            flags = [f"--{f.name}"]
            if "_" in f.name:
                flags.append(f"--{f.name.replace('_', '-')}")
            meta["args"] = flags
        if not any(f.default is d for d in (MISSING, None, False)) and "(default" not in meta.get("help", ""):
            meta["help"] = f"{meta.get('help', '')} (default: {f.default})"
        f.metadata = types.MappingProxyType(meta)
    return cls


def command_options(cls):
    return _with_flags(dataclasses.dataclass(frozen=True)(cls))


def _int_or_auto(value):
    """A number, or the word auto (argparse names the option and the value when it is neither)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"not a number or auto: {value}") from None


_int_or_auto.__name__ = "number or auto"  # argparse's message: "invalid number or auto value: 'x'"

Task = Literal["segm", "det"]
Device = Literal["auto", "cpu", "cuda"]


@command_options
class TrainOptions:
    label: str = opt("label file: one class name per line (or a COCO JSON whose categories name them)")
    train: str = opt("COCO JSON of the training images; file_names resolve against its folder")
    output_weights: str = opt("where the trained weights go, e.g. outputs/strawberry.pth; the other "
                              "outputs are written beside it, checkpoints into outputs/strawberry/")
    valid: Optional[str] = opt("COCO JSON of the validation images, evaluated after every epoch", None)
    test: Optional[str] = opt("COCO JSON of the test images, evaluated once after training", None)
    batch_size: Union[int, str] = opt("images per batch and process, or auto: the largest batch that fits the GPU, "
                                      "measured at the start on the densest training image (a resumed run keeps "
                                      "its batch)", 4, type=_int_or_auto, metavar="N|auto")
    num_workers: Optional[int] = opt("data-loading worker processes (default: the CPUs available to each "
                                     "process, less one, at most 8)", None)
    epoch: int = opt("number of training epochs", 10)
    task: Task = opt("segm: instance masks (Mask R-CNN); det: boxes only (Faster R-CNN)", "segm")
    model: Optional[str] = opt("an MMDetection config name (e.g. mask-rcnn_r50_fpn_1x_coco) or a path "
                               "to a config file (default: mask-rcnn_r101_fpn_1x_coco for segm, "
                               "faster-rcnn_r101_fpn_1x_coco for det)", None)
    pretrained: str = opt("auto: the COCO checkpoint of the model (downloaded once); none: random "
                          "init, no network; or a checkpoint path or URL", "auto")
    lr: str = opt("learning rate; auto scales the config's rate from its batch of 16 to the real "
                  "global batch", "auto")
    seed: int = opt("random seed (same seed, same losses on CPU)", 0)
    precision: Optional[Literal["fp32", "fp16", "bf16"]] = opt(
        "arithmetic of training: fp16 (mixed precision with dynamic loss scaling), bf16 (mixed, no loss scaling "
        "needed; Ampere or newer) or fp32 (default: fp16 on CUDA, fp32 on CPU, where mixed precision is not "
        "available)", None, type=str, choices=["fp32", "fp16", "bf16"])
    amp: bool = opt("the same as --precision fp16 (kept for older command lines)", False)
    image_size: Optional[List[int]] = opt("resize images to fit W H (keeping their aspect ratio)",
                                          None, nargs=2, type=int, metavar=("W", "H"))
    tile: Optional[List[str]] = opt("train on overlapping tiles of the images (annotations clipped to each tile): "
                                    "W H in pixels, or auto: a size from the training annotations (the mean "
                                    "object a 3%% share of a tile); the test step predicts on tiles of the whole "
                                    "images and merges, as inference does, which then tiles the same way by "
                                    "default", None, nargs="+", type=str, metavar=("W|auto", "H"))
    tile_overlap: Optional[float] = opt("with --tile: how much neighbouring tiles overlap, as a fraction of a tile "
                                        "(default: 0.2; with --tile auto: the largest objects' share of a tile)",
                                        None)
    max_detections: Optional[int] = opt("detections per image the model may output, and at which every test AP "
                                         "is computed (default: the most objects in one image of the data, at "
                                         "least 100, mmdet's default)", None)
    device: Device = opt("where to train", "auto")
    resume: str = opt("auto: continue an interrupted run of the same command; none: start over; "
                      "or a checkpoint path", "auto")
    time_limit: Optional[str] = opt("stop like on SIGTERM (checkpoint, exit 75) after this much wall time, "
                                    "e.g. 3h50m, to stay inside a scheduler's limit", None)
    dry_run: bool = opt("check everything a run would (arguments, label file, model config, data staged and "
                        "validated) and print the plan and the final MMEngine config as JSON; trains nothing, "
                        "writes no outputs", False)


@command_options
class InferenceOptions:
    label: str = opt("label file the model was trained with")
    data: str = opt("images: a folder (recursive), a text file listing paths, one image, or a COCO JSON")
    model_weights: str = opt("weights written by train, e.g. outputs/strawberry.pth (or an MMEngine "
                             "checkpoint, such as upstream cvtk's)")
    output: str = opt("folder for the drawn images and instances.json")
    model_config: Optional[str] = opt("the model's config, read as data and never run (default: the config "
                                      "inside the weights); e.g. upstream cvtk's strawberry.py", None)
    batch_size: int = opt("images per batch (with --tile: tiles per batch)", 4)
    num_workers: Optional[int] = opt("image-reading worker processes (default: the CPUs available to the "
                                     "process, less one, at most 8)", None)
    score_threshold: str = opt("keep detections scoring at least this (0 to 1); auto: each class's F1-optimal "
                               "threshold, found by train's test step and kept in the weights", "0.5")
    device: Device = opt("where to run", "auto")
    no_draw: bool = opt("write instances.json only, no drawn images", False)
    tile: Optional[List[int]] = opt("cut each image into overlapping tiles of W x H pixels, predict on the tiles "
                                    "and merge the detections (for large images with small objects); default: "
                                    "the tiles the weights were trained on, if any; 0 0: the whole image", None,
                                    nargs=2, type=int, metavar=("W", "H"))
    tile_overlap: Optional[float] = opt("with --tile: how much neighbouring tiles overlap, as a fraction of a "
                                        "tile; make it larger than the objects (default: the weights' setting, "
                                        "else 0.2)", None)
    no_full_image: bool = opt("with --tile: skip the pass on the whole image (scaled down), which finds the "
                              "objects larger than a tile", False)
    dry_run: bool = opt("check everything a run would (label file, weights, config, images staged) and print "
                        "the plan as JSON; predicts nothing, writes no outputs", False)


@command_options
class EvaluateOptions:
    gt: str = opt("ground-truth COCO JSON")
    pred: str = opt("predictions: test_outputs.coco.json or instances.json")
    output: str = opt("where to write the stats JSON")
    iou_type: Literal["segm", "bbox"] = opt("evaluate masks or boxes", "segm")
    report: Optional[str] = opt("also write the HTML report (tables, plots, and a gallery of the worst-counted "
                                "images when --gt is a local file beside its images), e.g. report.html", None)


@command_options
class ValidateOptions:
    files: List[str] = field(default_factory=list, metadata={
        "args": ["files"], "nargs": "*", "type": str, "metavar": "COCO_JSON",
        "help": "COCO JSON files to check on their own (without a label file, categories are "
                "checked for consistency only)"})
    label: Optional[str] = opt("label file to compare every file's categories with", None)
    train: Optional[str] = opt("training COCO JSON", None)
    valid: Optional[str] = opt("validation COCO JSON", None)
    test: Optional[str] = opt("test COCO JSON", None)
    task: Optional[str] = opt("segm: every annotation must have a mask", None, choices=["segm", "det"])


@command_options
class CreateOptions:
    script: str = opt("where to write the script, e.g. segm.py")
    task: Task = opt("segm: Mask R-CNN on instance masks; det: Faster R-CNN on boxes", "segm")
    vanilla: bool = opt("use MMDetection/MMEngine directly instead of cvtk-job", False)
    model: Optional[str] = opt("the architecture written into the script (default: Mask R-CNN R101 for "
                               "segm, Faster R-CNN R101 for det)", None)
    force: bool = opt("overwrite the script if it exists", False)


@command_options
class DoctorOptions:
    pass
