"""drawing and mask encoding: the fast paths give exactly what the plain full-image computation gives."""

import numpy as np
import pytest

from cvtk_job import drawing, predictions

torch = pytest.importorskip("torch")
H, W, N = 96, 128, 12


def _prediction():
    rng = np.random.default_rng(0)
    boxes, masks = [], np.zeros((N, H, W), bool)
    for i in range(N):
        x, y = int(rng.integers(0, W - 30)), int(rng.integers(0, H - 30))
        w, h = (int(v) for v in rng.integers(4, 30, 2))
        boxes.append([x + 0.3, y + 0.6, x + w - 0.2, y + h - 0.7])
        masks[i, y:y + h, x:x + w] = rng.random((h, w)) > 0.3  # ragged shapes, inside the box
    masks[1, :, :] = False  # an empty mask
    masks[2, 0, W - 1] = masks[2, H - 1, 0] = True  # stray pixels far outside the box: encoded whole
    masks[3, y:y + h, x + w - 1] = True  # touching the box's last column
    scores = torch.linspace(0.95, 0.05, N)
    return {"scores": scores, "bboxes": torch.tensor(boxes), "labels": torch.arange(N) % 3,
            "masks": torch.from_numpy(masks)}, masks


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_rles_equal_encoding_each_mask_directly(threshold):
    from pycocotools import mask as mask_utils

    pred, masks = _prediction()
    found = predictions.detections(pred, H, W, True, threshold)
    kept = [i for i in range(N) if float(pred["scores"][i]) >= threshold]
    assert len(found) == len(kept) > 0
    for det, i in zip(found, kept, strict=True):
        expected = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
        assert det["segmentation"]["counts"] == expected["counts"].decode("ascii")
        assert det["area"] == float(masks[i].sum())


def test_drawing_inside_the_boxes_equals_blending_the_whole_image():
    pred, masks = _prediction()
    found = predictions.detections(pred, H, W, True, 0.0)
    image = np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)
    fast = drawing.draw(image, found, ["a", "b", "c"], predictions.kept_masks(pred, np.arange(N)))

    plain = image.copy()
    for det, mask in zip(found, masks, strict=True):
        color = np.array(drawing.class_color(det["label"]), dtype=np.float32)
        plain[mask] = (plain[mask] * (1 - drawing.MASK_ALPHA) + color * drawing.MASK_ALPHA).astype(np.uint8)
    no_masks = drawing.draw(plain, found, ["a", "b", "c"])  # boxes and labels over the plain blend
    assert np.array_equal(fast, no_masks)
