"""inference --tile end to end on CPU: the command's outputs, checked with pycocotools and numpy."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
LOW = ["--score_threshold", "0.05", "--device", "cpu", "--num_workers", "1"]


@pytest.fixture(scope="module")
def mosaic(small_data, tmp_path_factory):
    """A 1024x768 field photo made of the sample's test images side by side."""
    folder = tmp_path_factory.mktemp("mosaic")
    canvas = Image.new("RGB", (1024, 768))
    sources = sorted((small_data / "test" / "images").iterdir())
    for i, (x, y) in enumerate((x, y) for y in range(0, 768, 256) for x in range(0, 1024, 256)):
        with Image.open(sources[i % len(sources)]) as img:
            canvas.paste(img.convert("RGB").resize((256, 256)), (x, y))
    canvas.save(folder / "plot.jpg", quality=95)
    return folder


def tiled(small_data, weights, data, out, *extra):
    result = run_cli("inference", "--label", small_data / "label.txt", "--data", data, "--model_weights", weights,
                     "--output", out, "--tile", "256", "192", *LOW, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "instances.json") as fh:
        return json.load(fh), result.stderr


def test_tiled_predictions_are_whole_image_records_and_do_not_depend_on_the_batch_size(small_data, trained_segm,
                                                                                      mosaic, tmp_path):
    from pycocotools import mask as mask_utils

    one, log = tiled(small_data, trained_segm, mosaic, tmp_path / "b1", "--batch_size", "1")
    four, _ = tiled(small_data, trained_segm, mosaic, tmp_path / "b4", "--batch_size", "4")
    assert "tiles 256x192 overlapping 0.2 + the whole image" in log
    assert [i["file_name"] for i in one["images"]] == ["plot.jpg"]
    assert (one["images"][0]["width"], one["images"][0]["height"]) == (1024, 768)
    anns = one["annotations"]
    assert anns, "the one-epoch model finds something at score 0.05"
    for ann in anns:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 1024 + 1e-6 and y + h <= 768 + 1e-6
        assert ann["segmentation"]["size"] == [768, 1024]
        rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        assert ann["area"] == pytest.approx(float(mask_utils.area(rle)))
        ys, xs = np.nonzero(mask_utils.decode(rle))
        if len(xs):  # the mask lies inside its box
            assert xs.min() >= np.floor(x) - 1 and xs.max() <= np.ceil(x + w) + 1
    key = lambda a: (a["category_id"], round(a["score"], 4), [round(v, 2) for v in a["bbox"]])  # noqa: E731
    assert sorted(map(key, anns)) == sorted(map(key, four["annotations"]))
    assert (tmp_path / "b1" / "plot.jpg").is_file()
    with Image.open(tmp_path / "b1" / "plot.jpg") as drawn:
        assert drawn.size == (1024, 768)
    # Encoded and drawn in the main process (--num_workers 0) or in a worker: the same bytes.
    tiled(small_data, trained_segm, mosaic, tmp_path / "inline", "--batch_size", "1", "--num_workers", "0")
    for name in ("instances.json", "plot.jpg"):
        assert (tmp_path / "inline" / name).read_bytes() == (tmp_path / "b1" / name).read_bytes(), name


def test_a_bad_tile_is_one_line_and_nothing_is_written(small_data, trained_segm, mosaic, tmp_path):
    result = run_cli("inference", "--label", small_data / "label.txt", "--data", mosaic, "--model_weights",
                     trained_segm, "--output", tmp_path / "out", "--tile", "8", "8", *LOW)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith("--tile 8 8: a tile is at least 32 x 32 pixels (0 0: no tiles)"), last
    assert not (tmp_path / "out").exists()


