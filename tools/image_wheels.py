"""Fill wheels/ with every runtime wheel the image needs, so `docker build` can run offline.

mmcv comes from the wheelhouse `make setup` filled (compiled once on this machine); everything else
is downloaded by pip at the pinned versions of requirements/constraints.txt (torch from the local
find-links when there is one).
"""

import glob
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pin_groups():
    """The runtime part of constraints.txt (it ends at "# development"), then mmcv's build tools.

    Two groups: they pin different setuptools versions, which one pip call cannot download together.
    """
    runtime = []
    with open(os.path.join(REPO, "requirements", "constraints.txt")) as fh:
        for line in fh:
            if line.startswith("# development"):
                break
            if line.split("#")[0].strip():
                runtime.append(line.split("#")[0].strip())
    with open(os.path.join(REPO, "requirements", "mmcv-build.txt")) as fh:
        build = [line.split("#")[0].strip() for line in fh if line.split("#")[0].strip()]
    return [runtime, build]


DEFAULT_DEST = os.path.join(REPO, "wheels")


def main(dest=DEFAULT_DEST):
    os.makedirs(dest, exist_ok=True)
    wheelhouse = os.environ.get("CVTK_JOB_WHEELHOUSE") or glob.glob(os.path.join(
        os.environ.get("CVTK_JOB_CACHE") or os.path.expanduser("~/.cache/cvtk-job"), "wheelhouse", "*"))[0]
    for wheel in glob.glob(os.path.join(wheelhouse, "mmcv-*.whl")):
        shutil.copy(wheel, dest)
    have = {os.path.basename(w).lower().replace("_", "-") for w in os.listdir(dest)}
    for pins in pin_groups():
        todo = [p for p in pins if not p.startswith("mmcv==") and not any(
            h.startswith(p.lower().replace("_", "-").replace("==", "-")) for h in have)]
        if todo:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                            "-d", dest, *todo], check=True)
    print(dest)


if __name__ == "__main__":
    main(*sys.argv[1:])
