"""MMEngine plug-ins, registered when `train` imports this module (before it builds the Runner).

- `CvtkEpochStats` writes the tutorial's per-epoch stats files and plots after every epoch, from
  every training iteration (not a 50-iteration window), so a crash or preemption loses nothing; with a
  validation set, the training rows gain `val_loss`: the loss on the validation images (no gradient).
- `CvtkPretrained` loads the starting checkpoint (`--pretrained`) after MMEngine's weight init, keeping
  the model's own tensors where the checkpoint's shapes differ (a COCO head of 80 classes), in one line.
- `CvtkRunner` builds the model with assigners and mask targets that do not stall the GPU (same results), runs
  the epoch loop below, and never executes a checkpoint's `meta.config`.
- `CvtkTrainLoop` is MMEngine's epoch loop whose step survives running out of GPU memory: the batch is
  split into parts whose gradients add up to the whole batch's (same global batch, same learning rate).
- `CvtkCocoDetections` collects every detection of the test step (no score cut-off) and writes
  `test_outputs.coco.json`, from which `metrics.coco_stats` computes the test stats.
"""

import json
import os
from collections import defaultdict

import numpy as np
from mmengine.dist import is_main_process
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.registry import FUNCTIONS, HOOKS, LOOPS, METRICS
from mmengine.runner import EpochBasedTrainLoop, Runner

from . import artifacts, predictions


def _mean(values):
    return float(np.mean(values)) if values else float("nan")


@HOOKS.register_module()
class CvtkEpochStats(Hook):
    priority = "LOW"  # after IterTimerHook has recorded the iteration's time

    def __init__(self, output_prefix):
        self.outputs = artifacts.TrainOutputs(output_prefix)
        self.train_rows, self.valid_rows = [], []
        self._sums, self._val_times = defaultdict(list), defaultdict(list)

    def before_train(self, runner):
        # A resumed run keeps the rows of the epochs it already finished, and only those.
        done = runner.epoch
        self.train_rows = [r for r in artifacts.read_tsv(self.outputs.train_txt) if r.get("epoch", 0) <= done]
        self.valid_rows = [r for r in artifacts.read_tsv(self.outputs.valid_txt) if r.get("step", 0) <= done]
        # Interrupted between the checkpoint and the end of that epoch's validation: validate it now, so
        # the validation stats have one row per epoch and no gap.
        if done and runner.val_loop is not None and not any(r.get("step") == done for r in self.valid_rows):
            runner.logger.info(f"validating epoch {done}, whose validation the interruption cut short")
            runner.val_loop.run()

    def before_train_epoch(self, runner):
        self._sums = defaultdict(list)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        sums = self._sums
        sums["lr"].append(float(runner.optim_wrapper.get_lr()["lr"][0]))
        hub = runner.message_hub
        for key in ("data_time", "time"):
            if f"train/{key}" in hub.log_scalars:
                sums[key].append(hub.get_scalar(f"train/{key}").current())
        for key, value in (outputs or {}).items():
            sums[key].append(float(value.item() if hasattr(value, "item") else value))
        import torch

        if torch.cuda.is_available():
            sums["memory"].append(torch.cuda.max_memory_allocated() / 2**20)

    def after_train_epoch(self, runner):
        row = {"epoch": runner.epoch + 1}  # the loop counts epochs after this hook
        row.update({key: _mean(values) for key, values in self._sums.items()})
        self.train_rows = [r for r in self.train_rows if r["epoch"] != row["epoch"]] + [row]
        if is_main_process():
            artifacts.write_train_stats(self.outputs, self.train_rows)
            self._report(runner)

    def _report(self, runner):
        """The report as far as the run has come (curves and validation tables); train writes the whole one
        at the end."""
        from . import report

        summary = {"run": os.path.basename(self.outputs.prefix),
                   "progress": f"epoch {max((r['epoch'] for r in self.train_rows), default=runner.epoch):g} of "
                               f"{runner.max_epochs} "
                               "(training)"}
        report.write(self.outputs.report, summary, self.train_rows, self.valid_rows)

    def before_val_epoch(self, runner):
        self._val_times = defaultdict(list)
        runner.logger.info(f"validating epoch {runner.epoch}")

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        hub = runner.message_hub
        for key in ("data_time", "time"):
            if f"val/{key}" in hub.log_scalars:
                self._val_times[key].append(hub.get_scalar(f"val/{key}").current())

    def after_val_epoch(self, runner, metrics=None):
        row = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        row.update({key: _mean(values) for key, values in self._val_times.items()})
        row["step"] = runner.epoch
        self.valid_rows = [r for r in self.valid_rows if r["step"] != row["step"]] + [row]
        loss = _validation_loss(runner)
        for train_row in self.train_rows:
            if train_row["epoch"] == runner.epoch and loss is not None:
                train_row["val_loss"] = loss
        if is_main_process():
            artifacts.write_valid_stats(self.outputs, self.valid_rows)
            artifacts.write_train_stats(self.outputs, self.train_rows)
            self._report(runner)


