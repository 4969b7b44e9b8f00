"""A real Slurm (Debian slurmctld + slurmd) on 127.0.0.1, started and stopped by the tests: one node, or
several nodes on this one machine (one slurmd each; Debian's Slurm is built with --enable-multiple-slurmd).

auth/none (no munge), loopback only, two fake GPUs (character devices) so that templates asking for
`--gres=gpu:N` are accepted, state wiped at every start. Daemons run in the foreground of processes
we start, and are stopped by PID.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]


def ensure_installed():
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        return
    # A fresh machine: Debian's packages (as in the CI image); ~10 s.
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root, nodes=1):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs = []
        # One node is this machine's hostname; several are n1..nN, all on this host (NodeHostname).
        self.nodes = [self.host] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]

    @property
    def env(self):
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self):
        state, spool = self.root / "state", self.root / "spool"
        shutil.rmtree(state, ignore_errors=True)  # a drained node state would survive restarts
        state.mkdir(parents=True)
        spool.mkdir(parents=True, exist_ok=True)
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        for i in range(2):
            dev = devices / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
        memory = 1024
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout
        for word in out.split():
            if word.startswith("RealMemory="):
                memory = int(word.split("=")[1])
        if len(self.nodes) == 1:
            slurmd = f"SlurmdPort={_free_port()}\nSlurmdSpoolDir={spool}\nSlurmdPidFile={self.root}/slurmd.pid\n" \
                     f"SlurmdLogFile={self.root}/slurmd.log"
            nodes = f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs=2 RealMemory={memory} Gres=gpu:2 State=UNKNOWN"
            gres = f"NodeName={self.host} Name=gpu File={devices}/nvidia[0-1]\n"
        else:  # each node its own port, spool, pid and log (%n: the node name), one fake GPU each
            slurmd = f"SlurmdSpoolDir={spool}-%n\nSlurmdPidFile={self.root}/slurmd-%n.pid\n" \
                     f"SlurmdLogFile={self.root}/slurmd-%n.log\nSlurmdParameters=config_overrides"
            nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs=2 "
                              f"RealMemory={memory // len(self.nodes)} Gres=gpu:1 State=UNKNOWN" for n in self.nodes)
            gres = "".join(f"NodeName={n} Name=gpu File={devices}/nvidia{i}\n" for i, n in enumerate(self.nodes))
        self.conf.write_text(f"""ClusterName=cvtktest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
{slurmd}
AuthType=auth/none
# A requeued job waits cred_expire + 1 s before it may start again (the old credential must expire first;
# releasing it earlier got "Job credential revoked"): 20 s instead of the default 120 keeps the requeue test
# short. Launches here take well under a second, far inside the credential's life.
AuthInfo=cred_expire=20
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={state}
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmctldLogFile={self.root}/slurmctld.log
ReturnToService=2
EnforcePartLimits=ALL
SchedulerParameters=batch_sched_delay=0
MinJobAge=300
JobRequeue=1
GresTypes=gpu
MpiDefault=none
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        (self.root / "gres.conf").write_text(gres)

    def start(self):
        ensure_installed()
        self._write_config()
        env = dict(os.environ, **self.env)
        log = open(self.root / "daemons.out", "ab")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for node in self.nodes:
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", node], env=env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 60
        while True:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            states = out.split()
            if len(states) == len(self.nodes) and set(states) <= {"idle", "mixed"}:
                return self
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"Slurm did not come up: {out!r}; see {self.root}")
            time.sleep(0.3)

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []

    def run(self, *cmd, env=None, **kwargs):
        """A Slurm command; `env` is added to the environment it sees (sbatch exports it to the job)."""
        return subprocess.run(list(map(str, cmd)), env=dict(os.environ, **self.env, **(env or {})),
                              capture_output=True, text=True, **kwargs)

    FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED"}

    def sbatch_wait(self, *cmd, env=None, timeout=900):
        """`sbatch --wait`, but answering within half a second of the job's end: sbatch's own wait polls at
        2, 4, 8, 16, 32 s (a 10 s job took 42 s). The real sbatch submits; the job's state and exit code come
        from scontrol (jobs stay listed MinJobAge=300 s). Returns (returncode as sbatch --wait gives it,
        sbatch's stdout, its stderr)."""
        submitted = self.run(*cmd, env=env, timeout=60)
        if submitted.returncode:
            return subprocess.CompletedProcess(cmd, submitted.returncode, submitted.stdout, submitted.stderr)
        job = submitted.stdout.strip().split(";")[0]
        deadline = time.time() + timeout
        while True:
            out = self.run("scontrol", "show", "job", "-o", job).stdout
            state = re.search(r"JobState=(\w+)", out)
            if state and state.group(1) in self.FINAL_STATES:
                code, signal = map(int, re.search(r" ExitCode=(\d+):(\d+)", out).groups())
                return subprocess.CompletedProcess(cmd, code or (128 + signal if signal else 0), submitted.stdout,
                                                   submitted.stderr)
            if time.time() > deadline:
                raise TimeoutError(f"job {job} still {state.group(1) if state else '?'} after {timeout} s")
            time.sleep(0.5)

