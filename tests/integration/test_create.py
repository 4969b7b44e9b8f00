"""create: the four generated scripts (segm/det x cvtk-job/vanilla) lint clean, train and infer."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_MODELS, run_cli

pytestmark = pytest.mark.slow


def test_refuses_to_overwrite_without_force(tmp_path):
    script = tmp_path / "segm.py"
    script.write_text("# mine\n")
    result = run_cli("create", "--script", script, "--task", "segm")
    assert result.returncode == 2
    assert "segm.py already exists; choose another name or pass --force to overwrite it" in result.stderr
    assert script.read_text() == "# mine\n"
    assert run_cli("create", "--script", script, "--task", "segm", "--force").returncode == 0
    assert '"mask-rcnn_r101_fpn_1x_coco"' in script.read_text()


@pytest.mark.parametrize("task", ["segm", "det"])
@pytest.mark.parametrize("vanilla", [False, True], ids=["cvtk-job", "vanilla"])
def test_generated_script_trains_and_infers(tiny_data, tmp_path, task, vanilla):
    script = tmp_path / f"{task}.py"
    result = run_cli("create", "--script", script, "--task", task, *(["--vanilla"] if vanilla else []))
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert ('"mask-rcnn_r101_fpn_1x_coco"' if task == "segm" else '"faster-rcnn_r101_fpn_1x_coco"') in text
    assert ("import cvtk_job" in text or "from cvtk_job" in text) != vanilla
    ruff = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ruff"), "check", "--no-cache", str(script)],
                          capture_output=True, text=True, cwd=REPO)
    assert ruff.returncode == 0, ruff.stdout

    # The architecture is a plain string the user edits: here, the tiny CPU model.
    script.write_text(text.replace(f'MODEL = "{"mask" if task == "segm" else "faster"}-rcnn_r101_fpn_1x_coco"',
                                   f'MODEL = "{TINY_MODELS[task]}"'))
    kind = "segm" if task == "segm" else "bbox"
    out = tmp_path / "outputs"
    speed = ["--image_size", "256", "192", "--batch_size", "4", "--num_workers", "1"]
    if not vanilla:
        speed += ["--pretrained", "none", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    train = subprocess.run([sys.executable, str(script), "train", "--label", tiny_data / "label.txt",
                            "--train", tiny_data / "train" / f"{kind}.json", "--valid",
                            tiny_data / "valid" / f"{kind}.json", "--test", tiny_data / "test" / f"{kind}.json",
                            "--output_weights", out / "strawberry.pth", "--epoch", "1", *speed],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    for suffix in (".pth", ".py", ".train_stats.train.txt", ".train_stats.train.png", ".train_stats.valid.txt",
                   ".train_stats.valid.png", ".test_stats.json"):
        assert (out / f"strawberry{suffix}").is_file(), suffix
    assert (out / "strawberry" / "test_outputs.coco.json").is_file()
    stats = json.loads((out / "strawberry.test_stats.json").read_text())
    assert "AP@[0.50:0.95|all|100]" in stats["stats"]

    infer = subprocess.run([sys.executable, str(script), "inference", "--label", tiny_data / "label.txt",
                            "--data", tiny_data / "test" / "images", "--model_weights", out / "strawberry.pth",
                            "--output", out / "inference_results", "--score_threshold", "0.0",
                            *(["--device", "cpu"] if not vanilla else [])],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert infer.returncode == 0, infer.stderr[-3000:]
    instances = json.loads((out / "inference_results" / "instances.json").read_text())
    assert len(instances["images"]) == 3
    assert len([p for p in (out / "inference_results").iterdir() if p.suffix == ".jpg"]) == 3