def _validation_loss(runner):
    """The training loss on the validation set (mean per image over every rank), under no_grad: whether the
    model still generalises while the training loss falls. The random state is put back afterwards (the RoI
    sampler draws from it), so training goes on exactly as without this pass."""
    import random

    import torch
    from mmengine.dist import all_reduce, get_world_size

    loader = runner.val_dataloader
    model = getattr(runner.model, "module", runner.model)
    cuda = torch.cuda.is_available()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if cuda else None)
    total, images = torch.zeros(3, dtype=torch.float64), 0  # loss sum, images, ranks that failed
    try:
        with torch.no_grad():
            for batch in loader:
                data = model.data_preprocessor(batch, False)
                if not all("gt_instances" in s for s in data["data_samples"]):
                    return None  # a validation pipeline without annotations: no loss to compute
                loss, _ = model.parse_losses(model.loss(data["inputs"], data["data_samples"]))
                total[0] += float(loss) * len(data["data_samples"])
                images += len(data["data_samples"])
    except Exception as err:  # noqa: BLE001 - a number for the plots never stops a training run
        runner.logger.warning(f"validation loss not computed ({type(err).__name__}: {str(err)[:200]})")
        total[2] = 1  # still joins the all_reduce below: the other ranks wait in it
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda:
            torch.cuda.set_rng_state_all(states[3])  # the RoI sampler draws on the GPU there
    total[1] = images
    if get_world_size() > 1:
        all_reduce(total)  # sums: every rank's images
    return float(total[0] / total[1]) if total[1] and not total[2] else None


@FUNCTIONS.register_module()
def cvtk_worker_init(worker_id, num_workers, seed):
    """MMEngine's DataLoader worker seeding (same seeds as its default), and out of the job's process group
    (signals.detach_loader_worker)."""
    from mmengine.dataset import worker_init_fn

    from .signals import detach_loader_worker

    worker_init_fn(worker_id, num_workers, int(os.environ.get("RANK", "0")), seed)
    detach_loader_worker()


@HOOKS.register_module()
class CvtkPretrained(Hook):
    """Starts training from a checkpoint's weights (before_train runs after MMEngine's weight init)."""

    priority = "VERY_HIGH"

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def before_train(self, runner):
        from mmengine.model import is_model_wrapper

        from .pretrained import load_into

        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        # Every rank loads the same file, so the replicas stay identical without a broadcast.
        load_into(model, self.checkpoint)


