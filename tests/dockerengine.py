"""A Docker engine for the image tests: loopback only, started and stopped (by PID) by the suite.

dockerd runs with no bridge, no iptables, no NAT and no IP forwarding; containers use
`--network none`. Its data root lives in the user's cache so the locally made base image and build
layers survive between runs (CI stays fast); everything else is under a temporary folder.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

BASE_IMAGE = "cvtk-test-base:bookworm"
# Enough build cache to rebuild after a source change without reinstalling the wheels.
BUILD_CACHE_KEEP_BYTES = 12 * 1024**3
# What the image's build and runtime stages need from the base (see the Dockerfile's *_PACKAGES).
BASE_PACKAGES = ["python3", "python3-venv", "libgl1", "libglib2.0-0", "ca-certificates"]


def ensure_installed():
    if shutil.which("dockerd") and os.path.exists("/usr/bin/docker") and shutil.which("debootstrap"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "docker.io", "debootstrap"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


class DockerEngine:
    def __init__(self, root):
        self.root = Path(root)
        cache = os.environ.get("CVTK_JOB_CACHE") or os.path.expanduser("~/.cache/cvtk-job")
        self.data_root = Path(cache) / "docker-test"
        self.sock = self.root / "docker.sock"
        self.proc = None

    @property
    def env(self):
        return dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="1")

    def start(self):
        ensure_installed()
        self.data_root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--host", f"unix://{self.sock}", "--data-root", str(self.data_root),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
             "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while self.docker("info").returncode:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"dockerd did not start; see {self.root / 'dockerd.log'}")
            time.sleep(0.3)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def prune(self):
        """Drop what a rebuild left behind: the data root persists between runs, and every changed build
        leaves its previous image dangling and its layers in the build cache (19 GB here after a few weeks
        of CI, which then failed on a full disk). The base image and the current tag stay."""
        self.docker("image", "prune", "--force")
        self.docker("builder", "prune", "--force", "--keep-storage", str(BUILD_CACHE_KEEP_BYTES))

    def docker(self, *args, timeout=1800):
        # Debian's client: BuildKit (multi-stage) without buildx.
        return subprocess.run(["/usr/bin/docker", *map(str, args)], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def ensure_base_image(self):
        """A Debian bookworm base made locally (no registry is reachable): debootstrap + docker import."""
        if not self.docker("image", "inspect", BASE_IMAGE).returncode:
            return BASE_IMAGE
        rootfs = self.root / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
                        str(rootfs), "http://deb.debian.org/debian"], check=True, capture_output=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["/usr/bin/docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=self.env, check=True,
                       capture_output=True)
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
        return BASE_IMAGE
