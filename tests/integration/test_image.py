"""The container image: hadolint, then build it from this Dockerfile and run train and inference in it.

No registry is reachable here, so the CUDA bases are replaced by a Debian base made locally, and the
wheels `make setup` already has (CPU torch, the compiled mmcv) are passed in: the build runs offline
(`PIP_ARGS=--no-index`). Containers run as an arbitrary UID on a read-only root filesystem with no
network. A GPU (`--gpus`) cannot be tested on this machine.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLE
from tests.dockerengine import DockerEngine

pytestmark = pytest.mark.slow
TAG = "cvtk-job:test"


def test_hadolint_passes():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    docker = DockerEngine(tmp_path_factory.mktemp("docker")).start()
    yield docker
    docker.prune()
    docker.stop()


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory):
    context = tmp_path_factory.mktemp("context")
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "entrypoint.py"):
        shutil.copy(REPO / name, context / name)
    for folder in ("cvtk_job", "requirements"):
        shutil.copytree(REPO / folder, context / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, str(REPO / "tools" / "image_wheels.py"), str(context / "wheels")], check=True,
                   capture_output=True)
    base = engine.ensure_base_image()
    result = engine.docker("build", "--network", "host", "-t", TAG,
                           "--build-arg", f"BASE_DEVEL={base}", "--build-arg", f"BASE_RUNTIME={base}",
                           "--build-arg", "BUILD_PACKAGES=python3 python3-venv",
                           "--build-arg", "RUNTIME_PACKAGES=python3 libgl1 libglib2.0-0",
                           "--build-arg", "PIP_ARGS=--no-index", context)
    assert result.returncode == 0, result.stderr[-5000:]
    return TAG


def run(engine, tmp_path, *args):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    os.chmod(out, 0o777)  # the container's arbitrary UID must be able to write there
    return engine.docker("run", "--rm", "--network", "none", "--read-only", "--user", "12345:12345",
                         "--tmpfs", "/tmp:rw,size=2g", "--shm-size", "512m",
                         "-v", f"{SAMPLE}:/data:ro", "-v", f"{REPO / 'examples' / 'configs'}:/configs:ro",
                         "-v", f"{out}:/out", TAG, *args, timeout=1200)


def test_image_metadata_and_doctor(engine, image, tmp_path):
    inspect = json.loads(engine.docker("image", "inspect", image).stdout)[0]["Config"]
    assert inspect["User"] == "10001:10001"
    assert inspect["Entrypoint"] == ["/opt/venv/bin/python", "/app/entrypoint.py"]
    assert inspect["Labels"]["org.opencontainers.image.version"] == "0.1.0"
    assert "PYTHONUNBUFFERED=1" in inspect["Env"]
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in inspect["Env"]
    result = run(engine, tmp_path, "doctor")
    assert result.returncode == 0, result.stderr
    assert "nms, RoIAlign ok" in result.stdout


def test_train_and_inference_in_the_container(engine, image, tmp_path):
    result = run(engine, tmp_path, "train", "--label", "/data/label.txt", "--train", "/data/valid/segm.json",
                 "--test", "/data/test/segm.json", "--output_weights", "/out/strawberry.pth",
                 "--model", "/configs/tiny_mask_rcnn.py", "--pretrained", "none", "--epoch", "1",
                 "--image_size", "256", "192", "--batch_size", "2", "--num_workers", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    for name in ("strawberry.pth", "strawberry.py", "strawberry.train_stats.train.txt", "strawberry.test_stats.json",
                 "strawberry.done.json"):
        assert (out / name).is_file(), name
    assert (out / "strawberry.pth").stat().st_uid == 12345

    result = run(engine, tmp_path, "inference", "--label", "/data/label.txt", "--data", "/data/test/images",
                 "--model_weights", "/out/strawberry.pth", "--output", "/out/predictions", "--score_threshold",
                 "0.0", "--num_workers", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-4000:]
    instances = json.loads((out / "predictions" / "instances.json").read_text())
    assert len(instances["images"]) == 10
    assert len([p for p in (out / "predictions").iterdir() if p.suffix == ".jpg"]) == 10


def test_a_user_error_in_the_container_is_exit_2(engine, image, tmp_path):
    result = run(engine, tmp_path, "validate", "--label", "/data/label.txt", "/data/nope.json")
    assert result.returncode == 2
    assert "/data/nope.json: file: file not found; check the path" in result.stderr
