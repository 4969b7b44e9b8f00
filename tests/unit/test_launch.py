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


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[001-004]", "gpu001"), ("gpu[001-004,007],cpu1", "gpu001"), ("gpu[7,9-10]", "gpu7"),
    ("node1,node2", "node1"), ("n[1-2]-ib[3-4]", "n1-ib3"), ("single", "single"), ("a[09-10]b", "a09b"),
])
def test_first_host_of_a_slurm_nodelist_without_scontrol(nodelist, first):
    assert launch.first_host(nodelist) == first


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_CPUS_PER_TASK": "1"}, "1"),  # srun without a cpuset: the rank still sees both cores
    ({"LOCAL_WORLD_SIZE": "2"}, "1"),
    ({"SLURM_CPUS_PER_TASK": "1", "OMP_NUM_THREADS": "2"}, "2"),  # the user's word wins
    ({}, "2"),
])
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_cpu_math_threads_follow_the_process_share(env, expected):
    code = ("import torch; torch.set_num_threads(2); from cvtk_job import launch; launch.select_device('cpu'); "
            "print(torch.get_num_threads())")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    assert out == [expected]
