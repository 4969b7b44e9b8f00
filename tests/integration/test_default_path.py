"""The tutorial's command with its defaults: `--pretrained auto` and the default R101 models.

No network here, so the test makes what a connected machine would download: the default architecture
with random weights and mmdet's 80 COCO classes, saved under the file name mmdet's model index gives,
where `--pretrained auto` looks (the cache, or the folder baked into an image). A guard (sitecustomize)
records and refuses every network connection and any torchvision import in the run and its workers:
the ImageNet backbone init must not run when a checkpoint supplies every weight.
"""

import os
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli, sample_copy

pytestmark = pytest.mark.slow

DEFAULTS = {"segm": ("mask_rcnn", "mask-rcnn_r101_fpn_1x_coco"), "det": ("faster_rcnn", "faster-rcnn_r101_fpn_1x_coco")}
# Speed options only: the tutorial's command otherwise.
SPEED = ["--epoch", "1", "--image_size", "160", "128", "--batch_size", "2"]

GUARD = textwrap.dedent('''
    """Test guard: record and refuse network connections and torchvision imports (see test_default_path)."""
    import importlib.abc
    import os
    import socket
    import sys

    _LOG = os.environ["CVTK_TEST_GUARD_LOG"]


    def _record(what):
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {what}\\n")


    def _importer():
        frame = sys._getframe(2)
        while frame and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
        return frame.f_code.co_filename if frame else "?"


    class _NoTorchvision(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchvision":
                where = _importer()
                # MMEngine's Runner reports the installed packages (collect_env tries `import torchvision`
                # and skips it when absent): a version probe for the log, not initialisation.
                if not where.replace(os.sep, "/").endswith("mmengine/utils/dl_utils/collect_env.py"):
                    _record(f"import {name} from {where}")
                raise ModuleNotFoundError(f"test guard: no module named {name!r} here", name=name)
            return None


    sys.meta_path.insert(0, _NoTorchvision())
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


    def _refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _record(f"connect {address!r}")
            raise OSError("test guard: no network connections here")


    def connect(self, address):
        _refuse(self, address)
        return _connect(self, address)


    def connect_ex(self, address):
        _refuse(self, address)
        return _connect_ex(self, address)


    def getaddrinfo(host, *args, **kwargs):
        _record(f"getaddrinfo {host!r}")
        raise socket.gaierror("test guard: no name lookups here")


    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
''')


def checkpoint_name(folder, model):
    """The checkpoint file name in mmdet's model index (read here, not through cvtk-job)."""
    import mmdet

    metafile = Path(mmdet.__file__).parent / ".mim" / "configs" / folder / "metafile.yml"
    for entry in yaml.safe_load(metafile.read_text())["Models"]:
        if entry["Name"] == model:
            return os.path.basename(urllib.parse.urlparse(entry["Weights"]).path)
    raise AssertionError(f"{model} not in {metafile}")


def make_coco_checkpoint(folder, model, path):
    """The default architecture as mmdet's COCO checkpoints hold it: 80 classes, random weights."""
    import mmdet
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(Path(mmdet.__file__).parent / ".mim" / "configs" / folder / f"{model}.py")
    torch.manual_seed(1)
    net = MODELS.build(cfg.model)  # no init_weights(): nothing is downloaded
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"mmdet_version": "2.0.0", "epoch": 12, "CLASSES": tuple(f"class{i}" for i in range(80))},
                "state_dict": net.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_copy(tmp_path_factory.mktemp("default_path"), {"train": 4, "valid": 2, "test": 2})


@pytest.fixture(scope="module")
def coco_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_checkpoints")
    return {task: make_coco_checkpoint(folder, model, root / checkpoint_name(folder, model))
            for task, (folder, model) in DEFAULTS.items()}


@pytest.fixture
def guard(tmp_path):
    folder = tmp_path / "guard"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "guard.log"
    log.write_text("")
    env = {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO)]), "CVTK_TEST_GUARD_LOG": str(log)}
    return env, log


def test_the_guard_catches_network_and_torchvision(guard):
    env, log = guard
    code = ("import socket, urllib.request\n"
            "try:\n    import torchvision\nexcept ImportError:\n    pass\n"
            "try:\n    socket.socket().connect(('127.0.0.1', 9))\nexcept OSError:\n    pass\n"
            "try:\n    urllib.request.urlopen('https://download.openmmlab.com/x.pth')\nexcept OSError:\n    pass\n")
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), check=True)
    assert "import torchvision" in log.read_text()
    assert "connect ('127.0.0.1', 9)" in log.read_text()
    assert "getaddrinfo 'download.openmmlab.com'" in log.read_text()


