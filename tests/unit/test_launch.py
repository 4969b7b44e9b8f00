"""launch: the default number of loader workers follows the CPUs the process may use."""

import os
import shutil
import subprocess
import sys

import pytest

from cvtk_job import launch


@pytest.mark.parametrize("cpus, env, expected", [
    (1, {}, 0), (2, {}, 1), (4, {}, 3), (64, {}, 8),
    (16, {"LOCAL_WORLD_SIZE": "4"}, 3),  # torchrun: four workers share the node's CPUs
    (16, {"SLURM_CPUS_PER_TASK": "3"}, 2),
    (2, {"LOCAL_WORLD_SIZE": "4"}, 0),
])
def test_default_workers(monkeypatch, cpus, env, expected):
    monkeypatch.setattr(launch, "available_cpus", lambda: cpus)
    assert launch.default_workers(env) == expected


@pytest.mark.skipif(not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2, reason="needs taskset, 2 CPUs")
def test_the_affinity_mask_is_what_counts_not_the_machine():
    code = "from cvtk_job import launch; print(launch.available_cpus(), launch.default_workers({}))"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "0"]
    assert launch.available_cpus() <= len(os.sched_getaffinity(0))
