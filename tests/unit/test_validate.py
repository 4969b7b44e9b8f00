"""validate: the shipped sample passes; each broken dataset gives exactly one line and exit 2."""

import pytest

from tests.conftest import DATA, SAMPLE, run_cli

V = DATA / "validate"
IMG = V / "images"

BROKEN = {
    "bad_malformed.json": "line 3, column 12: invalid JSON (Expecting property name enclosed in double "
                          "quotes); fix the syntax at that position",
    "bad_empty.json": "file: the file is empty; export the dataset again as COCO JSON",
    "does_not_exist.json": "file: file not found; check the path",
    "bad_top_level.json": "file: the top level is a JSON list, not an object; a COCO file is an object "
                          "with images, annotations and categories",
    "bad_missing_keys.json": "file: missing or not a list: annotations; a COCO file needs 'images', "
                             "'annotations' and 'categories' lists",
    "bad_duplicate_image_id.json": "image id 1 (images/a.jpg): image id 1 is used more than once; "
                                   "give every image a unique id",
    "bad_duplicate_annotation_id.json": "annotation id 1 (images/b.png): annotation id 1 is used more "
                                        "than once; give every annotation a unique id",
    "bad_unknown_image_id.json": "annotation id 2: image_id 7 is not in images; point image_id at an "
                                 "existing image or delete the annotation",
    "bad_unknown_category_id.json": "annotation id 2 (images/b.png): category_id 5 is not in "
                                    "categories; use one of [0, 1]",
    "bad_category_names.json": "categories: names in id order are ['flower', 'fruits'] but the label "
                               "file lists ['flower', 'fruit'] (missing ['fruit']; unexpected "
                               "['fruits']); make the categories (sorted by id) match the label file "
                               "line by line",
    "bad_bbox_outside.json": "annotation id 1 (images/a.jpg): bbox [20, 2, 30, 8] extends outside the "
                             "32x24 image; clip the box to the image",
    "bad_bbox_no_area.json": "annotation id 1 (images/a.jpg): bbox [2, 2, 0, 8] has no area (width and "
                             "height must be positive); fix or delete the annotation",
    "bad_no_area.json": "annotation id 1 (images/a.jpg): area is missing or not a finite number; set area "
                        "(mask pixel count, or box width*height)",
    "bad_polygon_two_points.json": "annotation id 1 (images/a.jpg): segmentation polygon 0 has 2 "
                                   "point(s); a polygon needs at least 3 points; delete or redraw it",
    "bad_polygon_odd.json": "annotation id 1 (images/a.jpg): segmentation polygon 0 has an odd number "
                            "of coordinates (5); give x, y pairs",
    "bad_rle_size.json": "annotation id 2 (images/b.png): RLE size [24, 32] does not match the image "
                         "[height, width] [16, 16]; encode the mask at the image's size",
    "bad_image_missing.json": f"image id 2 (images/nowhere.png): image file not found at "
                              f"{IMG / 'nowhere.png'}; copy the image there or fix file_name (it is "
                              "relative to the JSON's folder)",
    "bad_image_unreadable.json": f"image id 2 (images/broken.jpg): image file {IMG / 'broken.jpg'} "
                                 "cannot be read (UnidentifiedImageError); replace it with a valid "
                                 "JPEG or PNG",
    "bad_image_size.json": "image id 1 (images/a.jpg): the JSON says 40x24 but the image file is "
                           "32x24; set width and height to the file's real size",
    "bad_bad_width.json": "image id 2 (images/b.png): width and height must be positive integers "
                          "(got 0, 16); set them to the image's size in pixels",
}


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_dataset_gives_one_exact_line_and_exit_2(name):
    path = V / name
    result = run_cli("validate", "--label", V / "label.txt", path)
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [f"error: {path}: {BROKEN[name]}"]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_wrong_label_file_shows_the_difference():
    result = run_cli("validate", "--label", V / "wrong_label.txt", "--train", V / "ok.json")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"error: {V / 'ok.json'}: categories: names in id order are ['flower', 'fruit'] but the label "
        "file lists ['fruit', 'flower'] (same names, different order); make the categories (sorted by "
        "id) match the label file line by line"]


def test_missing_label_file_is_one_line():
    result = run_cli("validate", "--label", V / "nope.txt", V / "ok.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cvtk-job validate: error: {V / 'nope.txt'}: label file not found; pass --label with the path "
        "of a text file listing one class name per line"]


def test_task_segm_requires_masks(tmp_path):
    result = run_cli("validate", "--task", "segm", SAMPLE / "train" / "bbox.json")
    assert result.returncode == 2
    assert "no segmentation mask, but the task is segm" in result.stderr


def test_images_without_annotations_are_a_warning_not_an_error():
    result = run_cli("validate", "--label", V / "label.txt", V / "warn_unannotated.json")
    assert result.returncode == 0, result.stderr
    assert "1 image(s) have no annotations (images/a.jpg)" in result.stderr
    assert "warnings=1" in result.stdout


def test_shipped_sample_is_valid_for_both_tasks():
    for kind, task in (("segm", "segm"), ("bbox", "det")):
        result = run_cli("validate", "--label", SAMPLE / "label.txt", "--task", task,
                         "--train", SAMPLE / "train" / f"{kind}.json",
                         "--valid", SAMPLE / "valid" / f"{kind}.json",
                         "--test", SAMPLE / "test" / f"{kind}.json")
        assert result.returncode == 0, result.stderr
        assert [line.split("\t")[:2] for line in result.stdout.splitlines()] == [
            ["ok", "train"], ["ok", "valid"], ["ok", "test"]]
        assert "images=60\t" in result.stdout


def test_headers_read_by_worker_processes_report_the_same_problems(monkeypatch):
    """Large datasets read image headers in worker processes: the same lines, in the same order."""
    from cvtk_job import coco

    files = [V / name for name in ("bad_image_missing.json", "bad_image_unreadable.json", "bad_image_size.json",
                                   "ok.json")]
    serial = [[str(p) for p in coco.validate_coco(str(f)).problems] for f in files]
    monkeypatch.setattr(coco, "PARALLEL_HEADERS", 1)
    monkeypatch.setattr(coco, "HEADER_CHUNK", 1)
    parallel = [[str(p) for p in coco.validate_coco(str(f)).problems] for f in files]
    assert parallel == serial
    assert sum(len(p) for p in serial) >= 3
