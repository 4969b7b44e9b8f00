"""Every input and output on a real S3 server (SeaweedFS on 127.0.0.1): stage in, sync out, resume."""

import json
import time
import uuid

import pytest

from tests.conftest import SPEED, TINY_MODELS, run_cli
from tests.s3server import SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.slow


@pytest.fixture
def bucket(s3_server, small_data):
    """A fresh bucket holding the small sample under s3://<bucket>/strawberry/."""
    name = f"cvtk-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    s3_server.upload_tree(small_data, name, "strawberry")
    return name


def env_for(server, tmp_path, **extra):
    return {**server.env(), "CVTK_JOB_CACHE": str(tmp_path / "cache"), **extra}


def s3_train_args(bucket, out_prefix, *extra):
    d = f"s3://{bucket}/strawberry"
    return ["train", "--label", f"{d}/label.txt", "--train", f"{d}/train/segm.json", "--valid",
            f"{d}/valid/segm.json", "--test", f"{d}/test/segm.json", "--output_weights",
            f"s3://{bucket}/{out_prefix}/strawberry.pth", *SPEED, "--model", TINY_MODELS["segm"], *extra]


def assert_no_secret(*texts):
    for text in texts:
        assert SECRET_KEY not in text


def test_train_and_inference_with_everything_on_s3(s3_server, bucket, tmp_path):
    env = env_for(s3_server, tmp_path)
    result = run_cli(*s3_train_args(bucket, "outputs", "--epoch", "1"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = s3_server.keys(bucket, "outputs/")
    for name in ("strawberry.pth", "strawberry.py", "strawberry.train_stats.train.txt",
                 "strawberry.train_stats.train.png", "strawberry.train_stats.valid.txt",
                 "strawberry.train_stats.valid.png", "strawberry.test_stats.json", "strawberry.done.json",
                 "strawberry/test_outputs.coco.json", "strawberry/epoch_1.pth", "strawberry/last_checkpoint"):
        assert f"outputs/{name}" in keys, name
    client = s3_server.client()
    done = json.loads(client.get_object(Bucket=bucket, Key="outputs/strawberry.done.json")["Body"].read())
    listed = {o["path"]: o for o in done["outputs"]}
    head = client.head_object(Bucket=bucket, Key="outputs/strawberry.pth")
    assert listed["strawberry.pth"]["size"] == head["ContentLength"] and len(listed["strawberry.pth"]["sha256"]) == 64
    config = client.get_object(Bucket=bucket, Key="outputs/strawberry.py")["Body"].read().decode()
    assert_no_secret(result.stdout, result.stderr, config)

    result = run_cli("inference", "--label", f"s3://{bucket}/strawberry/label.txt",
                     "--data", f"s3://{bucket}/strawberry/test/images/", "--model_weights",
                     f"s3://{bucket}/outputs/strawberry.pth", "--output", f"s3://{bucket}/predictions",
                     "--score_threshold", "0.0", "--device", "cpu", "--num_workers", "2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"s3://{bucket}/predictions/instances.json"
    keys = s3_server.keys(bucket, "predictions/")
    images = s3_server.keys(bucket, "strawberry/test/images/")
    assert sorted(keys) == sorted(["predictions/instances.json", "predictions/done.json"]
                                  + [k.replace("strawberry/test/images/", "predictions/") for k in images])
    assert_no_secret(result.stdout, result.stderr)

    # The same command again: everything comes from the cache, nothing is downloaded.
    again = run_cli("inference", "--label", f"s3://{bucket}/strawberry/label.txt",
                    "--data", f"s3://{bucket}/strawberry/test/images/", "--model_weights",
                    f"s3://{bucket}/outputs/strawberry.pth", "--output", f"s3://{bucket}/predictions2",
                    "--device", "cpu", "--no_draw", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"staged {len(images)} images (0 downloaded, {len(images)} unchanged in the cache)" in again.stderr
    assert "staged 1 file (0 downloaded, 1 unchanged in the cache)" in again.stderr


def test_resume_from_s3_on_a_fresh_machine(s3_server, bucket, tmp_path):
    first = run_cli(*s3_train_args(bucket, "run", "--epoch", "1"), env=env_for(s3_server, tmp_path / "machine1"))
    assert first.returncode == 0, first.stderr[-3000:]
    # Another machine: empty cache and workspace; the same command with --epoch 2 continues.
    second = run_cli(*s3_train_args(bucket, "run", "--epoch", "2"), env=env_for(s3_server, tmp_path / "machine2"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "fetched from S3" in second.stderr and "resumed epoch: 1" in second.stderr
    assert "Epoch(train) [1]" not in second.stderr and "Epoch(train) [2]" in second.stderr
    rows = s3_server.client().get_object(Bucket=bucket, Key="run/strawberry.train_stats.train.txt")["Body"]
    assert [line.split("\t")[0] for line in rows.read().decode().splitlines()[1:]] == ["1", "2"]


def test_wrong_secret_is_exit_2_and_never_printed(s3_server, bucket, tmp_path):
    wrong = "wrong-secret-0d6c2a"
    env = env_for(s3_server, tmp_path, AWS_SECRET_ACCESS_KEY=wrong)
    result = run_cli(*s3_train_args(bucket, "out", "--epoch", "1"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"cvtk-job train: error: s3://{bucket}/strawberry/label.txt: access denied: wrong keys or no permission "
        "(403); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the pod's role")
    assert_no_secret(result.stdout, result.stderr)
    assert wrong not in result.stdout + result.stderr


def test_missing_object_is_exit_2_naming_it(s3_server, bucket, tmp_path):
    args = s3_train_args(bucket, "out", "--epoch", "1")
    args[args.index("--label") + 1] = f"s3://{bucket}/nope/label.txt"
    result = run_cli(*args, env=env_for(s3_server, tmp_path))
    assert result.returncode == 2
    assert f"s3://{bucket}/nope/label.txt: no such object" in result.stderr


def test_file_name_escaping_the_prefix_is_refused(s3_server, bucket, tmp_path):
    bad = {"images": [{"id": 1, "file_name": "../../secret.jpg", "width": 8, "height": 8}],
           "annotations": [], "categories": [{"id": 0, "name": "flower"}]}
    s3_server.client().put_object(Bucket=bucket, Key="strawberry/bad.json", Body=json.dumps(bad).encode())
    args = s3_train_args(bucket, "out", "--epoch", "1")
    args[args.index("--train") + 1] = f"s3://{bucket}/strawberry/bad.json"
    result = run_cli(*args, env=env_for(s3_server, tmp_path))
    assert result.returncode == 2
    assert "'../../secret.jpg' climbs out of the file's folder with '..'" in result.stderr


def test_dataset_errors_name_the_s3_object_not_the_local_cache(s3_server, bucket, tmp_path):
    s3_server.client().put_object(Bucket=bucket, Key="strawberry/other_label.txt", Body=b"flower\nfruit\n")
    args = s3_train_args(bucket, "out", "--epoch", "1")
    args[args.index("--label") + 1] = f"s3://{bucket}/strawberry/other_label.txt"
    result = run_cli(*args, env=env_for(s3_server, tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert [e.split(": categories: ")[0] for e in errors] == [
        f"error: s3://{bucket}/strawberry/{split}/segm.json" for split in ("train", "valid", "test")]
    assert str(tmp_path / "cache") not in result.stderr
    assert s3_server.keys(bucket, "out/") == []


def test_unreachable_endpoint_is_exit_3_within_a_minute(tmp_path, small_data):
    from tests.s3server import _free_ports

    port = _free_ports(1)[0]  # nothing listens there
    # The retry budget (45 s by default) shortened so the suite stays quick; the bound is what is tested.
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "CVTK_JOB_CACHE": str(tmp_path / "cache"),
           "CVTK_JOB_S3_RETRY_SECONDS": "10"}
    start = time.monotonic()
    result = run_cli("evaluate", "--gt", "s3://nowhere/gt.json", "--pred", "s3://nowhere/p.json",
                     "--output", tmp_path / "s.json", env=env)
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr[-2000:]
    assert "s3://nowhere/gt.json: cannot reach the S3 endpoint" in result.stderr
    assert "for 10 s" in result.stderr
    # It retries for the whole budget (not fewer seconds), and gives up soon after it rather than hanging.
    assert 10 <= elapsed < 40


def test_server_restart_during_training_uploads_does_not_fail_the_run(tmp_path, small_data):
    """A dedicated server is stopped right when epoch 1's checkpoint upload starts, and restarted."""
    import subprocess
    import sys

    from tests.conftest import REPO

    server = SeaweedS3(tmp_path / "weed").start()
    try:
        name = "cvtk-restart"
        server.client().create_bucket(Bucket=name)
        server.upload_tree(small_data, name, "strawberry")
        env = {**__import__("os").environ, **env_for(server, tmp_path)}
        proc = subprocess.Popen([sys.executable, str(REPO / "entrypoint.py"),
                                 *map(str, s3_train_args(name, "out", "--epoch", "2"))],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        workspace = tmp_path / "cache" / "outputs" / name / "out" / "strawberry"
        deadline = time.time() + 600
        while not (workspace / "epoch_1.pth").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        server.stop()
        time.sleep(2)
        server.start()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "out/strawberry.done.json" in server.keys(name, "out/")
    finally:
        server.stop()
