"""Every input and output on a real S3 server (SeaweedFS on 127.0.0.1): stage in, sync out, resume."""

import json
import re
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


def cached(root, area, server):
    """<cache>/<area>/<endpoint>/: where cvtk-job keeps objects ("s3") or outputs ("outputs") of this server."""
    return root / "cache" / area / server.endpoint.split("//")[1].replace(":", "_")


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


def _epoch_checkpoints(names):
    return sorted(str(n).rsplit("/", 1)[-1] for n in names if re.search(r"epoch_\d+\.pth$", str(n)))


def test_resume_from_s3_on_a_fresh_machine(s3_server, bucket, tmp_path):
    """S3 is the truth for --resume auto: a fresh machine continues from it, the bucket keeps the epoch
    checkpoints the workspace keeps, and a run deleted from S3 starts over on a machine that still has it."""
    first = run_cli(*s3_train_args(bucket, "run", "--epoch", "2"), env=env_for(s3_server, tmp_path / "machine1"))
    assert first.returncode == 0, first.stderr[-3000:]
    # Another machine: empty cache and workspace; the same command with --epoch 3 continues.
    machine2 = env_for(s3_server, tmp_path / "machine2")
    second = run_cli(*s3_train_args(bucket, "run", "--epoch", "3"), env=machine2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from s3://{bucket}/run/strawberry/epoch_2.pth" in second.stderr
    assert "resumed epoch: 2" in second.stderr
    assert "Epoch(train) [2]" not in second.stderr and "Epoch(train) [3]" in second.stderr
    rows = s3_server.client().get_object(Bucket=bucket, Key="run/strawberry.train_stats.train.txt")["Body"]
    assert [line.split("\t")[0] for line in rows.read().decode().splitlines()[1:]] == ["1", "2", "3"]
    workspace = cached(tmp_path / "machine2", "outputs", s3_server) / bucket / "run" / "strawberry"
    local = _epoch_checkpoints(workspace.iterdir())
    assert local == ["epoch_2.pth", "epoch_3.pth"]  # max_keep_ckpts=2
    assert _epoch_checkpoints(s3_server.keys(bucket, "run/strawberry/")) == local  # epoch_1 removed

    for key in s3_server.keys(bucket, "run/"):
        s3_server.client().delete_object(Bucket=bucket, Key=key)
    third = run_cli(*s3_train_args(bucket, "run", "--epoch", "1"), env=machine2)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "starting over" in third.stderr and "resumed epoch" not in third.stderr
    rows = s3_server.client().get_object(Bucket=bucket, Key="run/strawberry.train_stats.train.txt")["Body"]
    assert [line.split("\t")[0] for line in rows.read().decode().splitlines()[1:]] == ["1"]


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
        workspace = cached(tmp_path, "outputs", server) / name / "out" / "strawberry"
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


def test_a_prefix_is_what_it_lists_now_and_a_rerun_leaves_exactly_its_own_outputs(s3_server, bucket, trained_segm,
                                                                                 small_data, tmp_path):
    """Objects deleted from the input prefix are not predicted on (the cache still holds them), and the rerun
    into the same S3 output removes the previous run's drawings of them: done.json lists exactly the keys."""
    env = env_for(s3_server, tmp_path)
    prefix = "strawberry/test/images/"
    args = ["inference", "--label", small_data / "label.txt", "--data", f"s3://{bucket}/{prefix}",
            "--model_weights", trained_segm, "--output", f"s3://{bucket}/pred", "--device", "cpu",
            "--score_threshold", "0.0"]
    assert run_cli(*args, env=env).returncode == 0
    names = [k[len(prefix):] for k in s3_server.keys(bucket, prefix)]
    assert s3_server.keys(bucket, "pred/") == sorted([f"pred/{n}" for n in names] + ["pred/done.json",
                                                                                   "pred/instances.json"])
    for name in names[:2]:
        s3_server.client().delete_object(Bucket=bucket, Key=prefix + name)
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = names[2:]
    assert s3_server.keys(bucket, "pred/") == sorted([f"pred/{n}" for n in kept] + ["pred/done.json",
                                                                                  "pred/instances.json"])
    body = s3_server.client().get_object(Bucket=bucket, Key="pred/done.json")["Body"].read()
    assert [e["path"] for e in json.loads(body)["outputs"]] == sorted([*kept, "instances.json"])
    instances = json.loads(s3_server.client().get_object(Bucket=bucket, Key="pred/instances.json")["Body"].read())
    assert sorted(i["file_name"] for i in instances["images"]) == kept


def test_server_stopped_while_5000_objects_stage_is_exit_3_within_the_budget(tmp_path, trained_segm, small_data):
    """One deadline for the whole staging: the first object that cannot be fetched stops the rest (each used
    to retry for its own budget, in turn: hours for 10,000 images)."""
    import concurrent.futures
    import subprocess
    import sys

    from tests.conftest import REPO

    budget = 5
    server = SeaweedS3(tmp_path / "weed").start()
    try:
        name = "cvtk-many"
        server.client().create_bucket(Bucket=name)
        body = (small_data / "test" / "images").glob("*.jpg").__next__().read_bytes()
        client = server.client()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: client.put_object(Bucket=name, Key=f"many/{i:05d}.jpg", Body=body), range(5000)))
        env = {**__import__("os").environ, **env_for(server, tmp_path), "CVTK_JOB_S3_RETRY_SECONDS": str(budget),
               "CVTK_JOB_S3_PARALLEL": "4"}
        proc = subprocess.Popen([sys.executable, str(REPO / "entrypoint.py"), "inference", "--label",
                                 str(small_data / "label.txt"), "--data", f"s3://{name}/many/", "--model_weights",
                                 str(trained_segm), "--output", str(tmp_path / "out"), "--device", "cpu"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        staged = cached(tmp_path, "s3", server) / name / "many"
        deadline = time.time() + 300
        while not (staged.is_dir() and len(list(staged.glob("*.jpg"))) >= 20):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        server.stop()
        stopped = time.time()
        _, err = proc.communicate(timeout=budget + 60)
        elapsed = time.time() - stopped
    finally:
        server.stop()
    assert proc.returncode == 3, err[-3000:]
    assert elapsed < budget + 10, f"{elapsed:.1f} s after the server stopped"
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and f"s3://{name}/many/" in errors[0] and "stopped after" in errors[0], err[-3000:]
    assert len(list(staged.glob("*.jpg"))) < 5000
    assert not (tmp_path / "out").exists()


def test_a_coco_file_at_the_bucket_root_fetches_exactly_what_it_names(s3_server, small_data, tmp_path):
    """No listing of the JSON's folder (here: the whole bucket, next to unrelated objects): one GET per named
    image; a second run asks again (the cache is checked, never trusted) and downloads nothing."""
    from tests.s3proxy import CountingProxy

    name = f"cvtk-root-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    train = json.loads((small_data / "train" / "segm.json").read_text())
    client.put_object(Bucket=name, Key="segm.json", Body=json.dumps(train).encode())
    for img in train["images"]:
        client.upload_file(str(small_data / "train" / img["file_name"]), name, img["file_name"])
    for i in range(30):
        client.put_object(Bucket=name, Key=f"other/unrelated-{i}.jpg", Body=b"x" * 100)
    args = ["train", "--label", small_data / "label.txt", "--train", f"s3://{name}/segm.json", "--output_weights",
            tmp_path / "out" / "x.pth", *SPEED, "--model", TINY_MODELS["segm"], "--dry_run"]
    with CountingProxy(s3_server.endpoint) as proxy:
        # 0: check every time (by default an object checked in the last minute, by another process of the same
        # job on this node, is not asked for again).
        env = {**env_for(s3_server, tmp_path), "AWS_ENDPOINT_URL_S3": proxy.endpoint,
               "CVTK_JOB_S3_FRESH_SECONDS": "0"}
        first = run_cli(*args, env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        second = run_cli(*args, env=env)
        assert second.returncode == 0, second.stderr[-3000:]
    assert proxy.listings() == []
    named = {f"/{name}/{img['file_name']}" for img in train["images"]}
    gets = proxy.gets(f"/{name}/")
    assert set(gets) == named | {f"/{name}/segm.json"}
    assert all(gets[path] == 2 for path in named)  # once per run
    assert f"staged {len(named)} images ({len(named)} downloaded, 0 unchanged" in first.stderr
    assert f"staged {len(named)} images (0 downloaded, {len(named)} unchanged in the cache)" in second.stderr
