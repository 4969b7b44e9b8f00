"""`make bench`: cvtk-job against the real alternatives, measured in the same run on this machine.

Each benchmark prints `name: ours X, baseline Y, ratio Z (target T)`; the table goes to
docs/benchmarks.md with the machine's details. Not part of `make test` (minutes, not seconds).
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "strawberry"
WORK = Path(os.environ.get("BENCH_DIR", REPO / "outputs" / "bench"))
PY = sys.executable
CLI = [PY, str(REPO / "entrypoint.py")]
ROWS = []


def report(name, ours, baseline, unit, ratio, target, met, note=""):
    line = f"{name}: ours {ours:.3g} {unit}, baseline {baseline:.3g} {unit}, ratio {ratio:.2f} (target {target})"
    print(line + ("" if met else "  <-- MISSED") + (f"  [{note}]" if note else ""), flush=True)
    ROWS.append((name, f"{ours:.3g} {unit}", f"{baseline:.3g} {unit}", f"{ratio:.2f}", target,
                 "met" if met else "missed", note))


def measure(cmd):
    out = subprocess.run([PY, str(REPO / "bench" / "peak_rss.py"), *map(str, cmd)], capture_output=True,
                         text=True, cwd=REPO)
    if out.returncode:
        sys.exit(f"bench command failed: {' '.join(map(str, cmd))}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trained_model():
    """A tiny Mask R-CNN trained briefly on the sample (cached between bench runs)."""
    weights = WORK / "model" / "strawberry.pth"
    if not weights.exists():
        subprocess.run([*CLI, "train", "--label", SAMPLE / "label.txt", "--train", SAMPLE / "train" / "segm.json",
                        "--test", SAMPLE / "test" / "segm.json", "--output_weights", weights,
                        "--model", REPO / "examples" / "configs" / "tiny_mask_rcnn.py", "--pretrained", "none",
                        "--epoch", "2", "--image_size", "512", "384", "--num_workers", "2", "--device", "cpu"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return weights


def image_folder(n):
    folder = WORK / f"images_{n}"
    if not folder.exists():
        sources = sorted((SAMPLE / "test" / "images").iterdir())
        folder.mkdir(parents=True)
        for i in range(n):
            src = sources[i % len(sources)]
            shutil.copy(src, folder / f"{i:05d}_{src.name}")
    return folder


# The bench model is barely trained (random init, CPU): its scores stay low, so the threshold is set
# where it keeps a few detections per image, as a trained model does at 0.5.
SCORE_THRESHOLD = 0.1


def bench_inference(weights):
    n, batch = 40, 4
    folder = image_folder(n)
    ours = measure([*CLI, "inference", "--label", SAMPLE / "label.txt", "--data", folder, "--model_weights",
                    weights, "--output", WORK / "ours_out", "--batch_size", batch, "--num_workers", 2,
                    "--score_threshold", SCORE_THRESHOLD, "--device", "cpu"])
    with open(WORK / "ours_out" / "instances.json") as fh:
        per_image = len(json.load(fh)["annotations"]) / n
    theirs = measure([PY, REPO / "bench" / "detinferencer.py", weights.with_suffix(".py"), weights, folder,
                      WORK / "detinferencer_out", batch, SCORE_THRESHOLD])
    ours_ips, theirs_ips = n / ours["wall_s"], n / theirs["wall_s"]
    report("inference images/s vs DetInferencer", ours_ips, theirs_ips, "img/s", ours_ips / theirs_ips, ">= 1.5",
           ours_ips / theirs_ips >= 1.5, f"{n} images, batch {batch}, drawing on, {per_image:.1f} detections/image "
           f"at score >= {SCORE_THRESHOLD}, end to end incl. start-up")
    return ours, theirs


def bench_inference_memory(weights, small):
    n = 400
    large = measure([*CLI, "inference", "--label", SAMPLE / "label.txt", "--data", image_folder(n),
                     "--model_weights", weights, "--output", WORK / "ours_out_400", "--batch_size", 4,
                     "--num_workers", 2, "--score_threshold", SCORE_THRESHOLD, "--device", "cpu"])
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    report("inference peak RSS 400 vs 40 images", large["peak_rss_mib"], small["peak_rss_mib"], "MiB", ratio,
           "<= 1.1", ratio <= 1.1, "baseline column = the 40-image run")


def bench_s3_staging():
    """1,000 small images from a local SeaweedFS: ours vs `aws s3 sync` vs a sequential boto3 loop."""
    sys.path.insert(0, str(REPO))
    from tests.s3server import SeaweedS3

    n = 1000
    shutil.rmtree(WORK / "seaweedfs", ignore_errors=True)
    server = SeaweedS3(WORK / "seaweedfs").start()
    try:
        client = server.client()
        client.create_bucket(Bucket="bench")
        sources = sorted((SAMPLE / "test" / "images").iterdir())
        total = 0
        for i in range(n):
            body = sources[i % len(sources)].read_bytes()
            total += len(body)
            client.put_object(Bucket="bench", Key=f"images/{i:05d}.jpg", Body=body)
        env = {**os.environ, **server.env()}

        def timed(cmd, keep=False, **extra):
            if not keep:
                shutil.rmtree(WORK / "stage", ignore_errors=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.perf_counter() - start

        ours = timed([PY, REPO / "bench" / "stage_s3.py", "s3://bench/images/"], CVTK_JOB_CACHE=str(WORK / "stage"))
        cached = timed([PY, REPO / "bench" / "stage_s3.py", "s3://bench/images/"], keep=True,
                       CVTK_JOB_CACHE=str(WORK / "stage"))
        aws = timed([Path(PY).parent / "aws", "s3", "sync", "--only-show-errors", "s3://bench/images/",
                     WORK / "stage"])
        loop = timed([PY, REPO / "bench" / "boto3_loop.py", "bench", "images/", WORK / "stage"])
    finally:
        server.stop()
    mb = total / 2**20
    report("S3 staging vs aws s3 sync", n / ours, n / aws, "files/s", aws / ours, ">= 1.0 (not slower)",
           aws / ours >= 1.0, f"{n} images, {mb:.0f} MiB, cold cache; cvtk-job with a warm cache: {cached:.1f} s")
    report("S3 staging vs sequential boto3 loop", n / ours, n / loop, "files/s", loop / ours, "(information)", True,
           "same run")


def machine():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"CUDA {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")


def write_table():
    lines = ["# Benchmarks", "", f"Measured by `make bench` on {time.strftime('%Y-%m-%d')}: {machine()}.", "",
             "| benchmark | ours | baseline | ratio | target | result | notes |", "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in ROWS]
    (REPO / "docs").mkdir(exist_ok=True)
    (REPO / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    weights = trained_model()
    ours, _ = bench_inference(weights)
    bench_inference_memory(weights, ours)
    bench_s3_staging()
    write_table()


if __name__ == "__main__":
    main()
