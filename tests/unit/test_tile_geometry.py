"""tiling: the grid, RLE from crops and the merge across seams, checked against full-image numpy masks and
pycocotools (never against the module's own helpers)."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from cvtk_job import tiling


@pytest.mark.parametrize("size,tile,overlap", [((1000, 700), (256, 256), 0.2), ((640, 480), (640, 640), 0.25),
                                               ((300, 200), (512, 512), 0.2), ((1001, 999), (100, 300), 0.5)])
def test_the_grid_covers_every_pixel_with_tiles_of_one_size_and_the_overlap_asked(size, tile, overlap):
    width, height = size
    tiles = tiling.grid(width, height, *tile, overlap)
    covered = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert len({(x1 - x0, y1 - y0) for x0, y0, x1, y1 in tiles}) == 1
    xs = sorted({x0 for x0, _, _, _ in tiles})
    tw = min(tile[0], width)
    for a, b in zip(xs, xs[1:], strict=False):
        assert a + tw - b >= int(tw * overlap) - 1  # neighbours overlap by (about) the fraction asked


def test_rle_of_a_crop_equals_pycocotools_on_the_full_mask():
    rng = np.random.default_rng(0)
    height, width = 97, 131
    for x0, y0, w, h in [(0, 0, 10, 7), (120, 90, 11, 7), (5, 3, 1, 1), (0, 0, 131, 97), (60, 40, 30, 20)]:
        crop = rng.random((h, w)) > 0.5
        crop[0, 0] = True
        crop[-1, -1] = True
        full = np.zeros((height, width), dtype=np.uint8)
        full[y0:y0 + h, x0:x0 + w] = crop
        expected = mask_utils.encode(np.asfortranarray(full))
        got = tiling.rle_of_crop(crop, x0, y0, height, width)
        assert got["counts"] == expected["counts"] and list(got["size"]) == [height, width]
    empty = tiling.rle_of_crop(np.zeros((3, 3), bool), 4, 4, height, width)
    assert mask_utils.area(empty) == 0


def _disk(height, width, cx, cy, r):
    yy, xx = np.mgrid[:height, :width]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _seen_by(full, tile, label, score):
    """What a perfect model returns on one tile: the object's part inside it, in tile coordinates."""
    x0, y0, x1, y1 = tile
    part = full[y0:y1, x0:x1]
    ys, xs = np.nonzero(part)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return {"scores": torch.tensor([score]), "labels": torch.tensor([label]),
            "bboxes": torch.tensor([box], dtype=torch.float32), "masks": torch.from_numpy(part[None])}


