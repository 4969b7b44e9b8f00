"""`bench/run.py --only tiling`: `inference --tile` vs SAHI's sliced prediction, and the command's peak RSS on one
16000x16000 image vs one 2000x2000.

Same model on both sides: a tiny Mask R-CNN trained on synthetic 256x256 images of squares and disks
(tests/synthetic.py), cached under outputs/bench/tiling. Same images: 4 synthetic 2048x2048 fields of 240 shapes
(radius 8-14 px). Same tiles (256x256, overlap 0.2), the same whole-image pass (ours by default, SAHI's
perform_standard_pred), the same score threshold (0.3). Both run as a fresh process each, timed end to end
(start-up and model load included), and both are scored by pycocotools' COCOeval (segm) on what they wrote.

SAHI is not a requirement of cvtk-job: `.venv/bin/pip install --no-deps sahi shapely fire` (its metadata asks for
opencv-python>=4.12, which cvtk-job does not take; sahi 0.12.8 runs with ours). Without it its rows are skipped.
SAHI's mmdet wrapper builds mmdet's DetInferencer, which reads the test pipeline and the dataset's metainfo from
`test_dataloader`; the config written beside the weights has none (trained without --test), so the SAHI side
runs on a copy of it with `test_dataloader` = the train dataset with the test pipeline (nothing else changed).

This file is also the SAHI side (`python bench/tiling.py sahi CONFIG WEIGHTS COCO_JSON OUT`) and a peak-RSS
wrapper that can stop a command after a while (`python bench/tiling.py rss SECONDS CMD...`).
"""

import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CLI = [PY, str(REPO / "entrypoint.py")]
TILE, OVERLAP, SCORE = 256, 0.2, 0.3
FIELDS = 4  # test images
# Speed rounds (ours, then SAHI) are repeated up to 3 times while they fit in this many seconds.
SPEED_SECONDS = float(os.environ.get("BENCH_TILING_SECONDS", "300"))
# The 16000x16000 run (6,084 tiles: many minutes on a small CPU) is stopped after this many seconds; the image is
# decoded whole before the first tile, so its peak RSS is reached long before.
BIG_SECONDS = float(os.environ.get("BENCH_TILING_BIG_SECONDS", "60"))


