import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# `make setup` installs without byte-compiling (that alone took ~20 s of a ~65 s set-up); let the test
# processes write the bytecode on first import instead, even where the environment disables it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "strawberry"
DATA = Path(__file__).resolve().parent / "data"
# What a run of the slow tests writes at its peak (weights, checkpoints, a SeaweedFS volume, a Docker
# build), measured ~15 GB under the temporary folder plus the image build.
FULL_RUN_FREE_GIB = 20


def pytest_report_header(config):
    return f"free disk under {tempfile.gettempdir()}: {shutil.disk_usage(tempfile.gettempdir()).free / 1024**3:.1f} GiB"


def pytest_collection_finish(session):
    """A full run on a nearly full disk fails minutes in with hundreds of unrelated-looking errors
    (MMEngine cannot make its temporary folder); say it once, before anything runs."""
    if not any(item.get_closest_marker("slow") for item in session.items):
        return
    free = shutil.disk_usage(tempfile.gettempdir()).free / 1024**3
    if free < FULL_RUN_FREE_GIB:
        pytest.exit(f"only {free:.1f} GiB free under {tempfile.gettempdir()}; the slow tests need about "
                    f"{FULL_RUN_FREE_GIB} GiB: free space (old pytest-of-* folders there) or run -m 'not slow'",
                    returncode=3)


def run_cli(*args, cwd=None, env=None, timeout=900):
    """Run the real CLI in a subprocess, as a user would; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "entrypoint.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def make_subset(src_json, dst_json, n_images):
    """Copy the first n images of a sample split (and their annotations) into a new folder."""
    import json
    import shutil

    with open(src_json) as fh:
        data = json.load(fh)
    images = data["images"][:n_images]
    keep = {img["id"] for img in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    dst_json = Path(dst_json)
    (dst_json.parent / "images").mkdir(parents=True, exist_ok=True)
    for img in images:
        shutil.copy(Path(src_json).parent / img["file_name"], dst_json.parent / img["file_name"])
    dst_json.write_text(json.dumps(data))
    return dst_json


def sample_copy(root, sizes):
    """A copy of the sample with the first n images of each split (both segm and bbox files)."""
    import shutil

    shutil.copy(SAMPLE / "label.txt", root / "label.txt")
    for split, n in sizes.items():
        for kind in ("segm", "bbox"):
            make_subset(SAMPLE / split / f"{kind}.json", root / split / f"{kind}.json", n)
    return root


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """16 train, 5 valid, 5 test images, in the tutorial's layout."""
    return sample_copy(tmp_path_factory.mktemp("strawberry"), {"train": 16, "valid": 5, "test": 5})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """8 train, 3 valid, 3 test images, for tests that train several times."""
    return sample_copy(tmp_path_factory.mktemp("strawberry_tiny"), {"train": 8, "valid": 3, "test": 3})


TINY_MODELS = {"segm": REPO / "examples" / "configs" / "tiny_mask_rcnn.py",
               "det": REPO / "examples" / "configs" / "tiny_faster_rcnn.py"}
# Speed options only: tiny model, small images, random init, CPU.
SPEED = ["--pretrained", "none", "--batch_size", "4", "--num_workers", "2", "--image_size", "256", "192",
         "--device", "cpu"]


@pytest.fixture(scope="session")
def trained_segm(small_data, tmp_path_factory):
    """A tiny Mask R-CNN trained for one epoch on the small sample, with its test outputs."""
    out = tmp_path_factory.mktemp("trained") / "strawberry.pth"
    result = run_cli("train", "--label", small_data / "label.txt", "--train", small_data / "train" / "segm.json",
                     "--test", small_data / "test" / "segm.json", "--output_weights", out,
                     "--model", TINY_MODELS["segm"], "--epoch", "1", *SPEED)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session, stopped by PID at the end."""
    from tests.s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-node Slurm on 127.0.0.1 for the session (installed from Debian if missing)."""
    from tests.slurmcluster import SlurmCluster

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory):
    """A tiny Mask R-CNN that really detects: trained (~1 min on 2 cores) on 32 synthetic 256x256 images of
    squares and disks (tests/synthetic.py), radius 8-14 px. Returns (label file, weights)."""
    from tests import synthetic

    root = tmp_path_factory.mktemp("shapes")
    train = synthetic.write(root / "train", 32, (256, 256), 8, (8, 14), seed=1)
    label = root / "label.txt"
    label.write_text("\n".join(synthetic.CLASSES) + "\n")
    out = root / "model" / "shapes.pth"
    result = run_cli("train", "--label", label, "--train", train, "--output_weights", out, "--model",
                     TINY_MODELS["segm"], "--pretrained", "none", "--epoch", "6", "--batch_size", "4",
                     "--num_workers", "1", "--image_size", "256", "256", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    return label, out
