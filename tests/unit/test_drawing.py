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


def test_a_huge_image_is_drawn_scaled_down_with_its_masks_where_the_scaled_full_masks_lie():
    import cv2

    rng = np.random.default_rng(1)
    height, width = 300, 400
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    full = np.zeros((height, width), bool)
    full[100:180, 40:200] = True
    found = [{"label": 0, "score": 0.9, "bbox": [40.0, 100.0, 160.0, 80.0]}]
    crops = [(full[100:180, 40:200].copy(), 40, 100)]
    small, shown, scaled, factor = drawing.fit(image, found, crops, max_pixels=30000)
    assert small.shape[0] * small.shape[1] <= 30000 and factor == pytest.approx(0.5)
    assert shown[0]["bbox"] == pytest.approx([20, 50, 80, 40], abs=1)
    expected = cv2.resize(full.astype(np.uint8), (small.shape[1], small.shape[0]),
                          interpolation=cv2.INTER_NEAREST).astype(bool)
    mask, x0, y0 = scaled[0]
    placed = np.zeros_like(expected)
    placed[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = mask
    assert (placed ^ expected).sum() <= 2 * (mask.shape[0] + mask.shape[1])  # at most a pixel of border apart
    assert drawing.fit(image, found, crops, max_pixels=height * width) == (image, found, crops, 1.0)
