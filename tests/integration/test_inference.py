"""inference and evaluate end to end on CPU, with a tiny model trained in the session."""

import json
import shutil

import pytest
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
# A one-epoch model scores low: keep every detection so the outputs have something in them.
LOW = ["--score_threshold", "0.0", "--device", "cpu", "--num_workers", "2"]


def infer(small_data, weights, data, out, *extra):
    return run_cli("inference", "--label", small_data / "label.txt", "--data", data,
                   "--model_weights", weights, "--output", out, *LOW, *extra)


def load_instances(out):
    with open(out / "instances.json") as fh:
        return json.load(fh, parse_constant=lambda t: pytest.fail(f"{t} in instances.json"))


def test_folder_input_keeps_sub_folders_and_writes_loadable_coco(small_data, trained_segm, tmp_path):
    data = tmp_path / "field"
    src = sorted((small_data / "test" / "images").iterdir())
    for sub, image in (("plot_a", src[0]), ("plot_b", src[0]), ("plot_b/day2", src[1])):
        (data / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, data / sub / image.name)
    out = tmp_path / "out"
    result = infer(small_data, trained_segm, data, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out / "instances.json")

    names = [f"plot_a/{src[0].name}", f"plot_b/day2/{src[1].name}", f"plot_b/{src[0].name}"]
    for name in names:  # equal file names in two folders: both drawn, none overwritten
        with Image.open(out / name) as im:
            assert im.size == Image.open(data / name).size
    inst = load_instances(out)
    assert sorted(i["file_name"] for i in inst["images"]) == sorted(names)
    assert [c["name"] for c in inst["categories"]] == ["flower", "green_fruit", "red_fruit"]
    assert [c["id"] for c in inst["categories"]] == [0, 1, 2]  # ids of the training data
    anns = inst["annotations"]
    assert anns and all({"bbox", "score", "category_id", "segmentation", "area", "iscrowd"} <= set(a) for a in anns)

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": inst["images"], "categories": inst["categories"], "annotations": []}
    coco.createIndex()
    assert len(coco.loadRes(anns).getAnnIds()) == len(anns)


