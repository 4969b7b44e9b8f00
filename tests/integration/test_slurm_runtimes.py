"""The Slurm templates with the apptainer and pyxis runtimes, on the real Slurm.

Neither Apptainer nor enroot/Pyxis can be installed here, so each is replaced by a documented stand-in
on PATH that does to the environment what the real runtime does, runs this checkout's cvtk-job for the
image's `cvtk-job`, and records the command line and environment each task's container received:

- apptainer: `apptainer exec [--nv] --cleanenv IMAGE CMD…` as Apptainer 1.x documents --cleanenv: the
  container starts with an empty environment except HOME, TERM, LANG and the proxy variables, plus every
  `APPTAINERENV_NAME` of the caller as NAME (and `--env NAME=VALUE`);
- pyxis: `srun --container-image=IMAGE CMD…`: Pyxis runs CMD in the image with the task's environment
  unchanged; the stand-in `srun` drops the flag (recording it) and calls the real srun.
"""

import json
import os
import sys
import textwrap

import pytest

from tests.conftest import SPEED, TINY_MODELS
from tests.integration.test_slurm import job_env, log_of, rows, submit

pytestmark = pytest.mark.slow

APPTAINER = textwrap.dedent('''\
    #!{python}
    """Stand-in for `apptainer exec --cleanenv` (see tests/integration/test_slurm_runtimes.py)."""
    import json, os, sys
    args = sys.argv[1:]
    assert args.pop(0) == "exec", args
    env, clean = dict(os.environ), False
    while args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--cleanenv":
            clean = True
        elif flag == "--env":
            env.update(dict(kv.split("=", 1) for kv in args.pop(0).split(",")))
    image, command = args[0], args[1:]
    if clean:
        kept = {{k: v for k, v in os.environ.items() if k in ("HOME", "TERM", "LANG") or k.lower().endswith("_proxy")}}
        kept.update({{k[len("APPTAINERENV_"):]: v for k, v in os.environ.items() if k.startswith("APPTAINERENV_")}})
        env = kept
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # the image's PATH
    record = os.path.join(os.environ["RUNTIME_LOG"], f"apptainer-{{os.getpid()}}.json")
    with open(record, "w") as fh:
        json.dump({{"argv": sys.argv[1:], "image": image, "env": env}}, fh)
    assert command[0] == "cvtk-job", command
    os.execve({python!r}, [{python!r}, "-m", "cvtk_job", *command[1:]], env)
''')

SRUN = textwrap.dedent('''\
    #!/bin/bash
    # Stand-in for Pyxis (see tests/integration/test_slurm_runtimes.py): drop --container-image, record it,
    # run the image's cvtk-job as this checkout's, with the task's environment unchanged.
    args=(); image=""
    for a in "$@"; do
      case "$a" in
        --container-image=*) image=${{a#--container-image=}} ;;
        cvtk-job) args+=({python} -m cvtk_job) ;;
        *) args+=("$a") ;;
      esac
    done
    echo "$image ${{args[*]}}" >> "$RUNTIME_LOG/pyxis-srun.txt"
    PATH=${{PATH#{bindir}:}} exec srun "${{args[@]}}"
''')


@pytest.fixture
def stand_ins(tmp_path):
    """{runtime: folder to put first on PATH}, and the folder the stand-ins record into."""
    folders = {}
    for runtime, name, text in (("apptainer", "apptainer", APPTAINER), ("pyxis", "srun", SRUN)):
        bindir = tmp_path / f"bin-{runtime}"
        bindir.mkdir()
        (bindir / name).write_text(text.format(python=sys.executable, bindir=bindir))
        (bindir / name).chmod(0o755)
        folders[runtime] = bindir
    log = tmp_path / "runtime-log"
    log.mkdir()
    return folders, log


def args(data, out):
    return ["--label", data / "label.txt", "--train", data / "train" / "bbox.json", "--output_weights", out, *SPEED,
            "--model", TINY_MODELS["det"], "--task", "det", "--epoch", "1"]


def test_apptainer_cleanenv_gets_what_each_task_needs(slurm, s3_server, tiny_data, tmp_path, stand_ins):
    folders, log = stand_ins
    bindir = folders["apptainer"]
    bucket = "cvtk-runtimes"
    s3_server.client().create_bucket(Bucket=bucket)
    env = {**job_env(tmp_path), **s3_server.env(), "CVTK_RUNTIME": "apptainer", "CVTK_IMAGE": "/images/cvtk-job.sif",
           "PATH": f"{bindir}:{os.environ['PATH']}", "RUNTIME_LOG": str(log), "UNRELATED_CANARY": "must-not-pass"}
    env.pop("PYTHONPATH")  # inside the image cvtk-job is installed; nothing from the host's Python path
    result = submit(slurm, tmp_path, "train.sbatch", *args(tiny_data, f"s3://{bucket}/run/strawberry.pth"),
                    sbatch=["--ntasks-per-node=2", "--gres=gpu:2"], env=env)
    job = result.stdout.strip().split(";")[0]
    out = log_of(tmp_path, "cvtk-train", job)
    assert result.returncode == 0, out[-4000:]
    assert "run/strawberry.done.json" in s3_server.keys(bucket, "run/")  # credentials and endpoint arrived
    assert "distributed: rank 0 of 2" in out and "distributed: rank 1 of 2" in out

    records = [json.loads(p.read_text()) for p in sorted(log.glob("apptainer-*.json"))]
    assert len(records) == 2
    assert {r["env"]["SLURM_PROCID"] for r in records} == {"0", "1"}  # each task's own values
    for r in records:
        assert r["argv"][:3] == ["exec", "--nv", "--cleanenv"] and r["image"] == "/images/cvtk-job.sif"
        got = r["env"]
        for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT",
                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "CVTK_JOB_CACHE"):
            assert name in got, name
        assert got["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint and got["PYTHONUNBUFFERED"] == "1"
        assert "UNRELATED_CANARY" not in got and "PYTHONPATH" not in got
    assert len({(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in records}) == 1


def test_pyxis_runs_the_image_with_the_task_environment(slurm, tiny_data, tmp_path, stand_ins):
    folders, log = stand_ins
    bindir = folders["pyxis"]
    env = {**job_env(tmp_path), "CVTK_RUNTIME": "pyxis", "CVTK_IMAGE": "registry.example.org#lab/cvtk-job:0.1.0",
           "PATH": f"{bindir}:{os.environ['PATH']}", "RUNTIME_LOG": str(log)}
    result = submit(slurm, tmp_path, "train.sbatch", *args(tiny_data, tmp_path / "strawberry.pth"), env=env)
    job = result.stdout.strip().split(";")[0]
    assert result.returncode == 0, log_of(tmp_path, "cvtk-train", job)[-4000:]
    line = (log / "pyxis-srun.txt").read_text().strip()
    assert line.startswith("registry.example.org#lab/cvtk-job:0.1.0 --kill-on-bad-exit=1 ")
    assert " -m cvtk_job train --label " in line
    assert rows(tmp_path / "strawberry.train_stats.train.txt") == ["1"]
