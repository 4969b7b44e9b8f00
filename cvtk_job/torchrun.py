"""`python -m cvtk_job.torchrun [torchrun options] entrypoint.py train …`: torchrun whose exit code is cvtk-job's.

torchrun exits 1 whatever its workers' codes (2, 4 and 75 all become 1) and 1 when it is sent SIGTERM
itself, so a scheduler that acts on codes (Kubernetes' podFailurePolicy, Slurm's requeue) cannot tell a
wrong dataset from a checkpointed eviction. This module is torchrun with that one thing changed: it
parses torchrun's own arguments (every flag and `PET_*` variable works the same), starts the same
elastic agent (`torch.distributed.run.run`) and then reports

- the failing worker's code, when it is one of cvtk-job's (2, 3, 4, 75), else the most telling code
  the workers wrote (each worker records its exit code in a folder the agent's workers inherit);
- 75 after SIGTERM/SIGINT when every worker stopped after its checkpoint (the agent forwards the
  signal and waits `--shutdown_timeout` / TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, default 30: set it
  a little below the pod's terminationGracePeriodSeconds), else 128 + the signal;
- nothing of its own when one process suffices (one node, one process): the command is executed in
  place, so it is the container's PID 1 and receives the scheduler's signals itself.
"""

import os
import shutil
import sys
import tempfile

from .errors import EXIT_INTERRUPTED, EXIT_STORAGE, EXIT_TRAINING, EXIT_USER

EXIT_DIR_ENV = "CVTK_JOB_EXIT_DIR"
OURS = (EXIT_USER, EXIT_STORAGE, EXIT_TRAINING, EXIT_INTERRUPTED)


def record_exit_code(code, env=None):
    """Called by cli.main in each worker: leave this rank's exit code for the launcher to report."""
    env = os.environ if env is None else env
    folder = env.get(EXIT_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return
    path = os.path.join(folder, env.get("RANK", "0"))
    try:
        with open(f"{path}.tmp", "w", encoding="ascii") as fh:
            fh.write(str(code))
        os.replace(f"{path}.tmp", path)
    except OSError:
        pass  # the launcher falls back to the code the agent saw


def worker_codes(folder):
    codes = {}
    for name in os.listdir(folder):
        if name.isdigit():
            try:
                with open(os.path.join(folder, name), encoding="ascii") as fh:
                    codes[int(name)] = int(fh.read().strip())
            except (OSError, ValueError):
                pass
    return codes


def decide(first_failure_code, codes):
    """The code to exit with, from the first failing worker's and the codes the workers recorded."""
    if first_failure_code in OURS:
        return first_failure_code
    for code in (EXIT_USER, EXIT_TRAINING, EXIT_STORAGE):  # a cause beats its consequences in other ranks
        if code in codes.values():
            return code
    if codes and set(codes.values()) == {EXIT_INTERRUPTED}:
        return EXIT_INTERRUPTED
    if first_failure_code is not None and first_failure_code > 0:
        return first_failure_code
    return 1


def _nodes(args):
    parts = str(args.nnodes).split(":")
    return max(int(p) for p in parts)


def _single_process_command(args):
    script = [args.training_script, *args.training_script_args]
    if args.no_python:
        return script
    return [sys.executable, "-u", *(["-m"] if args.module else []), *script]


def main(argv=None):
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torch_run.parse_args(sys.argv[1:] if argv is None else argv)
    if _nodes(args) == 1 and str(args.nproc_per_node) == "1":
        command = _single_process_command(args)
        os.execvp(command[0], command)  # no agent between the scheduler and the job

    folder = tempfile.mkdtemp(prefix="cvtk-job-exit-")
    os.environ[EXIT_DIR_ENV] = folder  # the workers inherit it
    try:
        torch_run.run(args)
        return 0
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        code = decide(failure.exitcode, worker_codes(folder))
        print(f"cvtk-job torchrun: a worker failed (exit {failure.exitcode}); exiting {code}", file=sys.stderr)
        return code
    except SignalException as err:
        codes = worker_codes(folder)
        if codes and set(codes.values()) == {EXIT_INTERRUPTED}:
            print(f"cvtk-job torchrun: {err.sigval.name}: every worker checkpointed and stopped; exiting 75",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"cvtk-job torchrun: {err.sigval.name}: workers stopped with {codes or 'no code'}", file=sys.stderr)
        return 128 + int(err.sigval)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