@HOOKS.register_module()
class CvtkRunGuard(Hook):
    """Ends the run at an iteration boundary after SIGTERM/SIGUSR1 or --time_limit (exit 75, see
    cvtk_job.signals), and at once when the loss stops being finite (exit 4).

    Ranks decide together: a signal may reach one process only, and each rank's --time_limit clock and
    loss are its own, so a rank that stopped alone would leave the others blocked in the next all-reduce.
    At every boundary one all-reduce (MAX of 0 go on / 1 stop / 2 diverged) gives every rank the same
    verdict, so all stop at the same iteration, with the same checkpoint and the same exit code. It is
    registered after CvtkSyncOut: an epoch's checkpoint is uploaded before a stop takes effect.
    """

    priority = "LOWEST"
    GO, STOP, DIVERGED = 0, 1, 2

    def _verdict(self, local):
        from mmengine.dist import all_reduce, is_distributed

        if not is_distributed():
            return local
        import torch

        flag = torch.tensor([local], dtype=torch.int32)
        all_reduce(flag, op="max")  # mmengine moves it to the backend's device (nccl: the GPU)
        return int(flag.item())

    def _check(self, runner, loss=None, batch_idx=None):
        import math

        from . import signals
        from .errors import Interrupted, TrainingError

        diverged = loss is not None and not math.isfinite(float(loss.item() if hasattr(loss, "item") else loss))
        verdict = self._verdict(self.DIVERGED if diverged else self.STOP if signals.requested() else self.GO)
        if verdict == self.DIVERGED:
            where = f"at epoch {runner.epoch + 1}, iteration {batch_idx + 1}" if batch_idx is not None else ""
            value = f" {float(loss)}" if diverged else " NaN/inf in another process"
            raise TrainingError(f"the loss became{value} {where}: training diverged; lower the learning rate "
                                "(--lr, e.g. half of the auto value) or raise --batch_size, then start over with "
                                "--resume none")
        if verdict == self.STOP:
            cause = signals.name() if signals.requested() else "a signal to another process"
            raise Interrupted(f"stopped by {cause} during epoch {runner.epoch + 1}; the last complete "
                              "epoch is checkpointed: rerun the same command to resume")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._check(runner, (outputs or {}).get("loss"), batch_idx)

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._check(runner)

    def after_train_epoch(self, runner):
        self._check(runner)


@HOOKS.register_module()
class CvtkSyncOut(Hook):
    """Uploads each epoch's checkpoint and stats to S3, so a run can resume on another machine.

    Runs after CheckpointHook (priority VERY_LOW); the checkpoint goes up before the pointer to it, so
    the pointer on S3 never names a checkpoint that is not there yet.
    """

    priority = "LOWEST"

    def __init__(self, output_prefix, remote_prefix):
        from . import storage

        self.outputs = artifacts.TrainOutputs(output_prefix)
        self.remote = artifacts.TrainOutputs(remote_prefix)
        self.outbox = storage.Outbox(os.path.dirname(output_prefix), os.path.dirname(remote_prefix))

    def _sync(self, runner):
        if not is_main_process():
            return
        pointer = os.path.join(self.outputs.workspace, "last_checkpoint")
        files = [self.outputs.train_txt, self.outputs.train_png, self.outputs.valid_txt, self.outputs.valid_png,
                 self.outputs.report]
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as fh:
                files.append(fh.read().strip())
        self.outbox.sync(files)
        self.outbox.sync([pointer])
        self._retain()

    def _retain(self):
        """The bucket keeps the epoch checkpoints the local workspace keeps (CheckpointHook's max_keep_ckpts):
        a Mask R-CNN R101 training state is hundreds of MB, every epoch."""
        from . import storage

        for uri in storage.list_objects(self.remote.workspace.rstrip("/") + "/"):
            name = uri.rsplit("/", 1)[1]
            if name.startswith("epoch_") and name.endswith(".pth") and \
                    not os.path.exists(os.path.join(self.outputs.workspace, name)):
                storage.remove(uri)

    def after_train_epoch(self, runner):
        self._sync(runner)

    def after_val_epoch(self, runner, metrics=None):
        self._sync(runner)


