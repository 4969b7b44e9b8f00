"""bench/step_syncs.Counter: each kind of host read of a tensor counted once (the bench row's instrument)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_syncs  # noqa: E402


def test_each_host_read_counts_once_and_nothing_else_counts():
    x = torch.arange(6)
    with step_syncs.Counter() as counter:
        y = x * 2 + 1  # device work only
        _ = y[torch.tensor([0, 2])], y[1:3], y[0]  # indexing whose size is known without reading the data
        _ = y[y > 4]  # indexing by a mask: its output size is the data's
        _ = torch.nonzero(y > 2)
        y[y > 8] = 0  # a scalar fills by the mask without reading it (masked_fill_)
        y[y > 9] = y[:6][y > 9]  # values from the device: another mask read for each side
        _ = bool(y.sum() > 3)  # a scalar read
        _ = y.cpu().numpy()  # one copy to the host, not two
        _ = y.tolist()
        _ = torch.unique(y)
    assert sorted(kind for kind, _ in counter.sites.elements()) == \
        ["_local_scalar_dense", "_unique2", "cpu", "index (mask)", "index (mask)", "index_put_ (mask)",
         "nonzero", "tolist"]
    assert counter.total == 8
    # Left as it was: reads after the counter are not counted, and Tensor's methods are the originals again.
    _ = x.tolist()
    assert counter.total == 8 and torch.Tensor.tolist.__qualname__ == "TensorBase.tolist"
