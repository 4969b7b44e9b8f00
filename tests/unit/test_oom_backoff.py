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
