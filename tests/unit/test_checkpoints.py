"""Checkpoint loading under torch's weights_only: mmengine's own files load, code execution does not."""

import io
import pickle

import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub

from cvtk_job import checkpoints


def test_mmengine_message_hub_state_round_trips():
    checkpoints.allow_mmengine_checkpoints()
    hub = MessageHub.get_instance("cvtk-test")
    hub.update_scalar("train/loss", 1.5)
    buf = io.BytesIO()
    torch.save({"message_hub": hub.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, map_location="cpu")  # weights_only=True by default
    assert loaded["message_hub"]["log_scalars"]["train/loss"].current() == 1.5


class _Gadget:
    """A pickle that reaches a function through getattr, as an attacker's file would."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, "__init__")


def test_getattr_outside_history_buffer_statistics_is_refused():
    checkpoints.allow_mmengine_checkpoints()
    buf = io.BytesIO()
    torch.save({"x": _Gadget()}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
        torch.load(buf, map_location="cpu")


def test_weights_file_with_code_is_a_user_error(tmp_path):
    from cvtk_job.errors import UserError

    path = tmp_path / "evil.pth"
    torch.save({"x": _Gadget()}, path)
    with pytest.raises(UserError, match="not a plain weights file"):
        checkpoints.load_weights(str(path))