def test_list_file_resolves_relative_paths_and_skips_a_corrupt_image(small_data, trained_segm, tmp_path):
    images = sorted((small_data / "test" / "images").iterdir())
    (tmp_path / "imgs").mkdir()
    for image in images[:2]:
        shutil.copy(image, tmp_path / "imgs" / image.name)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    listing = tmp_path / "test.txt"
    listing.write_text(f"imgs/{images[0].name}\nimgs/broken.jpg\n\nimgs/{images[1].name}\n")
    out = tmp_path / "out"
    result = infer(small_data, trained_segm, listing, out, "--batch_size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped {tmp_path / 'imgs' / 'broken.jpg'}: not a readable image" in result.stderr
    assert "inference done: 2 images" in result.stderr and "1 skipped" in result.stderr
    inst = load_instances(out)
    assert [i["file_name"] for i in inst["images"]] == [f"imgs/{images[0].name}", f"imgs/{images[1].name}"]
    assert sorted(p.name for p in (out / "imgs").iterdir()) == sorted(i.name for i in images[:2])


def test_single_image_and_no_draw(small_data, trained_segm, tmp_path):
    image = sorted((small_data / "test" / "images").iterdir())[0]
    result = infer(small_data, trained_segm, image, tmp_path / "out", "--no_draw")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["done.json", "instances.json"]
    assert load_instances(tmp_path / "out")["images"][0]["file_name"] == image.name


def _by_image(inst):
    names = {i["id"]: i["file_name"] for i in inst["images"]}
    found = {}
    for a in inst["annotations"]:
        found.setdefault(names[a["image_id"]], []).append((a["category_id"], a["score"], a["bbox"]))
    return found


def test_batch_size_does_not_change_predictions(small_data, trained_segm, tmp_path):
    data = small_data / "test" / "segm.json"
    runs = {}
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        result = infer(small_data, trained_segm, data, out, "--batch_size", str(batch), "--no_draw",
                       "--score_threshold", "0.05")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[batch] = _by_image(load_instances(out))
    assert runs[1].keys() == runs[4].keys()
    # Convolutions over a batch may round differently in the last bits: compare with a tolerance,
    # each detection against its twin.
    for name, dets in runs[1].items():
        assert len(dets) == len(runs[4][name]), name
        for cat, score, box in dets:
            twins = [d for d in runs[4][name] if d[0] == cat and abs(d[1] - score) < 1e-4
                     and max(abs(u - v) for u, v in zip(d[2], box, strict=True)) < 0.01]
            assert twins, f"{name}: {cat} {score:.4f} {box} has no twin"


def test_coco_input_then_evaluate_matches_by_file_name(small_data, trained_segm, tmp_path):
    out = tmp_path / "out"
    result = infer(small_data, trained_segm, small_data / "test" / "segm.json", out, "--no_draw")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(load_instances(out)["images"]) == 5
    stats = tmp_path / "stats.json"
    result = run_cli("evaluate", "--gt", small_data / "test" / "segm.json", "--pred", out / "instances.json",
                     "--output", stats)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AP@[0.50:0.95|all|100]" in json.loads(stats.read_text())["stats"]


def test_evaluate_reproduces_the_test_stats_of_train(small_data, trained_segm, tmp_path):
    stats = tmp_path / "stats.json"
    result = run_cli("evaluate", "--gt", small_data / "test" / "segm.json",
                     "--pred", trained_segm.parent / "strawberry" / "test_outputs.coco.json", "--output", stats)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(stats.read_text()) == json.loads(trained_segm.with_suffix(".test_stats.json").read_text())


def test_a_label_file_that_differs_from_the_weights_exits_2(small_data, trained_segm, tmp_path):
    labels = tmp_path / "label.txt"
    labels.write_text("green_fruit\nflower\nred_fruit\n")
    result = run_cli("inference", "--label", labels, "--data", small_data / "test" / "images",
                     "--model_weights", trained_segm, "--output", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"cvtk-job inference: error: {labels}: classes ['green_fruit', 'flower', 'red_fruit'] differ from the "
        "classes the weights were trained with ['flower', 'green_fruit', 'red_fruit']; use the label file of "
        "the training run")
    assert not (tmp_path / "out").exists()


def test_torchrun_shards_the_images_and_merges_one_instances_json(small_data, trained_segm, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    data = small_data / "test" / "segm.json"
    single = infer(small_data, trained_segm, data, tmp_path / "single", "--no_draw", "--score_threshold", "0.05")
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--nproc_per_node=2", str(REPO / "entrypoint.py"), "inference", "--label",
                             str(small_data / "label.txt"), "--data", str(data), "--model_weights", str(trained_segm),
                             "--output", str(tmp_path / "two"), *LOW, "--score_threshold", "0.05"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tmp_path / "two" / "instances.json")  # reported once, by rank 0
    two = load_instances(tmp_path / "two")
    assert [i["id"] for i in two["images"]] == [1, 2, 3, 4, 5]  # every image once, in input order
    assert sorted(p.name for p in (tmp_path / "two").iterdir())[:2] == ["done.json", "images"]
    ones, twos = _by_image(load_instances(tmp_path / "single")), _by_image(two)
    assert set(twos) == set(ones)  # the same images have detections
    for name, dets in twos.items():  # and the same detections: class, score and box, in the same order
        assert len(dets) == len(ones[name]), name
        for (c, s, box), (c1, s1, box1) in zip(dets, ones[name], strict=True):
            assert c == c1 and s == pytest.approx(s1, abs=1e-4) and box == pytest.approx(box1, abs=0.01), name


def test_sigterm_stops_inference_with_75_writing_nothing_final_and_a_rerun_completes(small_data, trained_segm,
                                                                                  tmp_path):
    """A complete run, then a rerun on fewer images stopped half-way: it leaves no done.json (the old one would
    describe files the rerun has partly replaced); the next rerun completes and leaves exactly its own files."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    data = tmp_path / "field"
    data.mkdir()
    src = sorted((small_data / "test" / "images").iterdir())
    for i in range(62):  # enough images for the signal to land mid-run (it is sent after the 50th)
        shutil.copy(src[i % len(src)], data / f"{i:03d}_{src[i % len(src)].name}")
    out = tmp_path / "out"
    args = ["inference", "--label", small_data / "label.txt", "--data", data, "--model_weights", trained_segm,
            "--output", out, "--batch_size", "1", *LOW]
    first = run_cli(*args)
    assert first.returncode == 0 and (out / "done.json").exists(), first.stderr[-3000:]
    dropped = sorted(data.iterdir())[-2:]
    assert all((out / p.name).exists() for p in dropped)
    for path in dropped:
        path.unlink()
    proc = subprocess.Popen([sys.executable, str(REPO / "entrypoint.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    for line in proc.stderr:
        if "inference: 50/60 images" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGTERM after" in err.strip().splitlines()[-1]
    assert not (out / "done.json").exists()

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = sorted(p.name for p in data.iterdir())
    assert sorted(i["file_name"] for i in load_instances(out)["images"]) == kept
    listed = [e["path"] for e in json.loads((out / "done.json").read_text())["outputs"]]
    assert listed == sorted([*kept, "instances.json"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, "instances.json", "done.json"])


def test_a_rerun_into_the_same_output_leaves_exactly_its_own_files(small_data, trained_segm, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(small_data / "test" / "images", images)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")  # not an output of any run: never touched
    assert infer(small_data, trained_segm, images, out).returncode == 0
    first = sorted(p.name for p in out.iterdir())
    removed = sorted(images.iterdir())[:2]
    for path in removed:
        path.unlink()
    result = infer(small_data, trained_segm, images, out)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = sorted(p.name for p in images.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, "instances.json", "done.json", "notes.txt"])
    assert set(first) - set(kept) >= {p.name for p in removed}  # they were there after the first run
    listed = [e["path"] for e in json.loads((out / "done.json").read_text())["outputs"]]
    assert listed == sorted([*kept, "instances.json"])
    assert sorted(i["file_name"] for i in load_instances(out)["images"]) == kept


def test_score_threshold_auto_keeps_each_class_above_the_threshold_train_found(small_data, trained_segm, tmp_path):
    """train --test stored each class's F1-optimal threshold (test_stats.json's best_f1) in the weights; with
    --score_threshold auto inference keeps exactly the detections of a --score_threshold 0 run that reach their
    class's threshold."""
    stats = json.loads(trained_segm.with_name("strawberry.test_stats.json").read_text())
    data = small_data / "test" / "images"
    common = ["inference", "--label", small_data / "label.txt", "--data", data, "--model_weights", trained_segm,
              "--device", "cpu", "--num_workers", "1", "--no_draw"]
    result = run_cli(*common, "--output", tmp_path / "all", "--score_threshold", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(*common, "--output", tmp_path / "auto", "--score_threshold", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "score thresholds (F1-optimal on the training run's test set)" in result.stderr
    everything = json.loads((tmp_path / "all" / "instances.json").read_text())
    thresholds = {c["id"]: stats["best_f1"][c["name"]]["threshold"] for c in everything["categories"]}
    every = everything["annotations"]
    kept = json.loads((tmp_path / "auto" / "instances.json").read_text())["annotations"]
    key = lambda a: (a["image_id"], a["category_id"], round(a["score"], 6), [round(v, 3) for v in a["bbox"]])  # noqa: E731
    expected = [a for a in every if a["score"] >= thresholds[a["category_id"]]]
    assert sorted(map(key, kept)) == sorted(map(key, expected))
    assert 0 < len(kept) < len(every)


def test_score_threshold_auto_needs_weights_trained_with_a_test_set(small_data, trained_segm, tmp_path):
    import torch

    weights = torch.load(trained_segm, weights_only=True)
    del weights["meta"]["score_thresholds"]
    torch.save(weights, tmp_path / "old.pth")
    result = run_cli("inference", "--label", small_data / "label.txt", "--data", small_data / "test" / "images",
                     "--model_weights", tmp_path / "old.pth", "--output", tmp_path / "out", "--score_threshold",
                     "auto", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "holds no per-class thresholds (they are found by train's test step: train with --test); give a number, "
        "e.g. 0.5")
    assert not (tmp_path / "out").exists()


def test_post_processing_in_workers_is_byte_identical_to_the_main_process_and_in_input_order(shapes_model, tmp_path):
    """--num_workers 0 (post-processing in the main process) and 4 (masks to RLE, drawing and PNG encoding in
    worker processes): the same instances.json and drawn images, byte for byte, and the images in input order
    although a list alternating two image sizes is batched by size (and so reordered)."""
    from tests import synthetic

    label, weights = shapes_model
    synthetic.write(tmp_path / "a", 5, (256, 256), 8, (8, 14), seed=11)
    synthetic.write(tmp_path / "b", 5, (320, 256), 8, (8, 14), seed=12)
    listed = [f"{folder}/images/{seed}_{i:04d}.png" for i in range(5) for folder, seed in (("a", 11), ("b", 12))]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    outputs = {}
    for workers in ("0", "4"):
        out = tmp_path / f"out{workers}"
        result = run_cli("inference", "--label", label, "--data", tmp_path / "list.txt", "--model_weights", weights,
                         "--output", out, "--score_threshold", "0.3", "--device", "cpu", "--batch_size", "3",
                         "--num_workers", workers)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[workers] = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
                            if p.is_file() and p.name != "done.json"}
    assert outputs["0"].keys() == outputs["4"].keys()
    assert len([n for n in outputs["0"] if n.endswith(".png")]) == 10
    for name in outputs["0"]:
        assert outputs["0"][name] == outputs["4"][name], name
    instances = json.loads(outputs["4"]["instances.json"])
    assert [image["file_name"] for image in instances["images"]] == listed
    assert len(instances["annotations"]) >= 40 and all("counts" in a["segmentation"] for a in instances["annotations"])


def test_start_up_runs_without_the_cyclic_collector_and_the_loop_and_workers_with_it(small_data, trained_segm,
                                                                                       tmp_path):
    """Start-up's long-lived objects are frozen out of the collector; the prediction loop and the post-processing
    workers (forked during start-up, collector paused) must collect again, or a long run keeps every cycle it
    makes. Recorded from inside the real command (predictor.predict and postprocess.finish wrapped)."""
    import subprocess
    import sys

    log = tmp_path / "gc.log"
    script = f"""
import gc, os, sys
from cvtk_job import cli, postprocess, predictor

def record(where):
    with open({str(log)!r}, "a") as fh:
        fh.write(f"{{where}} {{os.getpid()}} {{gc.isenabled()}} {{gc.get_freeze_count() > 0}}\\n")

predict, finish = predictor.predict, postprocess.finish

def recorded_predict(*a, **k):
    record("loop")
    return predict(*a, **k)

def recorded_finish(*a, **k):  # sent to the workers by name (pickled), found in the forked __main__
    record("worker")
    return finish(*a, **k)

predictor.predict, postprocess.finish = recorded_predict, recorded_finish
sys.exit(cli.main(sys.argv[1:]))
"""
    data = small_data / "test" / "images"
    result = subprocess.run([sys.executable, "-c", script, "inference", "--label", small_data / "label.txt",
                             "--data", data, "--model_weights", trained_segm, "--output", tmp_path / "out", *LOW,
                             "--batch_size", "2"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in log.read_text().splitlines()]
    loop = [r for r in rows if r[0] == "loop"]
    workers = [r for r in rows if r[0] == "worker"]
    assert loop and workers and {r[1] for r in workers}.isdisjoint({r[1] for r in loop})
    assert all(r[2:] == ["True", "True"] for r in rows), rows
