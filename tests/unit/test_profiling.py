"""profiling.summarize on real torch.profiler captures of a small CPU model (expectations from what ran)."""

import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cvtk_job import profiling
from cvtk_job.errors import UserError


def capture(steps, autocast_layers, items_per_step):
    """`steps` forward+backward steps of conv -> linear; the layers named in `autocast_layers` run under CPU bf16
    autocast, the others in fp32; `items_per_step` .item() reads per step."""
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
    return profiling.summarize(prof.events(), steps, wall), wall


@pytest.mark.parametrize("autocast_layers,fp32", [((), 1.0), (("conv", "linear"), 0.0), (("linear",), None)])
def test_math_in_fp32_is_the_share_of_matrix_math_that_autocast_left_in_fp32(autocast_layers, fp32):
    summary, _ = capture(2, autocast_layers, 1)
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


@pytest.mark.parametrize("value,expected", [("", None), ("5,10", (5, 10)), (" 0,1 ", (0, 1))])
def test_requested(value, expected):
    assert profiling.requested({"CVTK_JOB_PROFILE": value}) == expected


@pytest.mark.parametrize("value", ["10", "a,b", "5,0", "-1,3", "1,2,3"])
def test_requested_refuses_what_is_not_skip_steps(value):
    with pytest.raises(UserError, match="expected SKIP,STEPS"):
        profiling.requested({"CVTK_JOB_PROFILE": value})
