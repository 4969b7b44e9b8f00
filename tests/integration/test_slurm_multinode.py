"""The real multi-node sbatch templates on a real two-node Slurm (two slurmd on this machine).

The two nodes share this machine's disk, so each is given a disk of its own the way a cluster without a
shared filesystem has one: runtime `none` runs CVTK_PYTHON, here a wrapper that points CVTK_JOB_CACHE
(staged inputs, staged outputs) at a folder named after the node (SLURMD_NODENAME) and then runs this
checkout's Python. Data and outputs are on the real S3 server; nothing else is shared between the nodes.
"""

import json
import re
import sys
import time

import pytest

from tests.conftest import REPO, SPEED, TINY_MODELS

pytestmark = pytest.mark.slow
SLURM = REPO / "slurm"
BUCKET = "cvtk-multinode"
PER_NODE = ["--nodes=2", "--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    from tests.slurmcluster import SlurmCluster

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=2).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_data):
    s3_server.client().create_bucket(Bucket=BUCKET)
    s3_server.upload_tree(tiny_data, BUCKET, "data")
    return s3_server


def node_python(tmp_path):
    wrapper = tmp_path / "node-python"
    wrapper.write_text(f'#!/bin/bash\n# Each node its own disk: cache and staging under a folder named after it.\n'
                       f'export CVTK_JOB_CACHE="{tmp_path}/disk-$SLURMD_NODENAME/cache"\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def submit(slurm, tmp_path, s3, script, *args, wait=True):
    env = {**s3.env(), "CVTK_RUNTIME": "none", "CVTK_PYTHON": str(node_python(tmp_path)), "PYTHONPATH": str(REPO)}
    cmd = ["sbatch", "--parsable", f"--chdir={tmp_path}", *PER_NODE, SLURM / script, *map(str, args)]
    result = slurm.sbatch_wait(*cmd, env=env) if wait else slurm.run(*cmd, timeout=900, env=env)
    return result, result.stdout.strip().split(";")[0]


def train_args(train="data/train/bbox.json", epochs=1):
    d = f"s3://{BUCKET}"
    return ["--label", f"{d}/data/label.txt", "--train", f"{d}/{train}", "--valid", f"{d}/data/valid/bbox.json",
            "--output_weights", f"{d}/run/strawberry.pth", *SPEED, "--model", TINY_MODELS["det"], "--task", "det",
            "--epoch", str(epochs), "--batch_size", "1"]


def column(s3, key, index=0):
    body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode().splitlines()
    return [line.split("\t")[index] for line in body[1:]]


def job_info(slurm, job):
    out = slurm.run("scontrol", "show", "job", job).stdout
    return re.search(r"JobState=(\w+)", out).group(1), int(re.search(r"Restarts=(\d+)", out).group(1))


def test_two_nodes_train_then_a_usr1_requeues_and_finishes_every_epoch_once(slurm2, bucket, tmp_path):
    for key in bucket.keys(BUCKET, "run/"):
        bucket.client().delete_object(Bucket=BUCKET, Key=key)
    result, job = submit(slurm2, tmp_path, bucket, "train-multinode.sbatch", *train_args(epochs=3), wait=False)
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 900
    while "run/strawberry/last_checkpoint" not in bucket.keys(BUCKET, "run/"):  # epoch 1 is on S3
        assert time.time() < deadline and job_info(slurm2, job)[0] in ("PENDING", "RUNNING"), job_info(slurm2, job)
        time.sleep(0.5)
    # What --signal=B:USR1@… does before the time limit: USR1 to the batch shell, which passes it on.
    assert slurm2.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    # Slurm holds the requeued job (BeginTime = now + cred_expire + 1, 21 s with the test cluster's config) before
    # starting it again. Not released early: started at once, slurmd killed it ("Job credential revoked": the
    # first attempt's credential; seen in CI).
    while job_info(slurm2, job)[0] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.time() < deadline, job_info(slurm2, job)
        time.sleep(1)
    log = (tmp_path / f"cvtk-train-multinode-{job}.out").read_text()
    assert job_info(slurm2, job) == ("COMPLETED", 1), log[-4000:]
    assert "distributed: rank 0 of 2" in log and "distributed: rank 1 of 2" in log
    assert "requeueing (restart 1 of 3)" in log and "resumed epoch:" in log
    # Both nodes staged on their own disks; rank 0 alone wrote the outputs, once, and every epoch once.
    assert (tmp_path / "disk-n1" / "cache").is_dir() and (tmp_path / "disk-n2" / "cache").is_dir()
    keys = bucket.keys(BUCKET, "run/")
    assert "run/strawberry.done.json" in keys and "run/strawberry.failed.json" not in keys
    assert column(bucket, "run/strawberry.train_stats.train.txt") == ["1", "2", "3"]
    steps = bucket.client().get_object(Bucket=BUCKET, Key="run/strawberry.train_stats.valid.txt")["Body"].read()
    header, *rows = steps.decode().splitlines()
    step = header.split("\t").index("step")
    assert [r.split("\t")[step] for r in rows] == ["1", "2", "3"]


def test_two_nodes_a_broken_dataset_is_exit_2_and_not_requeued(slurm2, bucket, tmp_path):
    bucket.client().put_object(Bucket=BUCKET, Key="broken/bbox.json", Body=b'{"images": [')
    result, job = submit(slurm2, tmp_path, bucket, "train-multinode.sbatch", *train_args(train="broken/bbox.json"))
    log = (tmp_path / f"cvtk-train-multinode-{job}.out").read_text()
    assert result.returncode == 2, log[-3000:]  # sbatch --wait returns the job's exit code
    assert job_info(slurm2, job) == ("FAILED", 0) and "requeueing" not in log


def test_two_nodes_inference_without_a_shared_disk(slurm2, bucket, tmp_path):
    """Each node's drawn images and its part of instances.json reach S3; rank 0 merges through the bucket."""
    weights = f"s3://{BUCKET}/run/strawberry.pth"
    assert "run/strawberry.pth" in bucket.keys(BUCKET, "run/"), "the training test above writes the weights"
    out = f"s3://{BUCKET}/pred/"
    result, job = submit(slurm2, tmp_path, bucket, "inference.sbatch", "--label", f"s3://{BUCKET}/data/label.txt",
                         "--data", f"s3://{BUCKET}/data/test/images/", "--model_weights", weights, "--output", out,
                         "--score_threshold", "0.0", "--device", "cpu")
    log = (tmp_path / f"cvtk-inference-{job}.out").read_text()
    assert result.returncode == 0, log[-4000:]
    keys = bucket.keys(BUCKET, "pred/")
    images = sorted(k for k in bucket.keys(BUCKET, "data/test/images/"))
    drawn = sorted(k for k in keys if k.endswith(".jpg"))
    assert [k.rsplit("/", 1)[1] for k in drawn] == [k.rsplit("/", 1)[1] for k in images]  # from both nodes
    assert not [k for k in keys if "/." in k]  # the parts and manifests are gone
    body = bucket.client().get_object(Bucket=BUCKET, Key="pred/instances.json")["Body"].read()
    instances = json.loads(body)
    assert sorted(i["file_name"] for i in instances["images"]) == [k.rsplit("/", 1)[1] for k in images]
    done = json.loads(bucket.client().get_object(Bucket=BUCKET, Key="pred/done.json")["Body"].read())
    assert sorted(o["path"] for o in done["outputs"]) == sorted(k[len("pred/"):] for k in keys if k != "pred/done.json")
