"""Stop cleanly on SIGTERM / SIGUSR1 (Kubernetes eviction, Slurm's --signal, docker stop).

The handler only raises a flag; the training loop looks at it at the next iteration boundary, so a
signal never lands in the middle of a checkpoint write. The job then stops with exit code 75 and
resumes from its last complete epoch checkpoint when it is run again: a signal costs at most the
epoch in progress.
"""

import logging
import os
import re
import signal
import threading
import time

from .errors import UserError

log = logging.getLogger(__name__)
_requested = threading.Event()
_signal_name = []


def _handler(signum, frame):
    if not _requested.is_set():
        _signal_name.append(signal.Signals(signum).name)
        _requested.set()
        log.warning("%s received: stopping at the next iteration; rerun the same command to resume",
                    signal.Signals(signum).name)


_deadline = []


def install(time_limit_s=None):
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)
    if time_limit_s:
        _deadline.append(time.monotonic() + time_limit_s)


def detach_loader_worker(*_):
    """DataLoader workers leave the job's process group: the job's main process decides when to stop.

    torchrun's agent (and Slurm) signal a worker's whole process group, and PyTorch's loader workers die
    on a SIGTERM that does not come from their parent: the main process would then fail with "DataLoader
    worker killed" instead of finishing its iteration and exiting 75. In a group of their own they hear
    only their parent, which shuts them down as usual (and they exit when it is gone).
    """
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group or session leader: nothing to leave


def parse_duration(text):
    """'3h50m', '90m', '45s', '1h' or plain seconds → seconds."""
    match = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text or "")
    if not text or not match or not any(match.groups()):
        raise UserError(f"--time_limit {text!r}: give a duration such as 3h50m, 90m or 3600")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def requested():
    if not _requested.is_set() and _deadline and time.monotonic() > _deadline[0]:
        _signal_name.append("--time_limit")
        _requested.set()
    return _requested.is_set()


def name():
    return _signal_name[0] if _signal_name else "signal"