def shapes_model(work):
    """(label file, weights, config) of the shapes model: trained once (about 5 minutes on 2 cores), then reused.

    128 images, 12 epochs: a model that has learned the shapes (it finds all 960 at the 0.3 threshold). The
    earlier 32 images x 6 epochs left most detections near the threshold, and the AP row then measured which of
    two tile grids happened to catch them (on the same tile SAHI and we get identical model outputs)."""
    from tests import synthetic

    folder = work / "model_shapes_n128_256_e12_seed1"
    label, weights = folder / "label.txt", folder / "shapes.pth"
    if not (folder / "shapes.done.json").exists():  # the train command writes it last
        train = synthetic.write(folder / "train", 128, (256, 256), 8, (8, 14), seed=1)
        label.write_text("\n".join(synthetic.CLASSES) + "\n")
        with open(folder / "train.log", "w") as log:
            subprocess.run([*CLI, "train", "--label", label, "--train", train, "--output_weights", weights,
                            "--model", REPO / "examples" / "configs" / "tiny_mask_rcnn.py", "--pretrained", "none",
                            "--epoch", "12", "--batch_size", "4", "--num_workers", "1", "--image_size", "256", "256",
                            "--device", "cpu"], check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return label, weights, weights.with_suffix(".py")


def fields(work):
    """The test set: 4 images of 2048x2048 with 240 shapes each, and its COCO JSON (cached)."""
    from tests import synthetic

    folder = work / f"fields_n{FIELDS}_2048_c240_seed3"
    if not (folder / "coco.json").exists():  # synthetic.write writes the JSON last
        synthetic.write(folder, FIELDS, (2048, 2048), 240, (8, 14), seed=3)
    return folder / "coco.json"


def big_images(work):
    """{(side, ext): path}: one 2000x2000 and one 16000x16000 image in the synthetic style (4 shapes per
    1000x1000 pixels), each as TIFF (OpenCV's default, LZW strips) and JPEG (quality 95); cached."""
    import cv2
    import numpy as np

    from tests import synthetic

    paths = {(side, ext): work / "rss" / f"{side}_{ext}" / f"field{side}.{ext}"
             for side in (2000, 16000) for ext in ("tif", "jpg")}
    for side in (2000, 16000):
        if all(paths[side, ext].exists() for ext in ("tif", "jpg")):
            continue
        image, _ = synthetic.canvas(np.random.default_rng(side), side, side, 4 * (side // 1000) ** 2, (8, 14))
        for ext in ("tif", "jpg"):
            path = paths[side, ext]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"part.{ext}")
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == "jpg" else []
            if not cv2.imwrite(str(tmp), image, params):
                sys.exit(f"tiling: cv2.imwrite could not write {tmp}")
            tmp.replace(path)
        del image
    return paths


def ours(model, data, out, draw=False):
    label, weights, _ = model
    return [*CLI, "inference", "--label", label, "--data", data, "--model_weights", weights, "--output", out,
            "--tile", TILE, TILE, "--tile_overlap", OVERLAP, "--score_threshold", SCORE, "--device", "cpu",
            "--num_workers", "1", *([] if draw else ["--no_draw"])]


def average_precision(gt_path, pred_path):
    """(segm AP@[.5:.95], AP50, detections) by pycocotools' COCOeval; predictions matched to the ground truth by
    image file name. Every AP at maxDets = the most ground-truth objects or detections in one image (at least
    COCO's 100): a field holds 240 shapes, and COCO's 100 would score both tools on a part of them."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with open(pred_path) as fh:
        pred = json.load(fh)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ids = {Path(img["file_name"]).name: img["id"] for img in gt.dataset["images"]}
        names = {img["id"]: Path(img["file_name"]).name for img in pred["images"]}
        dets = [dict(a, image_id=ids[names[a["image_id"]]]) for a in pred["annotations"]]
        if not dets:
            return 0.0, 0.0, 0
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        most = max([100, *collections.Counter(a["image_id"] for a in gt.dataset["annotations"]).values(),
                    *collections.Counter(d["image_id"] for d in dets).values()])
        ev.params.maxDets = [1, 10, most]
        ev.evaluate()
        ev.accumulate()
    # COCOeval.summarize reads its first AP at maxDets 100 only: both numbers straight from the precision table
    # (IoU thresholds x recall x classes, area "all", the last maxDets), as summarize computes them.
    import numpy as np

    precision = ev.eval["precision"][:, :, :, 0, -1]
    return float(np.mean(precision[precision > -1])), float(np.mean(precision[0][precision[0] > -1])), len(dets)


def sahi_problem():
    """None when SAHI's mmdet wrapper imports here, else why not (one line)."""
    out = subprocess.run([PY, "-c", "import sahi, sahi.predict, sahi.models.mmdet; print(sahi.__version__)"],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        return f"sahi's mmdet wrapper does not import: {lines[-1] if lines else out.returncode}"
    return None


def sahi_version():
    from importlib.metadata import version

    return version("sahi")


def bench(work, report, skipped, measure):
    """The rows of `bench/run.py --only tiling`, into `work` (outputs/bench/tiling)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # tests.synthetic, cvtk_job
    work.mkdir(parents=True, exist_ok=True)
    model = shapes_model(work)
    gt = fields(work)
    n = FIELDS
    from cvtk_job import tiling

    per_image = len(tiling.grid(2048, 2048, TILE, TILE, OVERLAP)) + 1  # + the whole-image pass
    problem = sahi_problem()

    # Speed: ours and SAHI alternating (a slow spell of the machine hits both), up to 3 rounds in SPEED_SECONDS.
    runs = {"ours": [], "sahi": []}
    started = time.perf_counter()
    while len(runs["ours"]) < 3:
        begin = time.perf_counter()
        runs["ours"].append(measure(ours(model, gt, work / "ours_out"))["wall_s"])
        if not problem:
            runs["sahi"].append(measure([PY, Path(__file__), "sahi", model[2], model[1], gt, work / "sahi_out"])
                                ["wall_s"])
        spent, round_s = time.perf_counter() - started, time.perf_counter() - begin
        if spent + round_s > SPEED_SECONDS:
            break
    rounds = len(runs["ours"])
    ours_s = statistics.median(runs["ours"])
    ours_ap, ours_ap50, ours_n = average_precision(gt, work / "ours_out" / "instances.json")
    what = (f"{n} synthetic 2048x2048 PNGs, {n * 240} shapes of radius 8-14 px; tiles {TILE}x{TILE} overlap "
            f"{OVERLAP}, {per_image - 1} tiles + the whole-image pass per image, score >= {SCORE}")
    how = f"median of {rounds} alternating runs" if rounds > 1 else "one run each"
    if problem:
        skipped("tiled inference images/s vs SAHI", ">= 3", problem)
        skipped("tiled AP vs SAHI", ">= SAHI's", problem)
    else:
        sahi_s = statistics.median(runs["sahi"])
        with open(work / "sahi_out" / "timing.json") as fh:
            inner = json.load(fh)
        sahi_ap, sahi_ap50, sahi_n = average_precision(gt, work / "sahi_out" / "instances.json")
        ratio = sahi_s / ours_s
        report("tiled inference images/s vs SAHI", n / ours_s, n / sahi_s, "img/s", ratio, ">= 3", ratio >= 3,
               f"{what}; ours `inference --tile` --no_draw, --batch_size 4 (tiles), 1 reader; SAHI "
               f"{sahi_version()} get_sliced_prediction on mmdet's DetInferencer (batch 1, GREEDYNMM/IOS 0.5 "
               f"merge, its defaults), results to COCO RLE; same weights; each a fresh process, start-up and "
               f"model load included; {how}: ours {', '.join(f'{s:.1f}' for s in runs['ours'])} s, SAHI "
               f"{', '.join(f'{s:.1f}' for s in runs['sahi'])} s; in SAHI's last run: model load "
               f"{inner['load_s']:.1f} s, slicing {inner['slice_s']:.1f} s, prediction {inner['prediction_s']:.1f} s, "
               f"merge {inner['postprocess_s']:.1f} s, to COCO {inner['convert_s']:.1f} s; "
               f"{n * per_image / ours_s:.1f} model passes/s ours")
        report("tiled AP vs SAHI", ours_ap, sahi_ap, "segm AP", ours_ap / sahi_ap if sahi_ap else float("inf"),
               ">= SAHI's", ours_ap >= sahi_ap,
               f"segm AP@[.5:.95] by pycocotools COCOeval on the {n * 240} ground-truth shapes of the runs above; "
               f"AP50 ours {ours_ap50:.3f}, SAHI {sahi_ap50:.3f}; detections ours {ours_n}, SAHI {sahi_n}")
    drawn = measure(ours(model, gt, work / "ours_drawn", draw=True))["wall_s"]
    report("tiled inference images/s, drawing on vs off", n / drawn, n / ours_s, "img/s", drawn / ours_s,
           "(information)", True, "same images and flags, drawn images written; one run; ratio = time ratio")

    # Peak RSS: one 16000x16000 image vs one 2000x2000, TIFF and JPEG, the speed runs' flags.
    paths = big_images(work)
    big_tiles = len(tiling.grid(16000, 16000, TILE, TILE, OVERLAP))
    passes_per_s = n * per_image / ours_s
    for ext, name, target in (("tif", "TIFF", "<= 2"), ("jpg", "JPEG", "(information)")):
        small = rss([*ours(model, paths[2000, ext], work / f"rss_out_2000_{ext}")])
        big = rss([*ours(model, paths[16000, ext], work / f"rss_out_16000_{ext}")], BIG_SECONDS)
        ratio = big["peak_rss_mib"] / small["peak_rss_mib"]
        size = paths[16000, ext].stat().st_size / 2**20
        stop = (f"the 16000x16000 run stopped after {big['wall_s']:.0f} s (of ~{big_tiles / passes_per_s / 60:.0f} "
                f"min for its {big_tiles:,} tiles at the speed runs' rate)" if big["stopped"] else
                f"the 16000x16000 run complete in {big['wall_s']:.0f} s")
        report(f"peak RSS 16000² {name} vs 2000²", big["peak_rss_mib"], small["peak_rss_mib"], "MiB", ratio, target,
               ratio <= 2 if target != "(information)" else True,
               f"ru_maxrss of the largest process (the command or its reader); {size:.0f} MiB file, decoded "
               f"{16000 * 16000 * 3 / 2**20:.0f} MiB; {stop}; whole process tree, sampled every 0.2 s: "
               f"{big['tree_peak_mib']:.0f} vs {small['tree_peak_mib']:.0f} MiB")


def rss(cmd, seconds=None):
    out = subprocess.run([PY, str(Path(__file__)), "rss", str(seconds or 0), *map(str, cmd)], capture_output=True,
                         text=True, cwd=REPO)
    if out.returncode:
        sys.exit(f"bench command failed: {' '.join(map(str, cmd))}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _session(session):
    """{pid: VmRSS in KiB} of the live processes of a session (a command started with start_new_session; its
    loader workers leave its process group, signals.detach_loader_worker, but stay in its session)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read().rsplit(")", 1)[1].split()
            if int(stat[3]) != session:  # field 6 of stat: the session id
                continue
            with open(f"/proc/{pid}/status") as fh:
                found[int(pid)] = next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
        except (OSError, IndexError, ValueError):
            continue
    return found


def rss_main(seconds, cmd):
    """Run `cmd` (stopped with SIGKILL after `seconds` when > 0); print wall time, ru_maxrss of its processes
    and the sampled peak of their summed RSS, as JSON. This process is made a child subreaper, so a loader
    worker orphaned by the stop is reaped here and its ru_maxrss counts too."""
    import contextlib
    import ctypes
    import resource
    import signal
    import tempfile

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        tree_peak, stopped = 0.0, False
        while proc.poll() is None:
            live = _session(proc.pid)
            tree_peak = max(tree_peak, sum(live.values()) / 1024)
            if seconds and time.perf_counter() - start > seconds:
                for pid in live:  # the command and its loader worker (in a process group of its own)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                stopped = True
                proc.wait()
                break
            time.sleep(0.2)
        wall = time.perf_counter() - start
        while True:  # what is left of the command (a stopped one's orphaned worker, reparented to us): reaped
            for pid in _session(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
            except ChildProcessError:
                break
        if proc.returncode and not stopped:
            err.seek(0)
            sys.stderr.write(err.read()[-4000:])
            sys.exit(proc.returncode)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mib": peak, "tree_peak_mib": tree_peak, "stopped": stopped}))


def sahi_main(config, weights, gt_json, out):
    """SAHI over the images of a COCO JSON: get_sliced_prediction each, results written as COCO RLE to
    OUT/instances.json, SAHI's own durations to OUT/timing.json."""
    start = time.perf_counter()
    from mmengine.config import Config
    from pycocotools import mask as mask_utils
    from sahi import AutoDetectionModel
    from sahi.predict import get_sliced_prediction

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config.fromfile(config)
    # DetInferencer takes the test pipeline and the class metainfo from test_dataloader.dataset.
    cfg.test_dataloader = dict(batch_size=1, dataset=dict(cfg.train_dataloader.dataset, pipeline=cfg.test_pipeline,
                                                          test_mode=True))
    cfg.dump(str(out / "sahi_config.py"))
    model = AutoDetectionModel.from_pretrained(model_type="mmdet", model_path=str(weights),
                                               config_path=str(out / "sahi_config.py"), confidence_threshold=SCORE,
                                               device="cpu")
    timing = {"load_s": time.perf_counter() - start, "slice_s": 0.0, "prediction_s": 0.0, "postprocess_s": 0.0,
              "convert_s": 0.0}
    with open(gt_json) as fh:
        gt = json.load(fh)
    result = {"images": [], "annotations": [], "categories": gt["categories"]}
    for img in gt["images"]:
        got = get_sliced_prediction(str(Path(gt_json).parent / img["file_name"]), model, slice_height=TILE,
                                    slice_width=TILE, overlap_height_ratio=OVERLAP, overlap_width_ratio=OVERLAP,
                                    perform_standard_pred=True, verbose=0)
        for key in ("slice", "prediction", "postprocess"):
            timing[f"{key}_s"] += got.durations_in_seconds.get(key, 0.0)
        begin = time.perf_counter()
        h, w = img["height"], img["width"]
        result["images"].append({"id": img["id"], "file_name": img["file_name"], "width": w, "height": h})
        for p in got.to_coco_predictions(image_id=img["id"]):
            polygons = [poly for poly in p.get("segmentation") or [] if len(poly) >= 6]
            if not polygons:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
            result["annotations"].append({
                "id": len(result["annotations"]) + 1, "image_id": img["id"], "category_id": int(p["category_id"]),
                "bbox": [float(v) for v in p["bbox"]], "score": float(p["score"]),
                "area": float(mask_utils.area(rle)),
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
        timing["convert_s"] += time.perf_counter() - begin
    (out / "instances.json").write_text(json.dumps(result))
    (out / "timing.json").write_text(json.dumps(timing))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["sahi"] and len(sys.argv) == 6:
        sahi_main(*sys.argv[2:6])
    elif sys.argv[1:2] == ["rss"] and len(sys.argv) > 3:
        rss_main(float(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit("usage: bench/tiling.py sahi CONFIG WEIGHTS COCO_JSON OUT | rss SECONDS CMD...")