def _ap50(gt_path, instances):
    """segm AP at IoU 0.5 by pycocotools, predictions matched to the ground truth by file name."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ids = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
        names = {img["id"]: img["file_name"] for img in instances["images"]}
        dets = [dict(a, image_id=ids[names[a["image_id"]]]) for a in instances["annotations"]]
        if not dets:
            return 0.0
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def test_tiles_find_the_small_objects_that_whole_image_inference_misses(shapes_model, tmp_path):
    """1024x1024 fields of 60 shapes (radius 8-14 px), a model trained on 256x256 images: on the whole field
    (resized to the model's 256x256) the shapes shrink to 2-3 px and are lost; on 256x256 tiles they are found
    at the scale they were learned. Asserted margin: tiled AP50 >= 0.6 and at least 0.5 above whole-image."""
    from tests import synthetic

    label, weights = shapes_model
    field = synthetic.write(tmp_path / "field", 2, (1024, 1024), 60, (8, 14), seed=3)
    args = ["inference", "--label", label, "--data", field, "--model_weights", weights, "--score_threshold", "0.3",
            "--device", "cpu", "--num_workers", "1", "--no_draw"]
    results = {}
    for name, extra in (("whole", []), ("tiled", ["--tile", "256", "256"])):
        result = run_cli(*args, "--output", tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / name / "instances.json") as fh:
            results[name] = _ap50(field, json.load(fh))
    assert results["tiled"] >= 0.6, results
    assert results["tiled"] - results["whole"] >= 0.5, results


def test_an_object_on_a_seam_comes_out_once_with_a_mask_covering_it(shapes_model, tmp_path):
    """480x256, tiles 256x256 overlapping 0.1: two tiles, x 0-256 and 224-480. One disk is centred on the
    first tile's right border, one square on the second tile's left border: each is cut by one tile and whole
    in the other, and must come out exactly once, its mask matching the drawn shape (IoU >= 0.7).

    Score threshold 0.4: below it this small model makes second guesses at an object inside one tile (a disk at
    0.661 and again 4 px lower at 0.339, whose masks overlap by less than the match IoU), which its own NMS lets
    through with or without tiles; they are not what this test is about."""
    from pycocotools import mask as mask_utils

    from tests import synthetic

    label, weights = shapes_model
    placed = [(1, 256, 128, 13), (0, 224, 60, 12)]
    field = synthetic.write(tmp_path / "seam", 1, (480, 256), 0, (8, 14), seed=5, placed=placed)
    result = run_cli("inference", "--label", label, "--data", field, "--model_weights", weights, "--output",
                     tmp_path / "out", "--tile", "256", "256", "--tile_overlap", "0.1", "--no_full_image",
                     "--score_threshold", "0.4", "--device", "cpu", "--num_workers", "1", "--no_draw")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "instances.json") as fh:
        found = json.load(fh)["annotations"]
    gt = json.loads(field.read_text())["annotations"]
    assert len(found) == 2, [(a["category_id"], a["bbox"], a["score"]) for a in found]
    for truth in gt:
        truth_rle = mask_utils.frPyObjects(truth["segmentation"], 256, 480)
        ious = [float(mask_utils.iou([{"size": a["segmentation"]["size"],
                                       "counts": a["segmentation"]["counts"].encode()}], truth_rle, [0])[0][0])
                for a in found if a["category_id"] == truth["category_id"]]
        assert len(ious) == 1 and ious[0] >= 0.7, (truth["bbox"], ious)


def test_train_on_tiles_then_inference_with_the_weights_defaults_gives_the_test_stats(shapes_model, tmp_path):
    """train --tile: the training images are cut into tiles (annotations clipped), the test step predicts on
    the whole test images tile by tile; inference with nothing but the weights tiles the same way, and
    evaluate of its output equals test_stats.json (same detections, same numbers)."""
    from tests import synthetic
    from tests.conftest import TINY_MODELS

    label, _ = shapes_model
    train = synthetic.write(tmp_path / "train", 4, (512, 512), 30, (8, 14), seed=11)
    test = synthetic.write(tmp_path / "test", 2, (512, 512), 30, (8, 14), seed=12)
    out = tmp_path / "model" / "tiles.pth"
    result = run_cli("train", "--label", label, "--train", train, "--test", test, "--output_weights", out,
                     "--model", TINY_MODELS["segm"], "--pretrained", "none", "--epoch", "4", "--batch_size", "4",
                     "--num_workers", "1", "--image_size", "256", "256", "--device", "cpu", "--tile", "256", "256",
                     env={"CVTK_JOB_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 4 images cut into 36 tiles of 256x256 (overlap 0.2)" in result.stderr
    pred = tmp_path / "pred"
    result = run_cli("inference", "--label", label, "--data", test, "--model_weights", out, "--output", pred,
                     "--score_threshold", "0", "--device", "cpu", "--num_workers", "1", "--no_draw")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiles 256x256 overlapping 0.2 + the whole image" in result.stderr
    result = run_cli("evaluate", "--gt", test, "--pred", pred / "instances.json", "--output", tmp_path / "e.json")
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((tmp_path / "model" / "tiles.test_stats.json").read_text())
    assert json.loads((tmp_path / "e.json").read_text()) == stats
    assert stats["stats"]["AP@[0.50|all|1000]"] > 0.2, stats["stats"]  # the comparison is of real detections
    tested = json.loads((tmp_path / "model" / "tiles" / "test_outputs.coco.json").read_text())["annotations"]
    predicted = json.loads((pred / "instances.json").read_text())["annotations"]
    key = lambda a: (a["category_id"], round(a["score"], 5), [round(v, 3) for v in a["bbox"]])  # noqa: E731
    assert sorted(map(key, tested)) == sorted(map(key, predicted))


def test_tile_auto_derives_the_tiles_from_the_training_annotations_and_says_so(shapes_model, tmp_path):
    """--tile auto (dry run: the decision, nothing trained): the tile side makes the mean object area 3% of a tile
    (rounded up to a multiple of 32), the overlap is the longest box side (99th percentile) over the tile; both
    computed here from the JSON with numpy, and the log line gives them."""
    from tests import synthetic
    from tests.conftest import TINY_MODELS

    label, _ = shapes_model
    train = synthetic.write(tmp_path / "train", 2, (1024, 768), 40, (10, 20), seed=21)
    anns = json.loads(train.read_text())["annotations"]
    mean_area = np.mean([a["area"] for a in anns])
    side = int(np.ceil(np.sqrt(mean_area / 0.03) / 32) * 32)
    overlap = round(float(np.clip(np.percentile([max(a["bbox"][2:]) for a in anns], 99) / side, 0.1, 0.8)), 2)
    result = run_cli("train", "--label", label, "--train", train, "--output_weights", tmp_path / "m" / "x.pth",
                     "--model", TINY_MODELS["segm"], "--pretrained", "none", "--device", "cpu", "--tile", "auto",
                     "--dry_run", env={"CVTK_JOB_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)["plan"]
    assert plan["tiles"] == {"width": side, "height": side, "overlap": overlap, "full_image": True}, plan
    assert plan["auto_tile"]["annotations"] == len(anns)
    assert f"tiles of {side}x{side} overlapping {overlap:g}" in result.stderr
    assert not (tmp_path / "m").exists()
    bad = run_cli("train", "--label", label, "--train", train, "--output_weights", tmp_path / "m" / "x.pth",
                  "--tile", "auto", "640", "--dry_run")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "--tile auto 640: give the tile's width and height in pixels (e.g. --tile 640 640) or --tile auto")


def test_a_tiff_read_band_by_band_gives_the_detections_of_the_same_image_as_png(shapes_model, tmp_path):
    """One 1000x700 field as PNG, as OpenCV's TIFF (LZW strips) and as a tiled deflate TIFF (a GIS mosaic's
    layout): the TIFFs are read a band of rows at a time (raster.TiffBands), the PNG decoded whole; tiles and the
    whole-image pass see the same pixels, so every detection is the same."""
    import cv2
    import tifffile

    from tests import synthetic

    label, weights = shapes_model
    field = synthetic.write(tmp_path / "src", 1, (1000, 700), 40, (8, 14), seed=8)
    image = cv2.imread(str(field.parent / json.loads(field.read_text())["images"][0]["file_name"]))
    data = tmp_path / "data"
    data.mkdir()
    cv2.imwrite(str(data / "field.png"), image)
    cv2.imwrite(str(data / "field_strips.tif"), image)
    tifffile.imwrite(data / "field_tiles.tif", image[..., ::-1], tile=(128, 128), compression="zlib",
                     photometric="rgb")
    result = run_cli("inference", "--label", label, "--data", data, "--model_weights", weights, "--output",
                     tmp_path / "out", "--tile", "256", "256", "--score_threshold", "0.3", "--device", "cpu",
                     "--num_workers", "1", "--no_draw")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "instances.json").read_text())
    by_name = {img["file_name"]: img["id"] for img in out["images"]}
    key = lambda a: (a["category_id"], a["score"], a["bbox"], a["segmentation"]["counts"])  # noqa: E731
    found = {name: sorted(key(a) for a in out["annotations"] if a["image_id"] == i) for name, i in by_name.items()}
    assert len(found["field.png"]) >= 20, "the model finds most of the 40 shapes"
    assert found["field_strips.tif"] == found["field.png"]
    assert found["field_tiles.tif"] == found["field.png"]
