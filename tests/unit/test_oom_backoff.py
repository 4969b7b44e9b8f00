"""mmhooks.CvtkTrainLoop's out-of-memory back-off, on a model whose gradients can be computed by hand: a step
run in parts moves the weights exactly as the whole batch does, and a real torch.OutOfMemoryError (the
documented test hook) turns the step into parts without losing it."""

import logging
import types

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper

from cvtk_job import mmhooks


class Toy(BaseModel):
    """Least squares: the loss is the batch mean, as mmdet's losses are (per image, then averaged)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        x, y = torch.stack(inputs), torch.stack(data_samples)
        return {"loss": ((self.w(x).squeeze(1) - y) ** 2).mean()}


def loop_for(model, name):
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    runner = types.SimpleNamespace(model=model, optim_wrapper=optim, message_hub=MessageHub.get_instance(name),
                                   logger=logging.getLogger(name))
    loop = mmhooks.CvtkTrainLoop.__new__(mmhooks.CvtkTrainLoop)
    loop._runner, loop.parts, loop._injected, loop._iter, loop._epoch = runner, 1, False, 0, 0
    return loop


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": list(torch.randn(n, 3, generator=g)), "data_samples": list(torch.randn(n, generator=g))}


def weights_after(parts, data, name, monkeypatch=None):
    torch.manual_seed(0)
    model = Toy()
    loop = loop_for(model, name)
    loop.parts = parts
    out = loop._step(data)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), out, loop


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_a_step_in_parts_moves_the_weights_as_the_whole_batch_does(parts):
    data = batch()
    whole, whole_out, _ = weights_after(1, data, f"whole{parts}")
    split, split_out, _ = weights_after(parts, data, f"split{parts}")
    assert torch.allclose(whole, split, atol=1e-6)
    assert torch.allclose(whole_out["loss"], split_out["loss"], atol=1e-6)  # the logged loss is the batch's


def test_an_out_of_memory_error_halves_the_pass_and_keeps_the_step(monkeypatch):
    data = batch()
    whole, _, _ = weights_after(1, data, "ref")
    monkeypatch.setenv(mmhooks.OOM_TEST_HOOK, "0")
    backed, _, loop = weights_after(1, data, "oom")
    assert torch.allclose(whole, backed, atol=1e-6)  # the failed attempt left no gradient behind
    assert loop.parts == 2
    assert loop.backoffs == [{"iteration": 0, "epoch": 0, "parts": 2, "images_per_pass": 3, "batch": 6}]


def test_the_error_stands_when_splitting_cannot_help(monkeypatch):
    model = Toy()
    loop = loop_for(model, "single")

    def always_oom(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "train_step", always_oom)
    monkeypatch.setattr(loop, "_step_in_parts", always_oom)
    with pytest.raises(torch.OutOfMemoryError):
        loop._step(batch(n=2))
    assert [b["parts"] for b in loop.backoffs] == [2]  # 2 images: one halving, then nothing left to split


def amp_wrapper(model, init_scale, clip_grad=None):
    """mmengine's AmpOptimWrapper with a CPU GradScaler: its constructor refuses to run without a GPU, so it is
    made here as it would be there (same class, same backward/step), the scaler being the one thing swapped."""
    from mmengine.optim import AmpOptimWrapper

    optim = AmpOptimWrapper.__new__(AmpOptimWrapper)
    OptimWrapper.__init__(optim, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clip_grad=clip_grad)
    optim._scale_update_param, optim.cast_dtype = None, None
    optim.loss_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    optim.optim_context = lambda model: OptimWrapper.optim_context(optim, model)  # no CUDA autocast here
    return optim


@pytest.mark.parametrize("clip_grad", [None, {"max_norm": 1e6}])
def test_an_out_of_memory_error_inside_the_optimizer_step_under_mixed_precision_keeps_the_step(monkeypatch, clip_grad):
    """Under AMP (the default on CUDA) an OOM can come from the optimizer's step itself (its first step allocates
    the momentum buffers), after GradScaler recorded this step's gradients as unscaled: the step run again must
    unscale its new gradients (not move the weights by the loss scale) and must not trip over the record."""
    data = batch()
    results = {}
    for name, fail in (("ref", False), ("oom", True)):
        torch.manual_seed(0)
        model = Toy()
        loop = loop_for(model, f"amp-{name}-{clip_grad}")
        loop.runner.optim_wrapper = amp_wrapper(model, 1024.0, clip_grad)
        calls = []
        step = torch.optim.SGD.step

        def failing_step(self, *args, fail=fail, calls=calls, step=step, **kwargs):
            calls.append(1)
            if fail and len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (in the optimizer's step)")
            return step(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.SGD, "step", failing_step)
        loop._step(data)
        results[name] = (torch.cat([p.detach().flatten() for p in model.parameters()]), loop.parts)
    (ref, ref_parts), (backed, parts) = results["ref"], results["oom"]
    assert (ref_parts, parts) == (1, 2)
    assert torch.allclose(ref, backed, atol=1e-6)


def test_batch_size_auto_probes_again_after_an_out_of_memory_error_inside_the_optimizer_step(monkeypatch):
    """--batch_size auto's probe (autobatch._Stepper) reuses one optimizer wrapper for every batch it tries: a
    probe that ran out of memory in the optimizer's step must not fail the next one (with gradient clipping,
    GradScaler's record of the failed step raised "unscale_() has already been called")."""
    from cvtk_job import autobatch

    torch.manual_seed(0)
    stepper = autobatch._Stepper.__new__(autobatch._Stepper)
    stepper.model, stepper.device = Toy(), "cpu"
    stepper.optim = amp_wrapper(stepper.model, 1024.0, {"max_norm": 1e6})
    stepper.sample = {"inputs": torch.randn(3), "data_samples": torch.randn(())}
    calls = []
    step = torch.optim.SGD.step

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (in the optimizer's step)")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", failing_step)
    assert stepper(4) is False
    assert stepper(2) is True and len(calls) == 2
