"""cvtk_job/losses.py: mmdet's L1 and sigmoid cross-entropy losses and gradients, bit-equal, without host reads.

Cases as the RPN makes them per FPN level (labels 0 = object, 1 = background, -1 = ignored; weights 0/1; levels
with no positive anchor) and beyond (reduction overrides, several classes, an ignore_index, no weight). Host
reads are counted by bench/step_syncs.py's instrument (the `make bench` row's)."""

import sys
from pathlib import Path

import pytest
import torch
from mmdet.models.losses import CrossEntropyLoss, L1Loss

from cvtk_job.losses import CvtkCrossEntropyLoss, CvtkL1Loss

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_syncs  # noqa: E402


def run(loss, pred, *args, **kwargs):
    """(loss value, gradient of pred, host reads)."""
    leaf = pred.detach().clone().requires_grad_()
    with step_syncs.Counter() as counter:
        value = loss(leaf, *args, **kwargs)
    value.backward(torch.linspace(0.5, 2, value.numel()).view_as(value) if value.dim() else None)
    return value.detach(), leaf.grad, counter.total


def assert_same(ours, mmdets):
    (a, grad_a, reads_a), (b, grad_b, reads_b) = ours, mmdets
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (a, b)
    assert torch.equal(grad_a, grad_b)
    assert reads_a == 0
    return reads_b


def box_case(n, positives, seed, weight_dims=2):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    weight = torch.zeros(n, 4)
    weight[torch.randperm(n, generator=g)[:positives]] = 1.0
    return pred, target, weight if weight_dims == 2 else weight[:, 0]


@pytest.mark.parametrize("positives", [0, 1, 37])
@pytest.mark.parametrize("kwargs", [{}, {"avg_factor": 256}, {"avg_factor": 0}, {"reduction_override": "sum"}])
def test_l1_is_mmdets_loss_without_a_host_read(positives, kwargs):
    settings = {"loss_weight": 2.0}
    for seed in range(2):
        pred, target, weight = box_case(300, positives, seed)
        reads = assert_same(run(CvtkL1Loss(**settings), pred, target, weight, **kwargs),
                            run(L1Loss(**settings), pred, target, weight, **kwargs))
        assert reads == 1  # mmdet's `torch.any(weight > 0)`


@pytest.mark.parametrize("positives", [0, 5])
def test_l1_with_a_weight_per_row_and_without_weights(positives):
    pred, target, weight = box_case(50, positives, 0, weight_dims=1)
    if positives:  # mmdet broadcasts a per-row weight only in its early return; otherwise it cannot
        with pytest.raises(RuntimeError):
            L1Loss()(pred, target, weight)
    else:
        assert_same(run(CvtkL1Loss(), pred, target, weight), run(L1Loss(), pred, target, weight))
    assert_same(run(CvtkL1Loss(), pred, target), run(L1Loss(), pred, target))


@pytest.mark.parametrize("positives", [0, 5])
def test_l1_per_element_or_of_nothing_is_mmdets_forward(positives):
    """Where mmdet's early return is more than a shortcut (one sum for a per-element loss; 0 where a mean of
    nothing is nan) its forward runs, host read included; the RPN and the box head ask for neither."""
    pred, target, weight = box_case(50, positives, 0)
    empty = torch.zeros(0, 4)
    for args, kwargs in (((pred, target, weight), {"reduction_override": "none"}), ((empty, empty, empty), {})):
        ours, mmdets = run(CvtkL1Loss(), *args, **kwargs), run(L1Loss(), *args, **kwargs)
        assert torch.equal(ours[0], mmdets[0]) and torch.equal(ours[1], mmdets[1]) and ours[2] == mmdets[2] == 1


def label_case(n, channels, seed, ignore_index=None, weights=True):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, channels, generator=g)
    labels = torch.randint(-1, channels + 1, (n,), generator=g)  # -1: ignored; channels: the background
    if ignore_index is not None:
        labels[::7] = ignore_index
    weight = (torch.rand(n, generator=g) > 0.3).float() if weights else None
    return pred, labels, weight


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", ["rpn", "no weights", "ignore_index 255", "sum", "avg_factor", "no positives",
                                  "class_weight"])
def test_sigmoid_cross_entropy_is_mmdets_without_a_host_read(channels, case):
    settings = {"use_sigmoid": True, "loss_weight": 1.5}
    ignore = 255 if case == "ignore_index 255" else None
    if ignore is not None:
        settings["ignore_index"] = ignore
    if case == "class_weight":
        settings["class_weight"] = [0.5 + i for i in range(channels)]
    kwargs = {"sum": {"reduction_override": "sum"}, "avg_factor": {"avg_factor": 37.0}}.get(case, {})
    for seed in range(3):
        pred, labels, weight = label_case(400, channels, seed, ignore, weights=case != "no weights")
        if case == "no positives":
            labels = torch.where(labels >= 0, channels, labels)
        reads = assert_same(run(CvtkCrossEntropyLoss(**settings), pred, labels, weight, **kwargs),
                            run(CrossEntropyLoss(**settings), pred, labels, weight, **kwargs))
        assert reads == 1  # mmdet's nonzero of the rows to one-hot


def test_the_paths_that_keep_mmdets_binary_cross_entropy():
    """An ignore_index of 0 or 1 (one-hot 0/1 labels would read as ignored) and avg_non_ignore (mmdet counts the
    valid labels on the host): mmdet's own path, the same results and reads; softmax and mask losses untouched."""
    pred, labels, weight = label_case(100, 2, 0)
    for settings in ({"use_sigmoid": True, "ignore_index": 1}, {"use_sigmoid": True, "ignore_index": 0},
                     {"use_sigmoid": True, "avg_non_ignore": True}):
        ours, mmdets = (run(cls(**settings), pred, labels, weight) for cls in (CvtkCrossEntropyLoss, CrossEntropyLoss))
        assert torch.equal(ours[0], mmdets[0]) and torch.equal(ours[1], mmdets[1]) and ours[2] == mmdets[2] >= 1
    assert CvtkCrossEntropyLoss().cls_criterion is CrossEntropyLoss().cls_criterion
    assert CvtkCrossEntropyLoss(use_mask=True).cls_criterion is CrossEntropyLoss(use_mask=True).cls_criterion
