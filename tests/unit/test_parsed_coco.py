"""mmdet's CocoDataset takes the COCO file train already parsed and validated instead of parsing it again."""

import json
import os
from unittest import mock

import pytest

from tests.conftest import SAMPLE

ANN = SAMPLE / "train" / "segm.json"
CLASSES = ("flower", "green_fruit", "red_fruit")


@pytest.fixture
def dataset():
    from mmdet.datasets import CocoDataset

    from cvtk_job import mmhooks

    original = CocoDataset.COCOAPI
    mmhooks.use_parsed_coco()

    def build(path):
        return _items(CocoDataset(ann_file=str(path), data_root=str(path.parent), data_prefix=dict(img=""),
                                  metainfo=dict(classes=CLASSES), pipeline=[], test_mode=False))
    yield build
    CocoDataset.COCOAPI = original


def _plain(path):
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.api_wrappers import COCO

    with mock.patch.object(CocoDataset, "COCOAPI", COCO):
        return _items(CocoDataset(ann_file=str(path), data_root=str(path.parent), data_prefix=dict(img=""),
                                  metainfo=dict(classes=CLASSES), pipeline=[], test_mode=False))


def _items(dataset):
    # The dataset serializes its list (data_list is emptied); get_data_info reads it back.
    return [dataset.get_data_info(i) for i in range(len(dataset))]


def test_the_parsed_file_gives_the_same_data_without_a_second_parse(dataset):
    from cvtk_job import coco

    expected = _plain(ANN)
    assert len(expected) == 60 and all(item["instances"] for item in expected)
    report = coco.validate_coco(str(ANN), check_images=False)
    coco.keep_parsed(str(ANN), report.data)
    with mock.patch("json.load", side_effect=AssertionError("parsed a second time")):
        assert dataset(ANN) == expected
    assert coco.take_parsed(str(ANN)) is None  # handed over once


def test_a_file_changed_since_it_was_parsed_is_read_again(dataset, tmp_path):
    from cvtk_job import coco

    path = tmp_path / "segm.json"
    data = json.loads(ANN.read_text())
    path.write_text(json.dumps(data))
    coco.keep_parsed(str(path), {"images": [], "annotations": [], "categories": []})  # stale content
    os.utime(path, ns=(1, 1))
    assert len(dataset(path)) == len({a["image_id"] for a in data["annotations"]})
