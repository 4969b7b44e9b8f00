"""Fault tests: signals at three points, a damaged checkpoint, divergence; nothing lost, nothing doubled."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO, SPEED, TINY_MODELS, run_cli

pytestmark = pytest.mark.slow


def args_for(data, out, epochs, *extra):
    return ["train", "--label", data / "label.txt", "--train", data / "train" / "bbox.json",
            "--valid", data / "valid" / "bbox.json", "--output_weights", out, *SPEED,
            "--model", TINY_MODELS["det"], "--task", "det", "--epoch", str(epochs), *extra]


def run_and_signal(args, marker, sig=signal.SIGTERM, env=None):
    """Start the CLI, send `sig` when `marker` appears on stderr; return (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "entrypoint.py"), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    lines, sent = [], []
    timer = threading.Timer(900, proc.kill)
    timer.start()
    for line in proc.stderr:
        lines.append(line)
        if not sent and marker in line:
            proc.send_signal(sig)
            sent.append(line)
    proc.wait()
    timer.cancel()
    assert sent, f"never saw {marker!r}"
    return proc.returncode, "".join(lines)


def column(path, name):
    lines = path.read_text().splitlines()
    index = lines[0].split("\t").index(name)
    return [line.split("\t")[index] for line in lines[1:]]


@pytest.mark.parametrize("where, marker", [
    ("during an epoch", "Epoch(train) [2][2/4]"),
    ("during validation", "validating epoch 1"),
    ("during the checkpoint write", "Saving checkpoint at 1 epochs"),
])
def test_sigterm_then_rerun_gives_every_epoch_exactly_once(tiny_data, tmp_path, where, marker):
    out = tmp_path / "strawberry.pth"
    code, err = run_and_signal(args_for(tiny_data, out, 3, "--batch_size", "2"), marker)
    assert code == 75, err[-3000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]
    assert not (tmp_path / "strawberry.done.json").exists()
    assert json.loads((tmp_path / "strawberry.failed.json").read_text())["exit_code"] == 75

    result = run_cli(*args_for(tiny_data, out, 3, "--batch_size", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert column(tmp_path / "strawberry.train_stats.train.txt", "epoch") == ["1", "2", "3"]
    assert column(tmp_path / "strawberry.train_stats.valid.txt", "step") == ["1", "2", "3"]
    assert (tmp_path / "strawberry.done.json").exists() and not (tmp_path / "strawberry.failed.json").exists()
    # 8 images / batch 2 = 4 iterations an epoch: the resumed run ends at iteration 12, as an uninterrupted one
    import torch

    from cvtk_job import checkpoints

    checkpoints.allow_mmengine_checkpoints()
    state = torch.load(tmp_path / "strawberry" / "epoch_3.pth", map_location="cpu")
    assert state["meta"]["epoch"] == 3 and state["meta"]["iter"] == 12


def test_damaged_last_checkpoint_resumes_from_the_previous_one(tiny_data, tmp_path):
    out = tmp_path / "strawberry.pth"
    assert run_cli(*args_for(tiny_data, out, 2)).returncode == 0
    last = tmp_path / "strawberry" / "epoch_2.pth"
    with open(last, "r+b") as fh:
        fh.truncate(last.stat().st_size // 2)  # a write cut short by a crash
    result = run_cli(*args_for(tiny_data, out, 3))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"the latest checkpoint {last} is damaged; resuming from" in result.stderr
    assert "resumed epoch: 1" in result.stderr
    assert column(tmp_path / "strawberry.train_stats.train.txt", "epoch") == ["1", "2", "3"]


def test_sigterm_with_outputs_on_s3_and_a_wiped_machine(s3_server, tiny_data, tmp_path):
    bucket = "cvtk-faults"
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.upload_tree(tiny_data, bucket, "data")
    d = f"s3://{bucket}/data"
    args = ["train", "--label", f"{d}/label.txt", "--train", f"{d}/train/bbox.json", "--valid",
            f"{d}/valid/bbox.json", "--output_weights", f"s3://{bucket}/run/strawberry.pth", *SPEED,
            "--model", TINY_MODELS["det"], "--task", "det", "--epoch", "3", "--batch_size", "2"]
    env = {**s3_server.env(), "CVTK_JOB_CACHE": str(tmp_path / "cache")}
    code, err = run_and_signal(args, "Epoch(train) [2][2/4]", env=env)
    assert code == 75, err[-3000:]
    assert "run/strawberry.failed.json" in s3_server.keys(bucket, "run/")
    shutil.rmtree(tmp_path / "cache")  # the pod is gone: nothing local survives
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fetched from S3" in result.stderr
    keys = s3_server.keys(bucket, "run/")
    assert "run/strawberry.done.json" in keys and "run/strawberry.failed.json" not in keys
    body = s3_server.client().get_object(Bucket=bucket, Key="run/strawberry.train_stats.train.txt")["Body"]
    assert [line.split("\t")[0] for line in body.read().decode().splitlines()[1:]] == ["1", "2", "3"]


def test_divergence_stops_with_exit_4_and_a_hint(tiny_data, tmp_path):
    termination = tmp_path / "termination-log"
    termination.write_text("")
    result = run_cli(*args_for(tiny_data, tmp_path / "strawberry.pth", 2, "--lr", "1e6"),
                     env={"CVTK_JOB_TERMINATION_LOG": str(termination)})
    assert result.returncode == 4, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "training diverged; lower the learning rate (--lr" in last
    assert termination.read_text().startswith("exit 4: the loss became")


@pytest.fixture(scope="module")
def det_run(tiny_data, tmp_path_factory):
    """A finished one-epoch det run: its weights file and its workspace's epoch checkpoint."""
    out = tmp_path_factory.mktemp("det_run") / "strawberry.pth"
    result = run_cli(*args_for(tiny_data, out, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, out.parent / "strawberry" / "epoch_1.pth"


def _garbage(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint\n")
    return path


def _other_labels(tmp_path):
    path = tmp_path / "other_label.txt"
    path.write_text("flower\nfruit\n")
    return path


# (name, command, replaced, added (or with None, removed) arguments and environment, exit code, the one
# error line's expected text)
BAD_INPUT = [
    ("missing train file", "train", lambda d, t, r: {"--train": t / "nowhere.json"}, 2,
     "nowhere.json: file not found; pass the COCO JSON of the train images"),
    ("unknown model", "train", lambda d, t, r: {"--model": "mask-rcnn_r50_fpn_1x_cocoo"}, 2,
     "--model mask-rcnn_r50_fpn_1x_cocoo: no such config in mmdet; did you mean mask-rcnn_r50_fpn_1x_coco,"),
    ("bad image size", "train", lambda d, t, r: {"--image_size": ["16", "16"]}, 2,
     "--image_size 16 16: both sides must be at least 32 pixels"),
    ("label mismatch at train", "train", lambda d, t, r: {"--label": _other_labels(t), "--valid": None}, 2,
     "(missing ['fruit']; unexpected ['green_fruit', 'red_fruit'])"),
    ("missing pretrained file", "train", lambda d, t, r: {"--pretrained": t / "nowhere.pth"}, 2,
     "nowhere.pth: file not found; use auto, none, a path or a URL"),
    ("damaged pretrained file", "train", lambda d, t, r: {"--pretrained": _garbage(t)}, 2,
     "garbage.pth: not a readable torch checkpoint"),
    ("damaged resume file", "train", lambda d, t, r: {"--resume": _garbage(t)}, 2,
     "garbage.pth: not a readable torch checkpoint"),
    ("weights of another task", "train", lambda d, t, r: {"--resume": r[1]}, 2,
     "epoch_1.pth: is a box-only model (task det) but this run is --task segm; pass --task det"),
    ("final weights as a resume point", "train", lambda d, t, r: {"--resume": r[0]}, 2,
     "holds weights only, not a training state (optimizer, epoch); to continue a run use --resume auto"),
    ("cuda without a GPU", "train", lambda d, t, r: {"--device": "cuda", "CUDA_VISIBLE_DEVICES": ""}, 2,
     "--device cuda: no CUDA GPU is visible; use --device cpu"),
    ("label mismatch at inference", "inference", lambda d, t, r: {"--label": _other_labels(t)}, 2,
     "classes ['flower', 'fruit'] differ from the classes the weights were trained with ['flower', 'green_fruit',"),
    ("damaged weights at inference", "inference", lambda d, t, r: {"--model_weights": _garbage(t)}, 2,
     "garbage.pth: not a readable torch checkpoint (truncated, or not a .pth file)"),
    ("missing data at inference", "inference", lambda d, t, r: {"--data": t / "no_images"}, 2,
     "no_images: no such file or folder"),
]


@pytest.mark.parametrize("name, command, change, code, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gives_one_line_and_its_exit_code_and_writes_nothing(tiny_data, det_run, tmp_path, name,
                                                                        command, change, code, message):
    out = tmp_path / "out"
    if command == "train":
        args = {"--label": tiny_data / "label.txt", "--train": tiny_data / "train" / "segm.json",
                "--valid": tiny_data / "valid" / "segm.json", "--output_weights": out / "strawberry.pth",
                "--model": TINY_MODELS["segm"], "--epoch": "1"}
        speed = SPEED
    else:
        args = {"--label": tiny_data / "label.txt", "--data": tiny_data / "test" / "images",
                "--model_weights": det_run[0], "--output": out}
        speed = ["--device", "cpu"]
    changes = change(tiny_data, tmp_path, det_run)
    env = {k: v for k, v in changes.items() if not k.startswith("--")}
    args.update({k: v for k, v in changes.items() if k.startswith("--")})
    args = {k: v for k, v in args.items() if v is not None}
    argv = [command, *speed]
    for flag, value in args.items():
        argv += [flag, *(value if isinstance(value, list) else [value])]
    result = run_cli(*argv, env=env)

    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), sorted(out.rglob("*"))


def test_resume_from_an_explicit_checkpoint_continues_at_its_next_epoch(tiny_data, det_run, tmp_path):
    out = tmp_path / "continued.pth"
    result = run_cli(*args_for(tiny_data, out, 2, "--resume", det_run[1]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {det_run[1]}" in result.stderr
    assert column(tmp_path / "continued.train_stats.train.txt", "epoch") == ["2"]  # epoch 1 was not redone