@METRICS.register_module()
class CvtkCocoDetections(BaseMetric):
    """Every detection of the test set, as COCO JSON with the test file's image and category ids."""

    default_prefix = "test"

    def __init__(self, ann_file, output_file, with_mask=True, collect_device="cpu", prefix=None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.ann_file, self.output_file, self.with_mask = ann_file, output_file, with_mask

    def process(self, data_batch, data_samples):
        for sample in data_samples:
            height, width = sample["ori_shape"][:2]
            found = predictions.detections(sample["pred_instances"], height, width, self.with_mask)
            self.results.append((int(sample["img_id"]), found))

    def compute_metrics(self, results):
        with open(self.ann_file, encoding="utf-8") as fh:
            gt = json.load(fh)
        found = predictions.coco_results(gt, results)
        artifacts.write_json(self.output_file, found)
        return {"detections": len(found["annotations"])}


def use_parsed_coco():
    """Let mmdet's CocoDataset take the COCO files this process has already parsed and validated (coco.
    keep_parsed) instead of reading them again. CocoDataset builds its index through the class attribute
    `COCOAPI`, meant for substitution; a file not kept here (or changed since) is read as mmdet would."""
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.api_wrappers import COCO

    from . import coco

    class ParsedCOCO(COCO):
        def __init__(self, annotation_file=None):
            data = coco.take_parsed(annotation_file) if annotation_file else None
            if data is None:
                super().__init__(annotation_file)
                return
            super().__init__(None)
            self.dataset = data
            self.createIndex()
            self.img_ann_map, self.cat_img_map = self.imgToAnns, self.catToImgs  # mmdet's aliases

    CocoDataset.COCOAPI = ParsedCOCO


class CvtkRunner(Runner):
    """MMEngine's Runner, except that its epoch loop is CvtkTrainLoop and a checkpoint's `meta.config` is never
    executed.

    `Runner.resume` executes `checkpoint["meta"]["config"]` as a Python config (to compare GPU counts): a
    `--resume` file from someone else, whose `config` string holds code, would run that code. The key is
    dropped from the loaded checkpoint; cvtk-job and MMEngine write the config as `cfg`, which MMEngine
    does not execute. (Without it, test_migrate's poisoned --resume checkpoint ran its code.)"""

    def build_model(self, model):
        """The training model, with what makes a step wait less on the host and mixed precision exact where mmdet
        3 is not: mmdet's MaxIoUAssigners and RandomSamplers run as cvtk-job's (assigner.py), its RPN heads build
        their targets on all anchors (rpn_head.py), its RoI heads sample after assigning every image (roi_head.py),
        its box heads' losses know their positives (bbox_head.py), its
        RoI extractors keep their RoIs in fp32 (roi_extractor.py), its L1 and sigmoid cross-entropy losses skip
        their host reads (losses.py) and Mask R-CNN's mask targets are built on the device (masktargets.py). In fp32
        all give mmdet's results exactly. The config keeps mmdet's names (as for the train loop below)."""
        import copy

        from . import masktargets, mmconfig

        swapped = dict.fromkeys(mmconfig.TRAINING_MODULES, 0)
        if isinstance(model, dict):
            model = copy.deepcopy(model)
            swapped = mmconfig.use_training_modules(model)
        model = super().build_model(model)
        heads = masktargets.install(model)
        self.logger.info("training model: %s, %d mask head(s) with targets built on the device",
                         ", ".join(f"{n} {name}(s) as {mmconfig.TRAINING_MODULES[name]}"
                                   for name, n in swapped.items()), heads)
        return model

    def build_train_loop(self, loop):
        """The config's EpochBasedTrainLoop runs as CvtkTrainLoop (OOM back-off). The config keeps MMEngine's
        name: the X.py written beside the weights stays loadable where cvtk-job is not installed."""
        if isinstance(loop, dict) and loop.get("type") == "EpochBasedTrainLoop":
            loop = dict(loop, type="CvtkTrainLoop")
        return super().build_train_loop(loop)

    def load_checkpoint(self, *args, **kwargs):
        checkpoint = super().load_checkpoint(*args, **kwargs)
        meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
        if isinstance(meta, dict):
            meta.pop("config", None)
        return checkpoint


class StartupGC(Hook):
    """Turns the cyclic garbage collector back on when training starts (train turns it off at launch).

    Start-up allocates tens of millions of objects that form no cycles (the parsed COCO files, mmdet's
    data lists), and the collector would scan them again at every generation it promotes them through
    (measured: 3.7 s for 1M polygons, on top of the parse). At the first iteration they are frozen out of
    collection for good (gc.freeze, before the loader workers fork: fewer copied pages), and everything
    the training loop allocates is collected as usual. Added by train, not through the config."""

    priority = "VERY_HIGH"

    def before_train(self, runner):
        import gc

        gc.freeze()
        gc.enable()


@HOOKS.register_module()
class CvtkProfile(Hook):
    """Captures `steps` training iterations after the first `skip` with torch.profiler (rank 0) and writes
    `profile.json` (profiling.summarize) and `profile.trace.json` into the run's workspace; see profiling.py."""

    priority = "VERY_LOW"  # the window closes after every other hook's share of the last step

    def __init__(self, skip, steps, folder):
        self.skip, self.steps, self.folder = skip, steps, folder
        self._profiler = self._start = None

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        import time

        import torch

        if runner.iter != self.skip or self._profiler is not None or not is_main_process():
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self._profiler.__enter__()
        self._start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        import time

        import torch

        if self._profiler is None or self._start is None or runner.iter != self.skip + self.steps - 1:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window ends when the device has finished its work, not when it was queued
        wall = time.perf_counter() - self._start
        self._profiler.__exit__(None, None, None)
        self._start = None
        from . import profiling

        try:
            summary = profiling.summarize(self._profiler.events(), self.steps, wall,
                                          profiling.recorded_dtypes(self._profiler))
            path = os.path.join(self.folder, "profile.json")
            artifacts.write_json(path, summary, indent=1)
            self._profiler.export_chrome_trace(os.path.join(self.folder, "profile.trace.json"))
        except Exception as err:  # noqa: BLE001 - a developer's measurement never fails the training run
            runner.logger.warning("profile: could not be summarised or written (%s: %s); training goes on",
                                  type(err).__name__, err)
            return
        runner.logger.info("%s (%s)", profiling.line(summary), path)

    def after_train(self, runner):
        if self._start is not None:  # the run ended inside the window
            self._profiler.__exit__(None, None, None)
            self._start = None
            runner.logger.warning("profile: the run ended before its %d profiled steps; nothing written", self.steps)


# Test hook (documented in the README): raise a real torch.OutOfMemoryError in the training step of this global
# iteration (counted from 0), once, as CUDA does when a batch of dense images does not fit.
OOM_TEST_HOOK = "CVTK_JOB_TEST_OOM_AT_ITER"
MAX_SPLITS = 3  # halvings: at most 8 parts, then the error stands (a single image that does not fit)


def forget_unfinished_step(optim_wrapper):
    """After a step that failed part-way, let the optimizer wrapper's GradScaler (AMP) start the step afresh.

    GradScaler records per optimizer that this step's gradients were unscaled (and whether they held an inf)
    before it calls the optimizer's step, and only `update()` clears that record. An out-of-memory error raised
    inside the optimizer's step (its first step allocates the momentum buffers) leaves the record behind: the
    step run again would skip unscaling its new gradients and move the weights by the loss scale (65536), or,
    with gradient clipping, fail on "unscale_() has already been called". The scale itself is kept.
    """
    states = getattr(getattr(optim_wrapper, "loss_scaler", None), "_per_optimizer_states", None)
    if states is not None:
        states.clear()  # a defaultdict: each optimizer's next lookup is a fresh READY record


@LOOPS.register_module()
class CvtkTrainLoop(EpochBasedTrainLoop):
    """EpochBasedTrainLoop whose step survives a CUDA out-of-memory error.

    On OOM the step's gradients are dropped, the GPU cache emptied, and the same batch is run again in twice as
    many parts (each part's loss weighted by its share of the batch, gradients accumulated, one optimizer step):
    the global batch, the learning rate and the number of steps stay what they were, only the images per forward
    pass halve. At most MAX_SPLITS halvings, each logged and kept in the message hub (saved with checkpoints, so a
    resumed run starts split) and in the weights' metadata (`oom_backoff`).

    Under torch.distributed an OOM in the forward pass is survived the same way (no collective has started; the
    rank that splits joins the gradient all-reduce at its last part); one in the backward pass, after buckets were
    all-reduced, cannot be replayed on one rank alone and stops the run as before.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.parts = 1
        self._injected = False

    @property
    def backoffs(self):
        return list(self.runner.message_hub.get_info("cvtk_oom_backoff") or [])

    def run_iter(self, idx, data_batch):
        self.runner.call_hook("before_train_iter", batch_idx=idx, data_batch=data_batch)
        outputs = self._step(data_batch)
        self.runner.call_hook("after_train_iter", batch_idx=idx, data_batch=data_batch, outputs=outputs)
        self._iter += 1

    def _step(self, data_batch):
        import torch

        backoffs = self.backoffs
        self.parts = max(self.parts, backoffs[-1]["parts"] if backoffs else 1)
        while True:
            try:
                self._maybe_inject()
                if self.parts == 1:
                    return self.runner.model.train_step(data_batch, optim_wrapper=self.runner.optim_wrapper)
                return self._step_in_parts(data_batch)
            except torch.OutOfMemoryError as err:
                images = len(data_batch["inputs"])
                if len(backoffs) >= MAX_SPLITS or self.parts >= images:
                    raise
                forget_unfinished_step(self.runner.optim_wrapper)
                self.runner.optim_wrapper.zero_grad()
                del err  # its traceback holds the step's tensors
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.parts *= 2
                backoffs.append({"iteration": self._iter, "epoch": self._epoch, "parts": self.parts,
                                 "images_per_pass": -(-images // self.parts), "batch": images})
                self.runner.message_hub.update_info("cvtk_oom_backoff", backoffs)
                self.runner.logger.warning(
                    "out of GPU memory at iteration %d (epoch %d): the batch of %d images now runs in %d parts of "
                    "at most %d, gradients accumulated (same batch and learning rate per step)", self._iter,
                    self._epoch + 1, images, self.parts, -(-images // self.parts))

    def _maybe_inject(self):
        import torch

        at = os.environ.get(OOM_TEST_HOOK)
        if at and not self._injected and self._iter == int(at):
            self._injected = True
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at iteration {at} by {OOM_TEST_HOOK})")

    def _step_in_parts(self, data_batch):
        """One optimizer step over the batch, run in `self.parts` parts."""
        import contextlib

        import torch
        from mmengine.model import is_model_wrapper

        model, optim = self.runner.model, self.runner.optim_wrapper
        module = model.module if is_model_wrapper(model) else model
        images = len(data_batch["inputs"])
        chunks = [c for c in np.array_split(np.arange(images), self.parts) if len(c)]
        totals = {}
        for j, chunk in enumerate(chunks):
            part = {key: [value[i] for i in chunk] for key, value in data_batch.items()}
            last = j == len(chunks) - 1
            # DDP all-reduces the gradients at the last part's backward only (the others accumulate locally).
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with optim.optim_context(model):  # autocast under AmpOptimWrapper
                    data = module.data_preprocessor(part, True)
                    losses = model._run_forward(data, mode="loss")
                loss, log_vars = module.parse_losses(losses)
                share = len(chunk) / images
                optim.backward(loss * share)
            for key, value in log_vars.items():
                totals[key] = totals.get(key, 0) + value * share
        optim.step()
        optim.zero_grad()
        return {key: value.detach() if isinstance(value, torch.Tensor) else value for key, value in totals.items()}
