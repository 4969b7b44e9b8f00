"""Where a training step makes the host wait for the GPU: every host read of a device value, by call site.

On CUDA a host read is a synchronisation: the host stops queueing work until the GPU has drained its queue, and
the GPU then idles while Python launches the next kernels (issue 18: mixed precision gave only 1.14x over fp32).
This counts them without a GPU: one real training step of the default Mask R-CNN (R101, 1333x800, random init)
on the sample's densest images, stock mmdet's model against the model cvtk-job trains (its sync-free assigner,
sampler, RPN targets, box head loss and mask targets, forced onto their GPU ways), the same seed, the losses
asserted equal.

Counted: the operators whose result the host must read (`.item()`/`bool()`: aten::_local_scalar_dense) or whose
output size depends on the data (nonzero, unique, masked_select, indexing by a boolean mask), seen by a
TorchDispatchMode; and the Python calls that copy a tensor to the host (`.cpu()`, `.numpy()`, `.tolist()`).
A lower bound of what CUDA does: copies made inside compiled ops (mmcv's NMS reads its mask on the host) are
not seen; the runtime's own count is the GPU profile's (cvtk_job/profiling.py, bench/run.py --gpu).

    python bench/step_syncs.py [cpu|cuda] [BATCH]   # prints the count per step and the sites
"""

import collections
import copy
import os
import sys
import traceback

OPS = ("_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select")
MASKED = ("index", "index_put", "index_put_", "_index_put_impl_")  # with a boolean mask among the indices
COPIES = ("cpu", "numpy", "tolist")
LIBRARIES = ("/mmdet/", "/mmcv/", "/mmengine/", "/cvtk_job/")
# Reads of tensors that are on the host in a GPU run too: the data preprocessor's padding arithmetic on the
# images' shapes (mmengine's stack_batch builds them with torch.Tensor(list)).
HOST_SIDE = ("mmengine/model/utils.py",)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site():
    """'file:line (function)' of the innermost library frame that asked, or None for a read of a host tensor."""
    frames = [f for f in traceback.extract_stack()[:-2] if any(k in f.filename for k in LIBRARIES)]
    if not frames:
        return "?"
    f = frames[-1]
    name = f.filename.split("site-packages/")[-1].replace(REPO + "/", "")
    return None if name.startswith(HOST_SIDE) else f"{name}:{f.lineno} ({f.name})"


def _filled(name, args):
    """`x[mask] = 3`: torch makes the scalar a CPU tensor and runs masked_fill_, which reads nothing back (a
    value computed on the device, one element or many, goes through nonzero)."""
    value = args[2] if name != "index" and len(args) > 2 else None
    return value is not None and value.dim() == 0 and value.device.type == "cpu"


class Counter:
    """Counts host reads by (kind, call site) while active."""

    def __init__(self):
        self.sites = collections.Counter()

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        sites = self.sites

        def seen(kind):
            site = _site()
            if site is not None:
                sites[(kind, site)] += 1

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in OPS:
                    seen(name)
                elif name in MASKED and any(i is not None and i.dtype in (torch.bool, torch.uint8)
                                            for i in args[1]) and not _filled(name, args):
                    seen(f"{name} (mask)")  # indexing by a mask: its nonzero is inside the kernel
                return func(*args, **(kwargs or {}))

        self._originals = {attr: getattr(torch.Tensor, attr) for attr in COPIES}
        for attr, original in self._originals.items():
            def spied(tensor, *a, _attr=attr, _original=original, **k):
                if getattr(tensor, "_host_copy", False):  # `.cpu().numpy()` reads the device once
                    del tensor._host_copy
                else:
                    seen(_attr)
                result = _original(tensor, *a, **k)
                if _attr == "cpu":  # (on the CPU the tensor itself: the flag is for its next read only)
                    result._host_copy = True
                return result
            setattr(torch.Tensor, attr, spied)
        self._mode = Spy()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        self._mode.__exit__(*exc)
        for attr, original in self._originals.items():
            setattr(torch.Tensor, attr, original)

    @property
    def total(self):
        return sum(self.sites.values())


