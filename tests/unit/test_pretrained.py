"""--pretrained: none, a local file, and checkpoints baked into an image found without network."""

import pytest

from cvtk_job import mmconfig, pretrained
from cvtk_job.errors import StorageError, UserError


def test_auto_finds_a_baked_checkpoint_without_network(tmp_path, monkeypatch):
    config = mmconfig.resolve_model(None, "segm")
    name = mmconfig.checkpoint_url(config).rsplit("/", 1)[1]
    (tmp_path / name).write_bytes(b"baked")
    monkeypatch.setenv("CVTK_JOB_PRETRAINED_DIR", str(tmp_path))
    monkeypatch.setenv("CVTK_JOB_CACHE", str(tmp_path / "cache"))
    assert pretrained.resolve("auto", config) == str(tmp_path / name)


def test_none_and_paths(tmp_path):
    config = mmconfig.resolve_model(None, "det")
    assert pretrained.resolve("none", config) is None
    ckpt = tmp_path / "coco.pth"
    torch = pytest.importorskip("torch")
    torch.save({"state_dict": {}}, ckpt)
    assert pretrained.resolve(str(ckpt), config) == str(ckpt)
    with pytest.raises(UserError, match="--pretrained nope.pth: file not found"):
        pretrained.resolve("nope.pth", config)
    ckpt.write_bytes(b"x")  # a torn download or another format
    with pytest.raises(UserError, match="coco.pth: not a readable torch checkpoint"):
        pretrained.resolve(str(ckpt), config)


def test_a_failed_download_is_exit_3_with_the_offline_hint(tmp_path, monkeypatch):
    from tests.s3server import _free_ports

    monkeypatch.setenv("CVTK_JOB_CACHE", str(tmp_path))
    url = f"http://127.0.0.1:{_free_ports(1)[0]}/mask_rcnn.pth"  # nothing listens on loopback there
    with pytest.raises(StorageError, match="use --pretrained none for random init"):
        pretrained.resolve(url, mmconfig.resolve_model(None, "segm"))


def test_load_into_fills_what_fits_and_names_the_rest_in_one_line(tmp_path, caplog):
    import logging

    import torch

    torch.manual_seed(0)
    coco = torch.nn.ModuleDict({"backbone": torch.nn.Conv2d(3, 4, 3), "fc_cls": torch.nn.Linear(4, 81)})
    ours = torch.nn.ModuleDict({"backbone": torch.nn.Conv2d(3, 4, 3), "fc_cls": torch.nn.Linear(4, 4),
                                "extra": torch.nn.Linear(2, 2)})
    path = tmp_path / "coco.pth"
    torch.save({"meta": {"CLASSES": ("a",) * 80}, "state_dict": coco.state_dict()}, path)
    before = ours.fc_cls.weight.clone()
    with caplog.at_level(logging.INFO, logger="cvtk_job.pretrained"):
        pretrained.load_into(ours, str(path))
    assert torch.equal(ours.backbone.weight, coco.backbone.weight)
    assert torch.equal(ours.fc_cls.weight, before)
    lines = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert lines == ["pretrained coco.pth: loaded 2 of 6 tensors; left at random init: fc_cls (other shape in the "
                     "checkpoint); extra (not in the checkpoint)"]


def test_load_into_refuses_a_checkpoint_of_another_architecture(tmp_path):
    import torch

    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"x.weight": torch.zeros(2)}}, path)
    with pytest.raises(UserError, match="none of its 1 tensors fits this model"):
        pretrained.load_into(torch.nn.Linear(2, 2), str(path))


def test_a_presigned_url_never_reaches_logs_or_records():
    url = "https://bucket.s3.example.org/ckpt/model.pth?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeef"
    assert pretrained.shown(url) == "https://bucket.s3.example.org/ckpt/model.pth?…"
    assert pretrained.shown("https://download.openmmlab.com/a/b.pth") == "https://download.openmmlab.com/a/b.pth"


def test_a_failed_download_names_the_url_without_its_signature(tmp_path, monkeypatch):
    monkeypatch.setenv("CVTK_JOB_CACHE", str(tmp_path))
    from tests.s3server import _free_ports

    port = _free_ports(1)[0]  # nothing listens on loopback there
    url = f"http://127.0.0.1:{port}/model.pth?X-Amz-Signature=deadbeef"
    with pytest.raises(StorageError) as err:
        pretrained.resolve(url, mmconfig.resolve_model(None, "segm"))
    assert "deadbeef" not in str(err.value) and f"http://127.0.0.1:{port}/model.pth?…" in str(err.value)
