"""A training step's time by precision and memory format: the model alone, without data loading or start-up.

Issue 18 asks why mixed precision trained only 1.14x faster than fp32 on an H200. The whole-run rows of
`bench/run.py --gpu` include the data loader, validation and the run's start; this times the step itself on a
fixed batch (the sample's densest training images at 1333x800, the default Mask R-CNN R101, random init), so
three questions get one number each:
- fp16 vs fp32, the model cvtk-job trains (AmpOptimWrapper with dynamic loss scaling, as `train` uses it);
- fp16 with the model and input in channels_last (NHWC, the layout tensor-core convolutions read natively) vs
  NCHW, the default: a layout `train` does not use yet (cvtk_job/roi_extractor.py already hands RoIAlign NCHW);
- fp16 with cvtk-job's training modules (assigner, sampler, RoI extractor, losses, mask targets) vs stock mmdet's.
Each variant: a fresh model, `warmup` untimed steps (cuDNN's choices, the allocator), then `steps` timed ones, each
closed by a device synchronisation; the median and the peak of allocated memory are reported, and the losses must
stay finite.

    python bench/step_time.py [cuda|cpu] [BATCH] [STEPS]   # prints one line per variant
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_syncs  # noqa: E402

# name: (precision, channels_last, cvtk-job's training modules)
VARIANTS = {
    "fp32": ("fp32", False, True),
    "fp16": ("fp16", False, True),
    "fp16 channels_last": ("fp16", True, True),
    "fp16 stock mmdet": ("fp16", False, False),
    "fp32 channels_last": ("fp32", True, True),
}
CUDA_VARIANTS = ("fp32", "fp16", "fp16 channels_last", "fp16 stock mmdet")
# MMEngine's AmpOptimWrapper needs CUDA: on the CPU this only checks that the script and the layout change run.
CPU_VARIANTS = ("fp32", "fp32 channels_last")


def channels_last(model):
    """The model's 4-D parameters and its input batches in channels_last (the data preprocessor stacks NCHW)."""
    import torch

    model.to(memory_format=torch.channels_last)
    preprocess = model.data_preprocessor.forward

    def forward(data, training=False):
        data = preprocess(data, training)
        data["inputs"] = data["inputs"].contiguous(memory_format=torch.channels_last)
        return data
    model.data_preprocessor.forward = forward
    return model


def time_variant(device, batch, name, steps, warmup):
    """{"ms": median step time, "ms_all": every timed step, "peak_mib": ..., "loss": the last total loss}."""
    import torch
    from mmengine.dataset import pseudo_collate

    precision, nhwc, ours = VARIANTS[name]
    _, data, objects, model = step_syncs.setup(device, batch, precision)
    net, optim = model(ours)
    if nhwc:
        net = channels_last(net)
    cuda = device == "cuda"
    times, loss = [], None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses = net.train_step(pseudo_collate(data), optim_wrapper=optim)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
        loss = losses["loss"].detach().item()  # the total (MMEngine's parse_losses)
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise SystemExit(f"step_time: {name}: the loss is {loss} at step {i + 1}: not a step worth timing")
    peak = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
    del net, optim
    if cuda:
        torch.cuda.empty_cache()
    return {"ms": statistics.median(times), "ms_all": [round(t, 1) for t in times], "peak_mib": peak,
            "loss": round(loss, 4), "objects": objects}


def measure(device="cuda", batch=8, steps=10, warmup=3, names=None):
    names = names or (CUDA_VARIANTS if device == "cuda" else CPU_VARIANTS)
    return {name: time_variant(device, batch, name, steps, warmup) for name in names}


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    for name, r in measure(device, batch, steps, warmup=3 if device == "cuda" else 1).items():
        print(f"{name}: {r['ms']:.1f} ms per step (median of {len(r['ms_all'])}: {r['ms_all']}), peak "
              f"{r['peak_mib']} MiB, loss {r['loss']}, batch {batch} ({r['objects']} objects)", flush=True)


if __name__ == "__main__":
    main()
