"""predictions: images reach instances.json in input order; a distributed run's parts merge into one file."""

import json
import random

from cvtk_job import predictions

CATEGORIES = [{"id": 7, "name": "flower"}, {"id": 9, "name": "fruit"}]


class Recorder:
    def __init__(self):
        self.added = []

    def add(self, image_id, *rest):
        self.added.append(image_id)


def test_images_batched_out_of_order_are_written_in_input_order():
    positions = list(range(0, 40, 2))  # rank 0 of 2
    arrival = positions[:]
    rng = random.Random(0)
    for start in range(0, len(arrival), 6):  # batching by size shuffles within a window
        window = arrival[start:start + 6]
        rng.shuffle(window)
        arrival[start:start + 6] = window
    recorder = Recorder()
    in_order = predictions.InputOrder(recorder, positions)
    for position in arrival:
        if position == 10:
            in_order.skip(position)  # an unreadable image
        else:
            in_order.add(position, position + 1, f"{position}.jpg", 8, 8, [])
    assert recorder.added == [p + 1 for p in positions if p != 10]


def _detection(label, score):
    return {"label": label, "score": score, "bbox": [1.0, 1.0, 2.0, 2.0], "area": 4.0}


def test_parts_merge_into_one_coco_file_in_input_order(tmp_path):
    parts = []
    for rank in range(3):
        part = tmp_path / f".instances.json.part{rank}"
        with predictions.PartWriter(str(part), CATEGORIES) as writer:
            for position in range(rank, 10, 3):
                writer.add(position + 1, f"{position}.jpg", 8, 8, [_detection(position % 2, 0.5)] * (position % 3))
        parts.append(str(part))
    out = tmp_path / "instances.json"
    predictions.merge_parts(parts, str(out), CATEGORIES)

    merged = json.loads(out.read_text())
    assert [img["id"] for img in merged["images"]] == list(range(1, 11))
    assert [a["id"] for a in merged["annotations"]] == list(range(1, len(merged["annotations"]) + 1))
    assert sorted(a["image_id"] for a in merged["annotations"]) == [p + 1 for p in range(10) for _ in range(p % 3)]
    assert {a["category_id"] for a in merged["annotations"]} == {7, 9}
    assert merged["categories"] == CATEGORIES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances.json"]  # parts removed, no temporaries


def test_a_failed_part_leaves_no_file(tmp_path):
    part = tmp_path / ".instances.json.part0"
    try:
        with predictions.PartWriter(str(part), CATEGORIES) as writer:
            writer.add(1, "a.jpg", 8, 8, [_detection(0, 0.9)])
            raise RuntimeError("killed mid-run")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
