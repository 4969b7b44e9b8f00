"""Where a job runs: the device, and the torch.distributed context it was launched in.

Three launch contexts, detected from the environment (never a launcher of our own):
- a plain process;
- `torchrun --nproc_per_node=N …` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT already set);
- a Slurm step with several tasks (`srun` inside `sbatch`): rank and world from SLURM_*, the master
  address from the first host of the step's node list, and a port derived from the job id, so two
  jobs sharing a node never pick the same port.
"""

import os
import re
import subprocess
from dataclasses import dataclass

from .errors import UserError

SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000
# More loader workers than this buys nothing for these models (the model, not JPEG decoding, is the
# bottleneck) and costs a copy of the dataset's index in each worker.
MAX_DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class Launch:
    kind: str  # "none", "torchrun" or "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def first_host(nodelist):
    """The first host of a Slurm host list without scontrol (inside a container there is none):
    `gpu[001-004,007],cpu1` → `gpu001`; `n[1-2]-ib[3-4]` → `n1-ib3`; `a,b` → `a`."""
    head, depth = [], 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head.append(ch)
    # Inside each bracket, the first item of the first range: `[001-004,007]` → `001` (zero padding kept).
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", "".join(head))


def _first_host(nodelist):
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return first_host(nodelist)


def detect(env=None):
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")))
    if int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1"))) > 1 and "SLURM_PROCID" in env \
            and "SLURM_STEP_ID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0"))
        # MASTER_ADDR/PORT when the batch script computed them on the host (slurm/common.sh: the first
        # node's NodeAddr); else the first host of the node list.
        return Launch("slurm", int(env["SLURM_PROCID"]),
                      int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
                      int(env.get("SLURM_LOCALID", "0")), env.get("MASTER_ADDR") or _first_host(nodelist),
                      int(env.get("MASTER_PORT") or SLURM_PORT_BASE + job % SLURM_PORT_SPAN))
    return Launch("none")


def init_distributed(launch, device):
    """Join the process group (nccl on GPU, gloo on CPU) before MMEngine's Runner is built.

    MMEngine's own initialisation calls torch.cuda.set_device, which fails on CPU nodes; joining the
    group here lets the Runner find it initialised and skip its own.
    """
    if not launch.distributed:
        return
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                      LOCAL_RANK=str(launch.local_rank), MASTER_ADDR=launch.master_addr,
                      MASTER_PORT=str(launch.master_port))
    if device == "cuda":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")


def available_cpus():
    """CPUs this process may use: its affinity (Slurm's cpuset, `docker --cpuset-cpus`) and the cgroup's
    CPU quota (Kubernetes CPU limits, `docker --cpus`), not the machine's core count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def cpu_share(env=None):
    """CPUs of this process's share of the node: Slurm's --cpus-per-task, or what the process may use
    split among torchrun's workers on the node (they share one affinity mask)."""
    env = os.environ if env is None else env
    cpus = available_cpus()
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cpus = min(cpus, int(env["SLURM_CPUS_PER_TASK"]))
    local = int(env.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, cpus // local)


def default_workers(env=None):
    """`--num_workers` when not given: the CPUs of this process's share of the node, less one for the
    process itself, at most MAX_DEFAULT_WORKERS (0 on a single CPU: load in the main process)."""
    return max(0, min(MAX_DEFAULT_WORKERS, cpu_share(env) - 1))


def limit_cpu_threads(env=None):
    """On CPU, torch's math threads to this process's share of the node, unless OMP_NUM_THREADS says.

    torch starts one OpenMP thread per core it sees, and Slurm without a cpuset task plugin (or a pod
    with a CPU limit) shows every rank all the node's cores: two ranks on two cores then run four
    spinning threads and each step waits on the other's (the two-node Slurm test here: 108 s with two
    threads per rank, 80 s with one). torchrun sets OMP_NUM_THREADS=1 itself for several
    workers; srun and a plain start do not. Returns the number of threads set, or None."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    import torch

    share = cpu_share(env)
    if share >= torch.get_num_threads():
        return None
    torch.set_num_threads(share)
    return share


def select_device(requested):
    """`--device auto|cpu|cuda` → "cpu" or "cuda"; call before anything imports torch for `cpu`."""
    if requested == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # mmengine picks the device itself: hide the GPUs
        limit_cpu_threads()
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or run on a GPU node")
    limit_cpu_threads()
    return "cpu"
