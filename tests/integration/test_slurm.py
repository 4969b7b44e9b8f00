"""The real sbatch templates on a real Slurm (runtime `none`: this checkout's Python on the node)."""

import json
import re
import sys

import pytest

from tests.conftest import REPO, SPEED, TINY_MODELS

pytestmark = pytest.mark.slow
SLURM = REPO / "slurm"
# This machine has 2 CPUs: the templates' GPU-node defaults are overridden on the sbatch line, as a
# user would for their cluster.
SMALL = ["--cpus-per-task=1"]


def job_env(tmp_path):
    return {"CVTK_RUNTIME": "none", "CVTK_PYTHON": sys.executable, "PYTHONPATH": str(REPO),
            "CVTK_JOB_CACHE": str(tmp_path / "cache")}


def submit(slurm, tmp_path, script, *args, sbatch=(), wait=True, env=None):
    """sbatch exports the submitting environment to the job: the job's settings go in that environment."""
    cmd = ["sbatch", "--parsable", f"--chdir={tmp_path}", *SMALL, *sbatch, SLURM / script, *args]
    env = {**job_env(tmp_path), **(env or {})}
    return slurm.sbatch_wait(*cmd, env=env) if wait else slurm.run(*cmd, timeout=900, env=env)


def train_args(data, out, *extra):
    return ["--label", data / "label.txt", "--train", data / "train" / "bbox.json", "--valid",
            data / "valid" / "bbox.json", "--output_weights", out / "strawberry.pth", *SPEED,
            "--model", TINY_MODELS["det"], "--task", "det", *extra]


def log_of(tmp_path, name, job):
    return (tmp_path / f"{name}-{job}.out").read_text()


def rows(path):
    return [line.split("\t")[0] for line in path.read_text().splitlines()[1:]]


def test_train_then_inference_jobs(slurm, tiny_data, tmp_path):
    result = submit(slurm, tmp_path, "train.sbatch", *train_args(tiny_data, tmp_path, "--epoch", "1"))
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    log = log_of(tmp_path, "cvtk-train", job)
    assert (tmp_path / "strawberry.done.json").exists(), log[-3000:]
    assert rows(tmp_path / "strawberry.train_stats.train.txt") == ["1"]

    result = submit(slurm, tmp_path, "inference.sbatch", "--label", tiny_data / "label.txt", "--data",
                    tiny_data / "test" / "images", "--model_weights", tmp_path / "strawberry.pth",
                    "--output", tmp_path / "predictions", "--device", "cpu", "--score_threshold", "0.0")
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    instances = json.loads((tmp_path / "predictions" / "instances.json").read_text())
    assert len(instances["images"]) == 3, log_of(tmp_path, "cvtk-inference", job)[-3000:]


def test_two_ranks_train_together(slurm, tiny_data, tmp_path):
    result = submit(slurm, tmp_path, "train.sbatch", *train_args(tiny_data, tmp_path, "--epoch", "1"),
                    sbatch=["--ntasks-per-node=2", "--gres=gpu:2"])
    job = result.stdout.strip().split(";")[0]
    log = log_of(tmp_path, "cvtk-train", job)
    assert result.returncode == 0, log[-3000:]
    # The master is the first node's NodeAddr, as Slurm itself reports it (node names need not resolve).
    first = slurm.run("scontrol", "show", "hostnames", slurm.run("squeue", "-h", "-j", job, "-o", "%N").stdout
                      .strip() or slurm.host).stdout.split()[0]
    addr = re.search(r"NodeAddr=(\S+)", slurm.run("scontrol", "show", "node", first).stdout).group(1)
    masters = re.findall(r"distributed: rank (\d) of 2 \(slurm, master ([^:]+):(\d+)\)", log)
    assert sorted(m[0] for m in masters) == ["0", "1"], log[-3000:]
    assert {m[1] for m in masters} == {addr} and len({m[2] for m in masters}) == 1  # one master, one port
    assert "current batch size is 8" in log  # 2 ranks x 4: the auto learning rate follows the global batch
    assert rows(tmp_path / "strawberry.train_stats.train.txt") == ["1"]
    assert json.loads((tmp_path / "strawberry.done.json").read_text())["outputs"]


# USR1 → checkpoint → `scontrol requeue` → resume is tested on the two-node cluster
# (test_slurm_multinode.py): the same common.sh, and Slurm's requeue alone costs ~150 s a run here.


@pytest.mark.parametrize("nodelist", ["gpu[001-004,007],cpu1", "n[1-2]-ib[3-4]", "gpu[7,9-10]", "x1,x2"])
def test_first_host_without_scontrol_agrees_with_scontrol(slurm, nodelist):
    """Inside a container there is no scontrol: launch.first_host must read node lists as Slurm does."""
    from cvtk_job import launch

    out = slurm.run("scontrol", "show", "hostnames", nodelist)
    assert out.returncode == 0, out.stderr
    assert launch.first_host(nodelist) == out.stdout.split()[0]
