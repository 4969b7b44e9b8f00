"""profiling.summarize on real torch.profiler captures of a small CPU model (expectations from what ran)."""

import time
import types

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cvtk_job import profiling
from cvtk_job.errors import UserError


def capture(steps, autocast_layers, items_per_step, torch_211=False):
    """`steps` forward+backward steps of conv -> linear; the layers named in `autocast_layers` run under CPU bf16
    autocast, the others in fp32; `items_per_step` .item() reads per step. `torch_211`: the events as torch 2.11
    (the GPU machine's) gives them, without `input_dtypes`, and the dtypes from the profiler's own records."""
    torch.manual_seed(0)
    conv, linear = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8 * 30 * 30, 4)
    x = torch.randn(2, 3, 32, 32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled="conv" in autocast_layers):
                h = conv(x).flatten(1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled="linear" in autocast_layers):
                y = linear(h.float())
            y.float().sum().backward()
            for _ in range(items_per_step):
                y.sum().item()
        wall = time.perf_counter() - start
    events, dtypes = prof.events(), None
    if torch_211:
        for e in events:
            vars(e).pop("input_dtypes", None)
        dtypes = profiling.recorded_dtypes(prof)
    return profiling.summarize(events, steps, wall, dtypes), wall


@pytest.mark.parametrize("torch_211", [False, True])
@pytest.mark.parametrize("autocast_layers,fp32", [((), 1.0), (("conv", "linear"), 0.0), (("linear",), None)])
def test_math_in_fp32_is_the_share_of_matrix_math_that_autocast_left_in_fp32(autocast_layers, fp32, torch_211):
    summary, _ = capture(2, autocast_layers, 1, torch_211)
    if fp32 is None:
        assert 0.0 < summary["math_in_fp32"] < 1.0  # the conv and its backward in fp32, the linear in bf16
    else:
        assert summary["math_in_fp32"] == fp32


def test_counts_are_per_step():
    summary, wall = capture(4, (), 3)
    assert summary["steps"] == 4
    assert summary["syncs_per_step"] == 3.0  # the .item() reads
    assert summary["wall_ms_per_step"] == pytest.approx(wall * 1000 / 4, rel=1e-3)
    twice, _ = capture(8, (), 3)
    assert twice["ops_per_step"] == summary["ops_per_step"] > 10
    assert "device_busy" not in summary and summary["data_wait_ms_per_step"] == 0
    assert profiling.line(summary).startswith("profile of 4 steps: ")


def test_math_whose_dtypes_were_not_recorded_is_unknown_not_half_precision():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        linear(torch.randn(2, 8)).sum().backward()
    events = prof.events()
    for e in events:
        vars(e).pop("input_dtypes", None)
    assert profiling.summarize(events, 1, 0.01)["math_in_fp32"] is None


def event(name, device="cpu", us=10, parent=None):
    """A profiler event as FunctionEvent exposes it, for a CUDA capture this machine cannot make."""
    from torch.autograd import DeviceType

    return types.SimpleNamespace(name=name, device_type=DeviceType.CUDA if device == "cuda" else DeviceType.CPU,
                                 cpu_parent=parent, cpu_time_total=us, self_cpu_time_total=us, device_time_total=0,
                                 id=0, time_range=types.SimpleNamespace(elapsed_us=lambda: us))


def test_on_cuda_each_wait_for_the_device_counts_once():
    """As torch's CUDA runtime records them: `.item()` is aten::_local_scalar_dense issuing an async copy and a
    stream synchronisation; `.cpu()` a copy and a synchronisation; `nonzero` the same for its count; a `.item()`
    of a CPU tensor waits for nothing. Three waits in two steps."""
    item = event("aten::_local_scalar_dense")
    cpu = event("aten::_to_copy")
    nonzero = event("aten::nonzero")
    events = [event("aten::add"), event("cudaLaunchKernel"), event("void add_kernel", "cuda", 40),
              item, event("cudaMemcpyAsync", parent=item), event("cudaStreamSynchronize", parent=item),
              cpu, event("cudaMemcpyAsync", parent=cpu), event("cudaStreamSynchronize", parent=cpu),
              nonzero, event("cudaMemcpyAsync", parent=nonzero), event("cudaStreamSynchronize", parent=nonzero),
              event("aten::_local_scalar_dense")]  # a CPU tensor's .item(): no runtime call under it
    summary = profiling.summarize(events, 2, 0.001)
    assert summary["syncs_per_step"] == 1.5
    assert summary["kernels_per_step"] == 0.5 and summary["device_busy"] == pytest.approx(0.04)


@pytest.mark.parametrize("value,expected", [("", None), ("5,10", (5, 10)), (" 0,1 ", (0, 1))])
def test_requested(value, expected):
    assert profiling.requested({"CVTK_JOB_PROFILE": value}) == expected


@pytest.mark.parametrize("value", ["10", "a,b", "5,0", "-1,3", "1,2,3"])
def test_requested_refuses_what_is_not_skip_steps(value):
    with pytest.raises(UserError, match="expected SKIP,STEPS"):
        profiling.requested({"CVTK_JOB_PROFILE": value})