def tutorial_command(data, out, task):
    kind = "segm" if task == "segm" else "bbox"
    args = ["train", "--label", data / "label.txt", "--train", data / "train" / f"{kind}.json",
            "--valid", data / "valid" / f"{kind}.json", "--test", data / "test" / f"{kind}.json",
            "--output_weights", out / "strawberry.pth"]
    return args + (["--task", "det"] if task == "det" else [])


def assert_trained_from(out, checkpoint, task, result, log):
    import torch

    assert result.returncode == 0, result.stderr[-4000:]
    assert log.read_text() == "", f"network or torchvision during the run:\n{log.read_text()}"
    names = ["strawberry.pth", "strawberry.py", "strawberry.train_stats.train.txt", "strawberry.train_stats.train.png",
             "strawberry.train_stats.valid.txt", "strawberry.train_stats.valid.png", "strawberry.test_stats.json",
             "strawberry/test_outputs.coco.json", "strawberry.report.html", "strawberry.done.json"]
    missing = [n for n in names if not (out / n).is_file()]
    assert not missing, missing
    assert not (out / "strawberry.failed.json").exists()
    for name in ("strawberry.train_stats.train.txt", "strawberry.train_stats.valid.txt"):
        assert len((out / name).read_text().splitlines()) == 2  # a header and the one epoch's row

    # One line says which layers the 80-class checkpoint could not fill (the 3-class heads).
    lines = [line for line in result.stderr.splitlines() if f"pretrained {checkpoint.name}: loaded" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    heads = ["roi_head.bbox_head.fc_cls", "roi_head.bbox_head.fc_reg"]
    heads += ["roi_head.mask_head.conv_logits"] if task == "segm" else []
    assert all(head in lines[0] for head in heads), lines[0]
    assert "backbone" not in lines[0].split("left at random init")[-1], lines[0]

    # The checkpoint's weights were really used: the R101 configs freeze the stem (frozen_stages=1), so
    # after training it still holds exactly the checkpoint's values, which random init would not.
    start = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    trained = torch.load(out / "strawberry.pth", map_location="cpu", weights_only=True)["state_dict"]
    for key in ("backbone.conv1.weight", "backbone.layer1.0.conv1.weight"):
        assert torch.equal(trained[key], start[key]), key
    assert trained["roi_head.bbox_head.fc_cls.weight"].shape[0] == 4  # 3 classes + background


@pytest.mark.parametrize("task, where", [("segm", "cache"), ("det", "baked")])
def test_pretrained_auto_uses_the_cached_or_baked_coco_checkpoint_offline(data, coco_checkpoints, guard, tmp_path,
                                                                        task, where):
    env, log = guard
    checkpoint = coco_checkpoints[task]
    cache = tmp_path / "cache"
    if where == "cache":
        (cache / "checkpoints").mkdir(parents=True)
        os.link(checkpoint, cache / "checkpoints" / checkpoint.name)
    else:
        baked = tmp_path / "baked"
        baked.mkdir()
        os.link(checkpoint, baked / checkpoint.name)
        env = dict(env, CVTK_JOB_PRETRAINED_DIR=str(baked))
    out = tmp_path / "outputs"
    result = run_cli(*tutorial_command(data, out, task), *SPEED, env=dict(env, CVTK_JOB_CACHE=str(cache)))
    assert_trained_from(out, checkpoint, task, result, log)
    if where == "cache":
        assert sorted(os.listdir(cache / "checkpoints")) == [checkpoint.name]  # nothing else fetched


def test_pretrained_path_with_the_default_model(data, coco_checkpoints, guard, tmp_path):
    env, log = guard
    out = tmp_path / "outputs"
    result = run_cli(*tutorial_command(data, out, "segm"), *SPEED, "--pretrained", coco_checkpoints["segm"],
                     env=dict(env, CVTK_JOB_CACHE=str(tmp_path / "empty-cache")))
    assert_trained_from(out, coco_checkpoints["segm"], "segm", result, log)
    assert not (tmp_path / "empty-cache" / "checkpoints").exists()
