"""Post-processing from mask crops (what crosses to a worker) against the full-mask path it replaces:
`predictions.detections` + `drawing.draw(masks=…)` on whole (H, W) masks. Same records, byte for byte, and the
same drawn pixels, on masks made to hit every branch (inside the box, leaking out of it, empty, at the image
edge, boxes on whole pixels, a box of zero width)."""

import json

import numpy as np
import pytest
import torch

from cvtk_job import drawing, postprocess, predictions

H, W = 90, 130
NAMES = ["square", "disk", "leaf"]


def fake_pred(seed, n=40):
    rng = np.random.default_rng(seed)
    boxes, masks = [], np.zeros((n, H, W), bool)
    for i in range(n):
        x1, y1 = rng.uniform(-10, W - 5), rng.uniform(-10, H - 5)
        x2, y2 = x1 + rng.uniform(0, 50), y1 + rng.uniform(0, 40)
        if i % 7 == 0:
            x1, y1, x2, y2 = float(int(x1)), float(int(y1)), float(int(x2)), float(int(y2))  # whole pixels
        if i == 5:
            x2 = x1  # zero width
        boxes.append([x1, y1, x2, y2])
        c1, r1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        c2, r2 = min(W, int(np.ceil(x2))), min(H, int(np.ceil(y2)))
        if c2 > c1 and r2 > r1 and i % 9 != 1:  # i % 9 == 1: an empty mask
            masks[i, r1:r2, c1:c2] = rng.random((r2 - r1, c2 - c1)) < 0.6
        if i % 5 == 3:  # a pixel far outside the box: not a Mask R-CNN mask
            masks[i, (r1 + 45) % H, (c1 + 70) % W] = True
    return {"bboxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(rng.random(n), dtype=torch.float32),
            "labels": torch.tensor(rng.integers(0, len(NAMES), n)), "masks": torch.from_numpy(masks)}


def run_jobs(post, folder, jobs):
    """Every job through `post` (Inline or Workers) as inference feeds it: the results in the order they come
    back, and the files drawn into `folder` (made here: the jobs draw into it), name -> bytes."""
    folder.mkdir()
    out = []
    with post:
        for job in jobs:
            out += list(post.submit(job))
        out += list(post.drain())
    return out, {p.name: p.read_bytes() for p in folder.iterdir()}


def reference(pred, threshold, image):
    """The path before workers: whole masks on the host, encoded and drawn from there."""
    keep = predictions.passing(pred, threshold)
    masks = predictions.kept_masks(pred, keep)
    dets = predictions.detections(pred, H, W, True, threshold, masks)
    return dets, drawing.draw(image, dets, NAMES, masks)