def test_an_object_across_a_seam_comes_out_once_with_its_whole_mask():
    height, width = 200, 400
    obj = _disk(height, width, 200, 100, 40)  # centred on the seam between the two tiles' middles
    tiles = [(0, 0, 230, 200), (170, 0, 400, 200)]  # overlap 60 px: neither tile sees all of the disk
    found = []
    for tile, score in zip(tiles, (0.9, 0.8), strict=True):
        found += tiling.pieces(_seen_by(obj, tile, 1, score), tile[0], tile[1], tile, 0.05, True)
    assert len(found) == 2
    merged = tiling.merge(found)
    assert len(merged) == 1
    det = tiling.detection(merged[0], height, width)
    decoded = mask_utils.decode({"size": det["segmentation"]["size"], "counts": det["segmentation"]["counts"]})
    assert np.array_equal(decoded.astype(bool), obj)
    assert det["area"] == obj.sum() and det["score"] == pytest.approx(0.9) and det["label"] == 1
    ys, xs = np.nonzero(obj)
    assert det["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_neighbours_of_one_class_and_overlapping_objects_of_two_classes_stay_apart():
    height, width = 200, 400
    left, right = _disk(height, width, 185, 100, 20), _disk(height, width, 226, 100, 20)  # 1 px apart
    tiles = [(0, 0, 230, 200), (170, 0, 400, 200)]
    found = []
    for tile in tiles:
        for obj, score in ((left, 0.9), (right, 0.7)):
            if obj[tile[1]:tile[3], tile[0]:tile[2]].any():
                found += tiling.pieces(_seen_by(obj, tile, 0, score), tile[0], tile[1], tile, 0.05, True)
    merged = tiling.merge(found)
    assert len(merged) == 2
    masks = sorted((tiling.detection(p, height, width) for p in merged), key=lambda d: d["bbox"][0])
    for det, obj in zip(masks, (left, right), strict=True):
        assert np.array_equal(mask_utils.decode(det["segmentation"] | {"counts": det["segmentation"]["counts"]})
                              .astype(bool), obj)
    # The same pixels, two classes: two objects.
    tile = (0, 0, 400, 200)
    two = tiling.pieces(_seen_by(left, tile, 0, 0.9), 0, 0, tile, 0.05, True) + \
        tiling.pieces(_seen_by(left, tile, 1, 0.8), 0, 0, tile, 0.05, True)
    assert len(tiling.merge(two)) == 2


def test_a_whole_image_pass_at_half_resolution_merges_with_the_tiles_that_saw_the_object():
    height, width = 400, 400
    obj = _disk(height, width, 200, 200, 120)  # larger than a tile
    small = obj[::2, ::2]  # what the model sees on the image downscaled by 2
    ys, xs = np.nonzero(small)
    pred = {"scores": torch.tensor([0.95]), "labels": torch.tensor([0]),
            "bboxes": torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32),
            "masks": torch.from_numpy(small[None])}
    found = tiling.pieces(pred, 0, 0, (0, 0, width, height), 0.05, True, scale=2.0)
    for tile in tiling.grid(width, height, 160, 160, 0.25):
        if obj[tile[1]:tile[3], tile[0]:tile[2]].any():
            found += tiling.pieces(_seen_by(obj, tile, 0, 0.6), tile[0], tile[1], tile, 0.05, True)
    merged = tiling.merge(found)
    assert len(merged) == 1
    det = tiling.detection(merged[0], height, width)
    decoded = mask_utils.decode(det["segmentation"] | {"counts": det["segmentation"]["counts"]}).astype(bool)
    assert (decoded & obj).sum() / (decoded | obj).sum() > 0.97 and det["score"] == pytest.approx(0.95)


def test_box_only_pieces_match_by_their_boxes_where_both_tiles_looked():
    tiles = [(0, 0, 230, 200), (170, 0, 400, 200)]
    # One box 160..240 cut by both tiles' borders: each tile reports its part.
    a = {"scores": torch.tensor([0.9]), "labels": torch.tensor([2]), "bboxes": torch.tensor([[160., 50, 230, 90]])}
    b = {"scores": torch.tensor([0.8]), "labels": torch.tensor([2]), "bboxes": torch.tensor([[0., 50, 70, 90]])}
    found = tiling.pieces(a, 0, 0, tiles[0], 0.05, False) + tiling.pieces(b, 170, 0, tiles[1], 0.05, False)
    merged = tiling.merge(found)
    assert len(merged) == 1 and list(merged[0].box) == [160, 50, 240, 90]


def test_a_polygon_clipped_to_a_tile_rasterizes_to_the_full_mask_cropped():
    """Clipping is exact: the clipped polygon, rasterized in the tile, equals the whole polygon rasterized in
    the image and cropped to the tile (pycocotools both ways), for convex and concave polygons."""
    height, width = 120, 160
    polygons = [[10, 10, 150, 20, 140, 110, 20, 100],  # convex, crossing every tile border
                [30, 10, 130, 10, 130, 110, 80, 40, 30, 110]]  # concave (a notch from below)
    for poly in polygons:
        full = mask_utils.decode(mask_utils.frPyObjects([poly], height, width))[:, :, 0]
        for x0, y0, x1, y1 in tiling.grid(width, height, 64, 48, 0.2):
            clipped = tiling.clip_polygon(poly, x0, y0, x1, y1)
            expected = full[y0:y1, x0:x1]
            if not clipped:
                assert expected.sum() <= 2 * (x1 - x0)  # at most a border row of the rasterizer
                continue
            local = [v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(clipped)]
            got = mask_utils.decode(mask_utils.frPyObjects([local], y1 - y0, x1 - x0))[:, :, 0]
            assert np.count_nonzero(got != expected) <= 2 * ((x1 - x0) + (y1 - y0)), (x0, y0)


