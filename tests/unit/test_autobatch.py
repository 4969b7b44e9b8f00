"""autobatch.choose: the batch picked from measured peaks, against memory models whose answer is known."""

import collections

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


def test_the_probe_steps_the_densest_image_padded_to_the_largest_batch_mixed_orientations_make(tmp_path):
    """The densest image is a portrait photo, another one is landscape: resized to fit 256x192 with their aspect
    ratio kept they become 192x256 and 256x192 (W x H), and a batch holding both is padded to 256x256. The probe
    must step that size (stepping the portrait's own 192x256 measured a quarter less memory than a real batch can
    need), with the densest image's objects, and a real step must run on it."""
    import json

    from cvtk_job import mmconfig
    from cvtk_job.options import TrainOptions
    from tests import synthetic
    from tests.conftest import TINY_MODELS

    files = {(60, 80): synthetic.write(tmp_path, 1, (60, 80), 7, (3, 5), seed=1, name="portrait.json"),
             (80, 60): synthetic.write(tmp_path, 2, (80, 60), 2, (3, 5), seed=2, name="landscape.json")}
    merged = {"images": [], "annotations": [], "categories": json.loads(files[(60, 80)].read_text())["categories"]}
    for coco in (json.loads(path.read_text()) for path in files.values()):
        offset = len(merged["images"])
        merged["images"] += [{**image, "id": image["id"] + offset} for image in coco["images"]]
        merged["annotations"] += [{**a, "id": len(merged["annotations"]) + k + 1, "image_id": a["image_id"] + offset}
                                  for k, a in enumerate(coco["annotations"])]
    (tmp_path / "train.json").write_text(json.dumps(merged))
    densest = max(collections.Counter(a["image_id"] for a in merged["annotations"]).values())

    def fitted(width, height, long=256, short=192):  # keep-ratio resize into long x short, either orientation
        factor = min(long / max(width, height), short / min(width, height))
        return round(width * factor), round(height * factor)

    sizes = [fitted(image["width"], image["height"]) for image in merged["images"]]
    expected = (max(h for _, h in sizes), max(w for w, _ in sizes))
    assert expected == (256, 256)

    opts = TrainOptions(label="l.txt", train=str(tmp_path / "train.json"), output_weights=str(tmp_path / "x.pth"),
                        pretrained="none", task="segm", num_workers=0, model=str(TINY_MODELS["segm"]),
                        image_size=[256, 192])
    ctx = mmconfig.RunContext(classes=synthetic.CLASSES, data=mmconfig.DataFiles(str(tmp_path / "train.json")),
                              work_dir=str(tmp_path / "x"), output_prefix=str(tmp_path / "x"), num_train_images=3)
    cfg = mmconfig.build_config(opts, mmconfig.resolve_model(opts.model, "segm"), ctx)
    stepper = autobatch._Stepper(cfg, "cpu")
    assert stepper.objects == densest == 7
    assert tuple(stepper.sample["inputs"].shape[-2:]) == expected
    assert stepper(2)