def setup(device="cpu", batch=4, precision="fp32"):
    """The default Mask R-CNN's training config for the sample (at `precision`: fp16/bf16 give MMEngine's
    AmpOptimWrapper, CUDA only), its `batch` densest training images, their object counts, and `model(ours)`:
    stock mmdet's model or the one cvtk-job trains, built with the same seed, with its optimizer wrapper.
    Shared with bench/step_time.py."""
    import torch
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DATASETS, MODELS, init_default_scope

    sys.path.insert(0, REPO)
    from cvtk_job import masktargets, mmconfig
    from cvtk_job.options import TrainOptions

    init_default_scope("mmdet")
    sample = os.path.join(REPO, "examples", "strawberry")
    train = os.path.join(sample, "train", "segm.json")
    with open(os.path.join(sample, "label.txt"), encoding="utf-8") as f:
        classes = f.read().split()
    opts = TrainOptions(label=os.path.join(sample, "label.txt"), train=train, output_weights="/tmp/x.pth",
                        pretrained="none", task="segm", num_workers=0, lr="0.002")
    ctx = mmconfig.RunContext(classes=classes, data=mmconfig.DataFiles(train), work_dir="/tmp/x",
                              output_prefix="/tmp/x", num_train_images=60, device=device, precision=precision)
    cfg = mmconfig.build_config(opts, mmconfig.resolve_model(None, "segm"), ctx)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    counts = [len(dataset.get_data_info(i)["instances"]) for i in range(len(dataset))]
    densest = sorted(range(len(counts)), key=lambda i: -counts[i])[:batch]
    data = [dataset[i] for i in densest]

    def model(ours):
        model_cfg = copy.deepcopy(cfg.model)
        if ours:
            mmconfig.use_training_modules(model_cfg)
        torch.manual_seed(0)
        built = MODELS.build(model_cfg).to(device)
        if ours:
            masktargets.install(built)
        built.train()
        return built, build_optim_wrapper(built, copy.deepcopy(cfg.optim_wrapper))

    return cfg, data, [counts[i] for i in densest], model


def count(device="cpu", batch=4):
    """One training step each way → ({"mmdet": Counter, "ours": Counter}, objects per image)."""
    import torch
    from mmengine.dataset import pseudo_collate

    from cvtk_job.assigner import CvtkMaxIoUAssigner, CvtkRandomSampler
    from cvtk_job.bbox_head import CvtkShared2FCBBoxHead
    from cvtk_job.rpn_head import CvtkRPNHead

    _, data, objects, model = setup(device, batch)
    found, losses = {}, {}
    vectorized = {cls: cls.__dict__["vectorized"]
                  for cls in (CvtkMaxIoUAssigner, CvtkRandomSampler, CvtkRPNHead, CvtkShared2FCBBoxHead)}
    for cls in vectorized:
        cls.vectorized = staticmethod(lambda tensor: True)  # the way they run on a GPU
    try:
        for name, ours in (("mmdet", False), ("ours", True)):
            net, optim = model(ours)
            torch.manual_seed(1)
            with Counter() as found[name]:
                losses[name] = net.train_step(pseudo_collate(data), optim_wrapper=optim)
    finally:
        for cls, original in vectorized.items():
            cls.vectorized = original
    for key, value in losses["mmdet"].items():
        if not torch.allclose(value, losses["ours"][key], rtol=1e-4, atol=1e-6):
            raise SystemExit(f"step_syncs: the two steps differ ({key}: {float(value)} vs "
                             f"{float(losses['ours'][key])}): not the same computation")
    return found, objects


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    found, objects = count(device, batch)
    for name, counter in found.items():
        print(f"{name}: {counter.total} host reads in one step of {batch} images ({objects} objects)")
        for (kind, site), n in counter.sites.most_common():
            print(f"  {n:4d} {kind:20s} {site}")


if __name__ == "__main__":
    main()
