"""resume: --resume auto|none|PATH, damaged checkpoints, and a run's state fetched back from S3."""

import pytest

from cvtk_job import artifacts, resume
from cvtk_job.errors import UserError


def workspace(tmp_path, epochs, damaged=()):
    import torch

    outputs = artifacts.TrainOutputs.from_weights(str(tmp_path / "strawberry.pth"))
    ws = tmp_path / "strawberry"
    ws.mkdir(exist_ok=True)
    for epoch in epochs:
        path = ws / f"epoch_{epoch}.pth"
        torch.save({"meta": {"epoch": epoch, "dataset_meta": {"classes": ["a"]}}, "optimizer": {},
                    "state_dict": {"roi_head.mask_head.conv.weight": torch.zeros(1)}}, path)
        if epoch in damaged:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if epochs:
        (ws / "last_checkpoint").write_text(str(ws / f"epoch_{max(epochs)}.pth"))
    return outputs, ws


def test_none_never_resumes_and_auto_without_a_workspace_starts_over(tmp_path):
    outputs, _ = workspace(tmp_path, [1])
    assert resume.resume_point("none", "segm", outputs, None, ["a"]) == (False, None)
    fresh = artifacts.TrainOutputs.from_weights(str(tmp_path / "other.pth"))
    assert resume.resume_point("auto", "segm", fresh, None, ["a"]) == (False, None)


def test_auto_continues_from_an_intact_latest_checkpoint(tmp_path):
    outputs, ws = workspace(tmp_path, [1, 2])
    assert resume.resume_point("auto", "segm", outputs, None, ["a"]) == (True, None)
    assert (ws / "last_checkpoint").read_text() == str(ws / "epoch_2.pth")


def test_a_damaged_latest_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    outputs, ws = workspace(tmp_path, [1, 2, 3], damaged=(3,))
    assert resume.resume_point("auto", "segm", outputs, None, ["a"]) == (True, None)
    assert (ws / "last_checkpoint").read_text() == str(ws / "epoch_2.pth")
    assert "is damaged; resuming from" in caplog.text


def test_nothing_intact_starts_over(tmp_path, caplog):
    outputs, _ = workspace(tmp_path, [1], damaged=(1,))
    assert resume.resume_point("auto", "segm", outputs, None, ["a"]) == (False, None)
    assert "no earlier one is intact; starting over" in caplog.text


def test_an_explicit_path_must_exist(tmp_path):
    outputs, _ = workspace(tmp_path, [])
    with pytest.raises(UserError, match="--resume nope.pth: checkpoint not found"):
        resume.resume_point("nope.pth", "segm", outputs, None, ["a"])


def test_auto_refuses_a_workspace_of_other_classes_or_another_task(tmp_path):
    outputs, _ = workspace(tmp_path, [1])
    with pytest.raises(UserError, match=r"was trained on classes \['a'\] but the label file lists \['b'\]"):
        resume.resume_point("auto", "segm", outputs, None, ["b"])
    with pytest.raises(UserError, match="is a mask model .task segm. but this run is --task det"):
        resume.resume_point("auto", "det", outputs, None, ["a"])