@pytest.mark.parametrize("threshold", [0.0, 0.3, [0.2, 0.5, 0.9]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crops_give_the_same_records_and_pixels_as_whole_masks(tmp_path, seed, threshold):
    import cv2

    pred = fake_pred(seed)
    image = np.random.default_rng(seed + 10).integers(0, 255, (H, W, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "in.png"), image)
    want_dets, want_image = reference(pred, threshold, image)
    job = postprocess.make_job(3, "in.png", pred, H, W, True, threshold, str(tmp_path / "in.png"),
                               str(tmp_path / "out.png"))
    kinds = {"box" if (x0, y0) != (0, 0) or crop.shape != (H, W) else "whole" for crop, x0, y0 in job.crops}
    if threshold == 0.0:
        assert kinds == {"box", "whole"}  # both kinds of crop were exercised
    index, name, width, height, dets = postprocess.finish(job, NAMES)
    assert (index, name, width, height) == (3, "in.png", W, H)
    assert json.dumps(dets) == json.dumps(want_dets)
    assert np.array_equal(cv2.imread(str(tmp_path / "out.png")), want_image)


def test_crops_are_small_for_mask_rcnn_masks():
    """What crosses to a worker: the boxes' pixels, not an (H, W) array per detection."""
    pred = fake_pred(4)
    pred["masks"][:, :, :] = False  # masks inside their boxes only
    for i, (x1, y1, x2, y2) in enumerate(pred["bboxes"].tolist()):
        pred["masks"][i, max(0, int(y1) + 1):max(0, int(y2)), max(0, int(x1) + 1):max(0, int(x2))] = True
    keep, boxes, _, _ = predictions.kept(pred, H, W, 0.0)
    crops = predictions.mask_crops(pred["masks"], keep, boxes, H, W)
    sent = sum(crop.size for crop, _, _ in crops)
    box_pixels = sum(max(0, min(W, np.ceil(x2) + 1) - max(0, np.floor(x1) - 1))
                     * max(0, min(H, np.ceil(y2) + 1) - max(0, np.floor(y1) - 1)) for x1, y1, x2, y2 in boxes)
    assert sent <= box_pixels < len(keep) * H * W / 4


def test_the_gpu_way_of_cutting_crops_gives_the_same_crops():
    """`_device_crops` (masks on a GPU) run here on CPU tensors: the crops equal the host way's."""
    pred = fake_pred(6)
    keep, boxes, _, _ = predictions.kept(pred, H, W, 0.0)
    host = predictions.mask_crops(pred["masks"], keep, boxes, H, W)
    spans = [(x0, y0, x0 + c.shape[1], y0 + c.shape[0]) for c, x0, y0 in host if (x0, y0) != (0, 0)]
    assert len(spans) > 20
    device = predictions._device_crops(pred["masks"], keep, [
        (max(0, int(np.floor(x1)) - 1), max(0, int(np.floor(y1)) - 1),
         max(max(0, int(np.floor(x1)) - 1), min(W, int(np.ceil(x2)) + 1)),
         max(max(0, int(np.floor(y1)) - 1), min(H, int(np.ceil(y2)) + 1))) for x1, y1, x2, y2 in boxes.tolist()])
    assert len(device) == len(host)
    for (a, ax, ay), (b, bx, by) in zip(host, device, strict=True):
        assert (ax, ay) == (bx, by) and a.dtype == b.dtype == bool and np.array_equal(a, b)


def test_box_only_models_need_no_crops(tmp_path):
    pred = fake_pred(5)
    del pred["masks"]
    job = postprocess.make_job(0, "x.png", pred, H, W, False, 0.3)
    assert job.crops is None
    assert json.dumps(postprocess.finish(job, NAMES)[4]) == json.dumps(predictions.detections(pred, H, W, False, 0.3))


def test_workers_return_what_inline_does_in_submission_order(tmp_path):
    import cv2

    jobs = []
    for i in range(9):
        pred = fake_pred(20 + i, n=15)
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((H, W, 3), 20 * i, np.uint8))
        jobs.append((i, pred))

    def run(post, folder):
        return run_jobs(post, folder, (postprocess.make_job(i, f"{i}.png", pred, H, W, True, 0.1,
                                                            str(tmp_path / f"{i}.png"), str(folder / f"{i}.png"))
                                       for i, pred in jobs))

    inline = run(postprocess.Inline(NAMES), tmp_path / "inline")
    workers = run(postprocess.Workers(3, NAMES, ahead=2), tmp_path / "workers")
    assert [r[0] for r in workers[0]] == list(range(9))
    assert json.dumps(workers[0]) == json.dumps(inline[0])
    assert workers[1] == inline[1] and len(inline[1]) == 9


def test_a_worker_error_reaches_the_main_process_as_itself(tmp_path):
    from cvtk_job.errors import UserError

    pred = fake_pred(7, n=5)
    job = postprocess.make_job(0, "gone.png", pred, H, W, True, 0.0, str(tmp_path / "gone.png"),
                               str(tmp_path / "out.png"))
    with postprocess.Workers(1, NAMES) as post, pytest.raises(UserError, match="gone.png: could not be read again"):
        list(post.submit(job))
        list(post.drain())


def test_crops_cross_to_a_worker_as_one_buffer():
    """Pickled, the crops are their pixels and a small table, not one array (and its pickle header) per mask;
    unpickled, every crop is what was cut."""
    import pickle

    pred = fake_pred(6)
    keep, boxes, _, _ = predictions.kept(pred, H, W, 0.0)
    crops = predictions.mask_crops(pred["masks"], keep, boxes, H, W)
    wire = pickle.dumps(crops)
    pixels = sum(c.size for c, _, _ in crops)
    assert len(crops) > 20 and pixels <= len(wire) < pixels + 40 * len(crops) + 1000
    back = pickle.loads(wire)
    assert len(back) == len(crops)
    whole = pred["masks"].numpy()
    for k, (crop, x0, y0) in zip(keep.tolist(), back, strict=True):
        expected = np.zeros((H, W), bool)
        expected[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        assert np.array_equal(expected, whole[k])  # the crop holds all of its mask, at its place


def _mask_rcnn():
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from tests.conftest import TINY_MODELS

    register_all_modules()
    return MODELS.build(Config.fromfile(TINY_MODELS["segm"]).model)


def test_mmdet_pastes_each_mask_inside_its_box_on_the_cpu():
    """What `in_box` relies on, checked on masks mmdet's own FCNMaskHead pastes: sure-foreground logits
    (sigmoid 1.0 everywhere, the most a bilinear edge can spread), boxes of every size, partly outside the image,
    fractional, rescaled from the network's input size. Every pixel outside floor(x1)-1 .. ceil(x2)+1 is zero
    (counted with numpy), and the crops cut without the proof equal the crops cut with it."""
    from mmengine.config import ConfigDict
    from mmengine.structures import InstanceData

    head = _mask_rcnn().roi_head.mask_head
    rng = np.random.default_rng(0)
    n, height, width, scale = 60, 90, 130, (0.8, 0.7)
    xy = rng.uniform(-8, [width * scale[0] - 1, height * scale[1] - 1], (n, 2))
    boxes = np.concatenate([xy, np.maximum(xy + rng.uniform(0.3, 80, (n, 2)), 0.5)], 1).astype(np.float32)
    results = InstanceData(bboxes=torch.from_numpy(boxes), labels=torch.from_numpy(rng.integers(0, 1, n)),
                           scores=torch.from_numpy(rng.uniform(0.5, 1, n).astype(np.float32)))
    logits = torch.full((n, 1, 28, 28), 30.0)
    logits[::3] = torch.from_numpy(rng.normal(0, 3, (len(logits[::3]), 1, 28, 28)).astype(np.float32))
    meta = {"ori_shape": (height, width), "scale_factor": scale, "img_shape": (72, 91)}
    out = head.predict_by_feat((logits,), [results], [meta], ConfigDict(mask_thr_binary=0.5), rescale=True)[0]
    masks = out.masks.numpy()
    pasted = out.bboxes.numpy()  # mmdet rescales the boxes in place: these are the boxes it pasted into
    assert masks.shape == (n, height, width) and masks.any()
    cols, rows = np.arange(width), np.arange(height)
    for mask, (x1, y1, x2, y2) in zip(masks, pasted, strict=True):
        allowed = np.outer((rows >= np.floor(y1) - 1) & (rows < np.ceil(y2) + 1),
                           (cols >= np.floor(x1) - 1) & (cols < np.ceil(x2) + 1))
        assert not mask[~allowed].any()
    pred = {"bboxes": out.bboxes, "scores": out.scores, "labels": out.labels, "masks": out.masks}
    keep, kept_boxes, _, _ = predictions.kept(pred, height, width, 0.0)
    proved = predictions.mask_crops(pred["masks"], keep, kept_boxes, height, width)
    trusted = predictions.mask_crops(pred["masks"], keep, kept_boxes, height, width, in_box=True)
    assert np.array_equal(proved.table, trusted.table) and np.array_equal(proved.flat, trusted.flat)


def test_only_mmdets_own_box_pasting_is_trusted():
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead

    from cvtk_job import predictor

    model = _mask_rcnn().eval()
    assert predictor.masks_pasted_in_boxes(model)

    class Elsewhere(FCNMaskHead):  # a head that places masks its own way
        def _predict_by_feat_single(self, *args, **kwargs):
            return super()._predict_by_feat_single(*args, **kwargs)

    model.roi_head.mask_head.__class__ = Elsewhere
    assert not predictor.masks_pasted_in_boxes(model)
    model = _mask_rcnn()
    model.roi_head.test_cfg.mask_thr_binary = -1  # soft (uint8) masks
    assert not predictor.masks_pasted_in_boxes(model)
    del model.roi_head  # a model without a two-stage mask head
    assert not predictor.masks_pasted_in_boxes(model)


def test_trusting_the_box_is_what_keeps_a_leaking_mask_cut():
    """Without `in_box`, a mask with pixels outside its box is sent whole (the proof works); with it, the crop
    is the box's (so `in_box` must only be given for heads that paste inside the box)."""
    pred = fake_pred(0)
    keep, boxes, _, _ = predictions.kept(pred, H, W, 0.0)
    proved = predictions.mask_crops(pred["masks"], keep, boxes, H, W)
    trusted = predictions.mask_crops(pred["masks"], keep, boxes, H, W, in_box=True)
    whole = [i for i, (crop, _, _) in enumerate(proved) if crop.shape == (H, W)]
    assert whole and all(trusted[i][0].shape != (H, W) for i in whole)


def _tiled_pieces(seed, height, width, n=25):
    from cvtk_job.tiling import Piece

    rng = np.random.default_rng(seed)
    pieces = []
    for i in range(n):
        w, h = int(rng.integers(3, 60)), int(rng.integers(3, 40))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if i == 1:  # a crop resized from the whole-image view may reach a pixel past the image
            x0, y0 = width - w + 1, height - h + 1
        mask = rng.random((h, w)) < 0.7
        box = np.array([x0 + 0.3, y0 + 0.6, x0 + w - 0.2, y0 + h - 0.4])
        pieces.append(Piece(int(i % len(NAMES)), float(rng.uniform(0.1, 1)), box, (0, 0, width, height), mask,
                            x0, y0))
    return pieces


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_tiled_images_are_encoded_and_drawn_in_a_worker_as_in_the_main_process(tmp_path, monkeypatch, suffix):
    """inference --tile: a worker gives the records and drawn image the main process gives (in submission order),
    and the records are the pieces' masks, pasted into the whole image (decoded with pycocotools, built with
    numpy). Drawn scaled down (MAX_PIXELS made small: the path a 16000x16000 mosaic takes), and the worker reads
    the image again itself (band by band for a TIFF)."""
    import cv2
    import tifffile
    from pycocotools import mask as mask_utils

    from cvtk_job import drawing

    monkeypatch.setattr(drawing, "MAX_PIXELS", 160 * 100)  # before the workers fork: they inherit it
    height, width = 230, 310
    jobs = []
    for i in range(4):
        image = np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)
        path = tmp_path / f"{i}{suffix}"
        if suffix == ".tif":
            tifffile.imwrite(path, image[..., ::-1], tile=(64, 64), compression="zlib")
        else:
            cv2.imwrite(str(path), image)
        jobs.append((i, path, _tiled_pieces(i, height, width)))

    def run(post, folder):
        return run_jobs(post, folder, (postprocess.TiledJob(i, path.name, width, height, pieces, True, str(path),
                                                            str(folder / f"{i}.jpg")) for i, path, pieces in jobs))

    inline = run(postprocess.Inline(NAMES), tmp_path / "inline")
    workers = run(postprocess.Workers(1, NAMES, ahead=2), tmp_path / "workers")
    assert [r[0] for r in workers[0]] == [0, 1, 2, 3]
    assert json.dumps(workers[0]) == json.dumps(inline[0])
    assert workers[1] == inline[1] and len(inline[1]) == 4
    drawn = cv2.imdecode(np.frombuffer(inline[1]["0.jpg"], np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape[0] * drawn.shape[1] <= 160 * 100 and drawn.shape[1] > 100  # scaled down, not blank
    for (_, _, pieces), (_, _, w, h, dets) in zip(jobs, inline[0], strict=True):
        assert (w, h) == (width, height) and len(dets) == len(pieces)
        for piece, det in zip(pieces, dets, strict=True):
            expected = np.zeros((height + 100, width + 100), bool)  # room for a crop that reaches past the edge
            ys, xs = np.nonzero(piece.mask)
            expected[ys + piece.my0 + 50, xs + piece.mx0 + 50] = True
            expected = expected[50:50 + height, 50:50 + width]
            rle = {"size": det["segmentation"]["size"], "counts": det["segmentation"]["counts"].encode()}
            assert np.array_equal(mask_utils.decode(rle).astype(bool), expected)
            assert det["area"] == np.count_nonzero(expected) and det["label"] == piece.label


def test_a_tiled_image_gone_before_drawing_is_one_clear_error(tmp_path):
    from cvtk_job.errors import UserError

    job = postprocess.TiledJob(0, "gone.tif", 100, 80, _tiled_pieces(0, 80, 100, n=3), True,
                               str(tmp_path / "gone.tif"), str(tmp_path / "out.jpg"))
    with postprocess.Workers(1, NAMES) as post, pytest.raises(UserError, match="gone.tif: could not be read again"):
        list(post.submit(job))
        list(post.drain())