def test_a_dataset_cut_into_tiles_keeps_every_object_in_the_tiles_that_hold_most_of_it(tmp_path):
    import cv2

    image = np.zeros((200, 300, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    square = [100, 80, 140, 80, 140, 120, 100, 120]  # 40x40, across the seam of the 160-wide tiles
    sliver = [0, 0, 300, 0, 300, 3, 0, 3]  # a thin strip along the top
    data = {"images": [{"id": 7, "file_name": "a.png", "width": 300, "height": 200}],
            "categories": [{"id": 0, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 0, "bbox": [100, 80, 40, 40], "area": 1600,
                             "segmentation": [square], "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 0, "bbox": [0, 0, 300, 3], "area": 900,
                             "segmentation": [sliver], "iscrowd": 0}]}
    out = tiling.cut_coco(data, str(tmp_path), str(tmp_path / "tiles"), 160, 200, 0.1, with_mask=True)
    tiles = {img["id"]: img for img in out["images"]}
    assert [(t["file_name"], t["width"], t["height"]) for t in out["images"]] == \
        [("a.x0_y0.png", 160, 200), ("a.x140_y0.png", 160, 200)]
    for img in out["images"]:
        assert cv2.imread(str(tmp_path / "tiles" / img["file_name"])).shape == (200, 160, 3)
    by_tile = {}
    for ann in out["annotations"]:
        by_tile.setdefault(tiles[ann["image_id"]]["file_name"], []).append(ann)
    # The square: 40 px wide at x 100-140; tile 1 (x 0-160) holds all of it, tile 2 (x 140-300) none.
    first = [a for a in by_tile["a.x0_y0.png"] if a["bbox"][3] > 10]
    assert len(first) == 1 and first[0]["bbox"] == [100, 80, 40, 40] and first[0]["area"] == 1600
    assert not [a for a in by_tile.get("a.x140_y0.png", []) if a["bbox"][3] > 10]
    # The strip: 900 px in all, 480 px in each tile = more than a quarter of it: kept in both, clipped.
    strips = [a for a in out["annotations"] if a["bbox"][3] <= 10]
    assert sorted(a["bbox"][2] for a in strips) == [160, 160] and all(a["area"] == 480 for a in strips)


def test_tile_auto_sizes_the_tile_from_the_mean_object_area_and_the_overlap_from_the_longest_side():
    """The rule written out by hand: 0.03 x tile area = mean object area, rounded up to a multiple of 32;
    overlap = the 99th percentile of the longest box sides / tile."""
    boxes = [[0, 0, 100, 100]] * 99 + [[0, 0, 130, 70]]  # areas 10,000 x 99 and 9,100 (no "area": the box)
    data = {"images": [{"id": 1, "width": 4000, "height": 3000}],
            "annotations": [{"bbox": b, "area": 10000.0} for b in boxes[:-1]] + [{"bbox": boxes[-1]}]}
    auto = tiling.auto_tile(data)
    mean_area = (99 * 10000 + 130 * 70) / 100
    assert auto.mean_area == pytest.approx(mean_area)
    assert auto.size == 608  # sqrt(9991 / 0.03) = 577.1 -> 19 x 32
    longest = np.percentile([100] * 99 + [130], 99)  # 100.3
    assert auto.overlap == pytest.approx(round(longest / 608, 2))
    assert tiling.auto_tile(data, overlap=0.3).overlap == 0.3  # the user's overlap stays
    # Objects large for their images: the tile is the whole image (its longest side), the overlap at most 0.8.
    big = {"images": [{"id": 1, "width": 300, "height": 200}], "annotations": [{"bbox": [0, 0, 290, 190]}]}
    assert (tiling.auto_tile(big).size, tiling.auto_tile(big).overlap) == (300, 0.8)
    assert tiling.auto_tile({"images": data["images"], "annotations": []}) is None


@pytest.mark.parametrize("words,expected", [(None, None), (["auto"], "auto"), (["640", "480"], (640, 480))])
def test_tile_words_parse(words, expected):
    assert tiling.parse_tile(words) == expected


@pytest.mark.parametrize("words", [["8", "8"], ["640"], ["auto", "640"], ["640", "x"], ["-640", "640"]])
def test_a_bad_tile_is_one_line_naming_the_flag(words):
    from cvtk_job.errors import UserError

    with pytest.raises(UserError, match=r"^--tile "):
        tiling.parse_tile(words)
