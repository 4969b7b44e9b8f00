"""autobatch.choose: the batch picked from measured peaks, against memory models whose answer is known."""

import pytest

from cvtk_job import autobatch

MIB = 2**20


def linear(fixed, per_image, free):
    calls = []

    def peak(batch):
        calls.append(batch)
        value = (fixed + batch * per_image) * MIB
        return value if value <= free * MIB else None
    return peak, calls


@pytest.mark.parametrize(("fixed", "per", "free", "limit"), [
    (2000, 900, 80000, 1000),  # an H100: (0.85 * 80000 - 2000) / 900 = 73.3 -> 73
    (2000, 900, 24000, 1000),  # 20.4 -> 20
    (1500, 3000, 11000, 1000),  # 2.6 -> 2
    (2000, 900, 80000, 16),  # a dataset of 16 images: no batch beyond it
])
def test_the_largest_batch_under_the_share_of_free_memory(fixed, per, free, limit):
    peak, calls = linear(fixed, per, free)
    batch, measured = autobatch.choose(peak, free * MIB, limit)
    largest = max(b for b in range(1, limit + 1) if fixed + b * per <= autobatch.SHARE * free)  # brute force
    assert batch == largest
    assert calls[:2] == [1, 2] and len(calls) <= 3  # two steps fix the line, one checks the prediction


def test_a_prediction_that_does_not_fit_is_stepped_down_by_real_steps():
    """Memory that grows faster than the line through 1 and 2 images (e.g. mask targets of many objects)."""
    budget = autobatch.SHARE * 40000 * MIB

    def peak(batch):
        value = (3000 + 1000 * batch + 40 * batch ** 2) * MIB
        return value if value <= 40000 * MIB else None
    batch, measured = autobatch.choose(peak, 40000 * MIB, 1000)
    assert batch == max(b for b in range(1, 1000) if peak(b) is not None and peak(b) <= budget)  # 22
    assert max(measured) > batch  # it tried the line's larger guess first


def test_when_one_image_does_not_fit_the_answer_is_one():
    peak, _ = linear(30000, 9000, 32000)
    assert autobatch.choose(peak, 32000 * MIB, 100)[0] == 1


def test_out_of_memory_at_two_means_one():
    assert autobatch.choose(lambda b: MIB if b == 1 else None, 1000 * MIB, 100)[0] == 1
